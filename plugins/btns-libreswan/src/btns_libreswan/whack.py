"""Run the ``whack`` binary against one pluto control socket. The only I/O of the backend.

whack's socket protocol is a C struct tied to pluto's exact version, so the
binary of the matching libreswan is run rather than the socket spoken directly.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

from btns_vici.errors import BackendError

DEFAULT_CTL = "/run/pluto/pluto.ctl"
_NOT_RUNNING = ("Pluto is not running", "No such file or directory", "Connection refused")


def _root_candidates() -> list[Path]:
    env = os.environ.get("BTNS_LIBRESWAN_ROOT")
    return ([Path(env)] if env else []) + [Path("/var/cache/btns-libreswan/root")]


def resolve(options: Mapping[str, str]) -> tuple[list[str], str, dict[str, str]]:
    """(whack argv prefix, ctl socket path, environment) from options, env and defaults.

    whack: ``options["whack"]``, ``$BTNS_WHACK``, ``whack``/``ipsec whack`` on PATH (only a
    libreswan ``ipsec``), else the extracted root's. ctl: ``options["pluto_ctl"]``,
    ``$BTNS_PLUTO_CTL``, else /run/pluto/pluto.ctl.
    """
    ctl = options.get("pluto_ctl") or os.environ.get("BTNS_PLUTO_CTL") or DEFAULT_CTL
    env = dict(os.environ)
    argv: list[str] | None = None
    explicit = options.get("whack") or os.environ.get("BTNS_WHACK")
    roots = [Path(options["libreswan_root"])] if options.get("libreswan_root") else _root_candidates()
    if explicit:
        argv = [explicit]
        binary = Path(explicit).resolve()
        if binary.parts[-4:-1] == ("usr", "libexec", "ipsec"):
            roots = [binary.parents[3]]  # an extracted root's whack needs its NSS libraries
    elif found := shutil.which("whack"):
        argv = [found]
    elif (ipsec := shutil.which("ipsec")) and _is_libreswan(Path(ipsec)):
        argv = [ipsec, "whack"]
    for root in roots:
        binary = root / "usr/libexec/ipsec/whack"
        if binary.exists() and (argv is None or Path(argv[0]).resolve() == binary.resolve()):
            libdir = str(root / "usr/lib/x86_64-linux-gnu")
            env["LD_LIBRARY_PATH"] = ":".join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
            argv = argv or [str(binary)]
            break
    if argv is None:
        raise BackendError("no libreswan whack: set BTNS_WHACK or install/fetch libreswan")
    return argv, ctl, env


def _is_libreswan(ipsec: Path) -> bool:
    try:
        return b"libreswan" in ipsec.read_bytes()[:65536].lower()
    except OSError:
        return False


def run(options: Mapping[str, str], *args: str, timeout: float = 10.0) -> str:
    """whack --ctlsocket CTL ARGS; stdout. BackendError when pluto does not answer."""
    argv, ctl, env = resolve(options)
    if not os.path.exists(ctl):
        raise BackendError(f"pluto is not running: no control socket {ctl}")
    try:
        out = subprocess.run([*argv, "--ctlsocket", ctl, *args], capture_output=True, text=True,
                             env=env, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BackendError(f"whack {' '.join(args)}: {exc}") from None
    if out.returncode != 0:
        text = (out.stderr + out.stdout).strip()
        if any(s in text for s in _NOT_RUNNING):
            raise BackendError(f"pluto does not answer on {ctl}: {text[:300]}")
        raise BackendError(f"whack {' '.join(args)} failed ({out.returncode}): {text[:300]}")
    return out.stdout


def showhostkey_pubkey(options: Mapping[str, str], ckaid: str, nssdir: str) -> str | None:
    """``showhostkey --left --pubkey --ckaid CKAID``: base64 SPKI of a key in pluto's NSS db, or None."""
    argv, _, env = resolve(options)
    tool = [*argv[:-1], "showhostkey"] if argv[-1] == "whack" else [str(Path(argv[0]).with_name("showhostkey"))]
    try:
        out = subprocess.run([*tool, "--nssdir", nssdir, "--left", "--pubkey", "--ckaid", ckaid],
                             capture_output=True, text=True, env=env, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"leftpubkey=(\S+)", out.stdout)
    return m.group(1) if out.returncode == 0 and m else None
