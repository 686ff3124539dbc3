"""The ``libreswan`` backend: pluto over the ``whack`` binary, as a btns_vici pluggy plugin.

Options (each also from the environment):

* ``pluto_ctl`` (``BTNS_PLUTO_CTL``): pluto's control socket, default /run/pluto/pluto.ctl.
* ``whack`` (``BTNS_WHACK``): the whack binary; default ``whack``/``ipsec whack`` on PATH or
  the extracted root's (``libreswan_root``, ``BTNS_LIBRESWAN_ROOT``, /var/cache/btns-libreswan/root).
* ``ipsec_conf`` (``BTNS_IPSEC_CONF``): the config whose ``rightrsasigkey``/``rightpubkey`` give
  peers' raw keys; default: the ``configfile=`` pluto reports in ``--status``.
* ``nssdir``: pluto's NSS database, for ``leftckaid=`` keys; default: from ``--status``.
* ``netns``: the network namespace whose kernel XFRM proves the data plane.
* ``ike``, ``timeout``, ``ckaid``, ``conf_dir``: for conns built from pTokens (see :mod:`.enforce`).
* ``poll_interval``: seconds between ``--showstates`` polls of :meth:`btns_watch` (default 0.5).
* ``known_peers`` (``BTNS_KNOWN_PEERS``), ``key_dir``: NULL-authenticated SAs noted in the
  known-peers store (:mod:`.nullpeers`; default on).

pluto has no event stream, so every answer is read fresh from pluto (~2 ms a whack call):
:meth:`btns_find_sa` can never answer from stale state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from btns_vici.backend import BackendInfo, Capabilities, Enforcement, SAEvent
from btns_vici.backendkit import find_in, verify_dataplane
from btns_vici.core.constants import AuthMethod
from btns_vici.core.errors import BackendError
from btns_vici.core.records import XFRM, ChildSA, DataplaneProof, IkeSA, NotCarried, SocketView
from btns_vici.core.selectors import Flow
from btns_vici.core.tokens import PToken
from btns_vici.hookspecs import hookimpl

from . import enforce, whack
from .normalize import BACKEND
from .parse import parse_status
from .sas import list_sas
from .watch import watch


class LibreswanBackend:
    """The pluggy plugin object (entry point ``libreswan = btns_libreswan.plugin:plugin``)."""

    @hookimpl
    def btns_backend_info(self) -> BackendInfo:
        return BackendInfo(BACKEND, "pluto (libreswan)", "libreswan's pluto through the whack binary")

    @hookimpl
    def btns_probe(self, options: Mapping[str, str]) -> bool:
        try:
            whack.run(options, "--trafficstatus", timeout=3)
        except BackendError:
            return False
        return True

    @hookimpl
    def btns_capabilities(self, options: Mapping[str, str]) -> Capabilities:
        status = whack.run(options, "--status")
        parse_status(status)  # raises ProtocolError on nonsense
        dataplane = XFRM if "kernel interface: xfrm" in status else "unknown"
        methods = frozenset({AuthMethod.BTNS, AuthMethod.PRESHAREDKEY, AuthMethod.PKIX_TRUSTED, AuthMethod.EAP})
        return Capabilities(
            auth_methods=methods,
            modes=frozenset({"TUNNEL", "TRANSPORT"}),
            dataplane=dataplane,
            enforce=dataplane == XFRM,
        )

    @hookimpl
    def btns_list_sas(self, options: Mapping[str, str]) -> list[IkeSA]:
        return list_sas(options)

    @hookimpl
    def btns_find_sa(self, options: Mapping[str, str], flow: Flow) -> tuple[IkeSA, ChildSA] | None:
        return find_in(list_sas(options), flow)

    @hookimpl
    def btns_verify_dataplane(
        self, options: Mapping[str, str], flow: Flow, ike_sa: IkeSA, child_sa: ChildSA, view: SocketView
    ) -> DataplaneProof | NotCarried | None:
        return verify_dataplane(BACKEND, view, ike_sa, child_sa, XFRM, options.get("netns") or None)

    @hookimpl
    def btns_enforce(self, options: Mapping[str, str], sock: Any, ptoken: PToken) -> Enforcement:
        return enforce.enforce(sock, ptoken)

    @hookimpl
    def btns_establish(self, options: Mapping[str, str], flow: Flow, ptoken: PToken) -> str:
        return enforce.establish(options, flow, ptoken)

    @hookimpl
    def btns_serve(self, options: Mapping[str, str], local_addr: Any, ptoken: PToken) -> str:
        return enforce.serve(options, local_addr, ptoken)

    @hookimpl
    def btns_watch(self, options: Mapping[str, str], callback: Callable[[SAEvent], None]) -> Callable[[], None]:
        return watch(options, callback)


plugin = LibreswanBackend()

__all__ = ["LibreswanBackend", "find_in", "list_sas", "plugin"]
