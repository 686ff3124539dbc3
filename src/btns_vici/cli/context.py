"""The global options of ``btns`` -> backend options and a selected backend."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from . import exits

if TYPE_CHECKING:
    from ..backend import Backend
    from ..core.records import IkeSA

#: The built-in backend :func:`list_sas` reads without the plugin manager when it is named.
BUILTIN = "strongswan"


def backend_options(args: Any, netns_name: str | None = None) -> dict[str, str]:
    """``--vici-socket`` and ``--netns`` (or ``netns_name``) as backend options.

    A namespace an installed extension knows (``btns testbed up`` of btns-lab records its
    namespaces) brings its charon's VICI socket along unless ``--vici-socket`` is given.
    """
    ns = netns_name or args.netns
    opts: dict[str, str] = {}
    if ns:
        opts["netns"] = ns
    if args.vici_socket:
        opts["vici_socket"] = args.vici_socket
    elif ns:
        from . import extensions

        opts.update({k: v for k, v in extensions.netns_options(ns).items() if k == "vici_socket"})
    return opts


def backend_name(args: Any) -> str | None:
    """``--backend``, else ``$BTNS_BACKEND``, else None (the default selection probes them all)."""
    return args.backend or os.environ.get("BTNS_BACKEND") or None


def open_backend(args: Any, netns_name: str | None = None) -> Backend:
    """``--backend`` (else $BTNS_BACKEND, else the first whose daemon answers) with the options.

    The default selection takes the first backend, in :func:`btns_vici.plugins.backends` order,
    whose daemon answers, and the built-in strongSwan backend comes first: when charon answers,
    that is the choice, made here without loading the entry points and probing the others (when
    it does not, the full selection decides, and says why). Raises CliError(BACKEND) when the
    chosen backend's daemon does not answer.
    """
    from ..core.errors import BackendError
    from ..plugins import get_backend

    opts = backend_options(args, netns_name)
    if backend_name(args) is None:
        first = get_backend(BUILTIN, opts)
        try:
            if first.probe():
                return first
        except BackendError:
            pass  # the full selection probes it again and reports the most specific failure
    backend = get_backend(args.backend, opts)
    if not backend.probe():
        raise exits.CliError(exits.BACKEND, f"backend {backend.name!r} does not answer ({options_text(opts)})")
    return backend


def list_sas(args: Any, **filters: str | None) -> tuple[list[IkeSA], Backend | None]:
    """The SAs of the backend the options select, and that backend when it had to be opened.

    When the built-in strongSwan backend is named (``--backend strongswan`` or ``$BTNS_BACKEND``),
    or none is and charon answers (the default selection's first choice, see :func:`open_backend`),
    the listing is what its ``btns_list_sas`` hook answers
    (:func:`btns_vici.strongswan.listing.list_records`, the same probe first) without loading the
    plugin manager, the entry points and every other backend: (sas, None). Otherwise (sas, the
    opened backend). ``filters`` (``ike``, ``ike_id``, ``child``, ``child_id``) narrow the
    built-in listing in charon; the caller still selects exactly.
    """
    name = backend_name(args)
    if name is not None and name != BUILTIN:
        backend = open_backend(args)
        return backend.list_sas(), backend
    from ..core.errors import BackendError, DaemonDownError
    from ..strongswan.listing import list_records, socket_path
    from ..strongswan.session import ViciSession, timeouts

    opts = backend_options(args)
    timeout, list_timeout, probe_timeout = timeouts(opts)
    session = ViciSession(socket_path(opts), timeout, list_timeout)
    try:
        try:
            session.request("version", timeout=probe_timeout)
        except BackendError as exc:
            if name is None:  # charon does not answer: the full default selection decides
                backend = open_backend(args)
                return backend.list_sas(), backend
            if isinstance(exc, DaemonDownError):
                raise exits.CliError(
                    exits.BACKEND, f"backend {BUILTIN!r} does not answer ({options_text(opts)})"
                ) from None
            raise
        f = filters.get
        return list_records(session, ike=f("ike"), ike_id=f("ike_id"), child=f("child"), child_id=f("child_id")), None
    finally:
        session.close()


def options_text(opts: Mapping[str, str]) -> str:
    """``netns=..., vici_socket=...`` for messages."""
    return ", ".join(f"{k}={v}" for k, v in sorted(opts.items())) or "default options"
