"""Telling "the daemon is down" (exit 3) from "you may not talk to it" (exit 4).

A backend's probe only says whether its daemon answers. When it does not and we are not root,
the usual reason is the control socket's mode (charon's VICI socket is ``srwxrwx--- root``):
connect to each candidate socket ourselves and report EACCES/EPERM as a permission problem.
"""

from __future__ import annotations

import argparse
import os
import socket

#: Default control sockets, with the environment variables the backends read them from.
DEFAULTS = (("BTNS_VICI_SOCKET", "/var/run/charon.vici"), ("BTNS_PLUTO_CTL", "/run/pluto/pluto.ctl"))


def candidate_sockets(args: argparse.Namespace) -> list[str]:
    paths = []
    explicit = getattr(args, "vici_socket", None)
    if not explicit and getattr(args, "netns", None):
        try:
            from .context import backend_options

            explicit = backend_options(args).get("vici_socket")
        except OSError:
            explicit = None
    if explicit:
        paths.append(explicit)
    for env, default in DEFAULTS:
        path = os.environ.get(env) or default
        if path not in paths:
            paths.append(path)
    return paths


def refused(path: str) -> OSError | None:
    """The PermissionError of connecting to ``path`` (or of reaching it), None otherwise."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(1.0)
    try:
        sock.connect(path)
    except PermissionError as exc:
        return exc
    except OSError:
        return None
    finally:
        sock.close()
    return None


def diagnose(args: argparse.Namespace) -> str | None:
    """A message when a daemon's control socket exists but refuses us, else None."""
    if os.geteuid() == 0:
        return None
    for path in candidate_sockets(args):
        exc = refused(path)
        if exc is not None:
            return (
                f"permission denied on the IKE daemon's control socket {path} "
                f"({exc.strerror}): run as root or get access to that socket"
            )
    return None
