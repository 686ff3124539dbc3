"""Run the ``whack`` binary against one pluto control socket. The only I/O of the backend.

whack's socket protocol is a C struct tied to pluto's exact version, so the
binary of the matching libreswan is run rather than the socket spoken directly.
"""

from __future__ import annotations

import os
import re
import selectors
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from btns_vici.core.errors import (
    BackendError,
    BtnsError,
    CommandFailedError,
    DaemonAccessError,
    DaemonDownError,
    DaemonTimeoutError,
    ProtocolError,
    access_problem,
)

DEFAULT_CTL = "/run/pluto/pluto.ctl"
_NOT_RUNNING = ("Pluto is not running", "No such file or directory", "Connection refused")
_DENIED = ("Permission denied",)
#: Output of one whack call kept at most (stdout and stderr together): ``--status`` of a pluto
#: with thousands of connections is a few MB; more is refused (EPROTO) and whack killed.
MAX_OUTPUT = 8 << 20


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


def bounded(
    argv: Sequence[str], env: Mapping[str, str] | None, timeout: float, limit: int = MAX_OUTPUT
) -> tuple[int, str, str]:
    """Run ``argv``: (exit status, stdout, stderr), reading at most ``limit`` bytes of output in
    ``timeout`` seconds for the whole run. Over either, the process is killed and reaped, and
    DaemonTimeoutError (ETIMEDOUT) / ProtocolError (EPROTO) raised. Output is decoded as UTF-8
    with replacement (whack prints names the operator chose)."""
    deadline = time.monotonic() + timeout
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(env) if env is not None else None,
    )
    assert proc.stdout is not None and proc.stderr is not None  # both are pipes
    pipes = (proc.stdout, proc.stderr)
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    bufs = {out_fd: bytearray(), err_fd: bytearray()}
    total = 0
    sel = selectors.DefaultSelector()
    try:
        for f in pipes:
            os.set_blocking(f.fileno(), False)
            sel.register(f, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                raise DaemonTimeoutError(f"{argv[0]} {' '.join(argv[1:3])}: no complete answer within {timeout:g} s")
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                total += len(chunk)
                if total > limit:
                    raise ProtocolError(f"{argv[0]}: more than {limit} bytes of output, refused")
                bufs[key.fd] += chunk
        left = max(deadline - time.monotonic(), 0.0)
        try:
            code = proc.wait(left)
        except subprocess.TimeoutExpired:
            raise DaemonTimeoutError(f"{argv[0]}: did not exit within {timeout:g} s") from None
    finally:
        sel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in pipes:
            f.close()
    return code, bufs[out_fd].decode(errors="replace"), bufs[err_fd].decode(errors="replace")


def run(options: Mapping[str, str], *args: str, timeout: float | None = None) -> str:
    """whack --ctlsocket CTL ARGS; stdout, within one deadline and :data:`MAX_OUTPUT`.

    ``timeout`` defaults to option ``whack_timeout`` (else ``$BTNS_WHACK_TIMEOUT``, else 10 s).
    No pluto there: DaemonDownError (ECONNREFUSED); not allowed to open its socket:
    DaemonAccessError (EACCES); too slow: DaemonTimeoutError (ETIMEDOUT); too much output:
    ProtocolError (EPROTO); whack reporting failure: CommandFailedError (EIO).
    """
    argv, ctl, env = resolve(options)
    if timeout is None:
        timeout = whack_timeout(options)
    if not os.path.exists(ctl):
        raise DaemonDownError(f"pluto is not running: no control socket {ctl}")
    if not os.access(ctl, os.W_OK, effective_ids=True):
        raise DaemonAccessError(f"not allowed to open pluto's control socket {ctl}: {access_problem(ctl)}")
    try:
        code, stdout, stderr = bounded([*argv, "--ctlsocket", ctl, *args], env, timeout)
    except OSError as exc:
        if isinstance(exc, BackendError):
            raise
        raise BackendError(f"whack {' '.join(args)}: {exc}") from None
    if code != 0:
        text = (stderr + stdout).strip()
        if any(s in text for s in _DENIED):
            raise DaemonAccessError(f"not allowed to open pluto's control socket {ctl}: {access_problem(ctl)}")
        if any(s in text for s in _NOT_RUNNING):
            raise DaemonDownError(f"pluto does not answer on {ctl}: {text[:300]}")
        raise CommandFailedError(f"whack {' '.join(args)} failed ({code}): {text[:300]}")
    return stdout


def whack_timeout(options: Mapping[str, str]) -> float:
    raw = options.get("whack_timeout") or os.environ.get("BTNS_WHACK_TIMEOUT")
    if not raw:
        return 10.0
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise BtnsError(f"whack_timeout must be a positive number of seconds, not {raw!r}")
    return value


def showhostkey_pubkey(options: Mapping[str, str], ckaid: str, nssdir: str) -> str | None:
    """``showhostkey --left --pubkey --ckaid CKAID``: base64 SPKI of a key in pluto's NSS db, or None."""
    argv, _, env = resolve(options)
    tool = [*argv[:-1], "showhostkey"] if argv[-1] == "whack" else [str(Path(argv[0]).with_name("showhostkey"))]
    try:
        out = subprocess.run(
            [*tool, "--nssdir", nssdir, "--left", "--pubkey", "--ckaid", ckaid],
            capture_output=True,
            text=True,
            env=env,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"leftpubkey=(\S+)", out.stdout)
    return m.group(1) if out.returncode == 0 and m else None
