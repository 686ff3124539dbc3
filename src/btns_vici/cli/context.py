"""The global options of ``btns`` -> backend options and a selected backend."""

from __future__ import annotations

import argparse
from collections.abc import Mapping

from ..backend import Backend
from ..plugins import get_backend
from . import exits, extensions


def backend_options(args: argparse.Namespace, netns_name: str | None = None) -> dict[str, str]:
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
        opts.update({k: v for k, v in extensions.netns_options(ns).items() if k == "vici_socket"})
    return opts


def open_backend(args: argparse.Namespace, netns_name: str | None = None) -> Backend:
    """``--backend`` (else $BTNS_BACKEND, else the first whose daemon answers) with the options.

    Raises CliError(BACKEND) when its daemon does not answer.
    """
    opts = backend_options(args, netns_name)
    backend = get_backend(args.backend, opts)
    if not backend.probe():
        raise exits.CliError(exits.BACKEND, f"backend {backend.name!r} does not answer ({options_text(opts)})")
    return backend


def options_text(opts: Mapping[str, str]) -> str:
    """``netns=..., vici_socket=...`` for messages."""
    return ", ".join(f"{k}={v}" for k, v in sorted(opts.items())) or "default options"
