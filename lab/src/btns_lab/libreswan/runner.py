"""Run real pluto daemons from an extracted libreswan root, each in its own namespaces.

Debian's libreswan conflicts with strongSwan, so it is never installed: the
packages are unpacked into a private root (``scripts/fetch-libreswan.sh``).
pluto hard-codes ``/usr/libexec/ipsec/addconn``, so every pluto runs in a
private mount namespace with the root's ``/usr/libexec`` bound over the host's,
and in a network namespace named ``btns-lsw-...``. Every step execs, so the
Popen pid is pluto's own and :meth:`Pluto.stop` signals exactly that process.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from btns_vici.core.errors import BackendError

ROOT_ENV = "BTNS_LIBRESWAN_ROOT"
DEFAULT_CACHE = Path("/var/cache/btns-libreswan")
NS_PREFIX = "btns-lsw-"
#: in a checkout: lab/src/btns_lab/libreswan/ -> plugins/btns-libreswan/scripts/
_FETCH_SCRIPT = Path(__file__).resolve().parents[4] / "plugins" / "btns-libreswan" / "scripts" / "fetch-libreswan.sh"


def missing_prerequisites() -> list[str]:
    """What running plutos here lacks (root, tools); empty when nothing is missing."""
    problems = []
    if os.geteuid() != 0:
        problems.append("must run as root (network and mount namespaces)")
    for tool in ("ip", "unshare", "mount", "apt-get", "dpkg"):
        if shutil.which(tool) is None:
            problems.append(f"missing tool {tool!r}")
    return problems


def _complete(root: Path) -> bool:
    return (root / ".complete").exists() and (root / "usr/libexec/ipsec/pluto").exists()


def find_root(fetch: bool = False) -> Path:
    """The extracted libreswan root: ``$BTNS_LIBRESWAN_ROOT``, else the cache, fetched if asked."""
    env = os.environ.get(ROOT_ENV)
    if env:
        root = Path(env)
        if not (root / "usr/libexec/ipsec/pluto").exists():
            raise BackendError(f"{ROOT_ENV}={env} holds no usr/libexec/ipsec/pluto")
        return root
    root = DEFAULT_CACHE / "root"
    if _complete(root):
        return root
    if fetch and _FETCH_SCRIPT.exists():
        out = subprocess.run(
            ["sh", str(_FETCH_SCRIPT), str(DEFAULT_CACHE)], capture_output=True, text=True, check=False
        )
        if out.returncode == 0 and _complete(Path(out.stdout.strip())):
            return Path(out.stdout.strip())
        raise BackendError(f"fetch-libreswan.sh failed: {out.stderr.strip()[-500:]}")
    raise BackendError(f"no libreswan root: run {_FETCH_SCRIPT} or set {ROOT_ENV}")


def tool_env(root: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for running the root's binaries and ``ipsec`` helper scripts."""
    env = dict(os.environ if base is None else base)
    libdir = root / "usr/lib/x86_64-linux-gnu"
    env["LD_LIBRARY_PATH"] = ":".join(p for p in (str(libdir), env.get("LD_LIBRARY_PATH", "")) if p)
    env["IPSEC_EXECDIR"] = str(root / "usr/libexec/ipsec")
    env["IPSEC_SBINDIR"] = str(root / "usr/sbin")
    env["PATH"] = f"{root / 'usr/sbin'}:{root / 'usr/bin'}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
    return env


def _run(argv: list[str], env: Mapping[str, str] | None = None, check: bool = True) -> str:
    """Run a tool; its stdout and stderr together (libreswan's helpers print to either)."""
    out = subprocess.run(argv, capture_output=True, text=True, env=env, check=False, timeout=60)
    if check and out.returncode != 0:
        raise BackendError(f"{shlex.join(argv)} failed ({out.returncode}): {(out.stderr or out.stdout).strip()}")
    return out.stdout + out.stderr


# --- network namespaces -----------------------------------------------------------------


def netns_add(name: str) -> None:
    """Create network namespace ``name`` (must start with ``btns-lsw-``) with lo up."""
    if not name.startswith(NS_PREFIX):
        raise ValueError(f"namespace {name!r} must start with {NS_PREFIX!r}")
    _run(["ip", "netns", "add", name])
    _run(["ip", "-n", name, "link", "set", "lo", "up"])


def netns_del(name: str) -> None:
    """Delete a ``btns-lsw-`` namespace; missing ones are fine."""
    if name.startswith(NS_PREFIX):
        _run(["ip", "netns", "del", name], check=False)


def veth_link(ns_a: str, addr_a: str, ns_b: str, addr_b: str, tag: str) -> None:
    """A veth pair created directly inside the two namespaces, with /24 addresses, up."""
    la, lb = f"{NS_PREFIX}{tag}a"[:15], f"{NS_PREFIX}{tag}b"[:15]
    _run(["ip", "link", "add", la, "netns", ns_a, "type", "veth", "peer", "name", lb, "netns", ns_b])
    for ns, link, addr in ((ns_a, la, addr_a), (ns_b, lb, addr_b)):
        _run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", link])
        _run(["ip", "-n", ns, "link", "set", link, "up"])


# --- one pluto ----------------------------------------------------------------------------


@dataclass
class RsaKey:
    """A raw RSA host key in pluto's NSS database, with its two printable public forms."""

    ckaid: str
    rsasigkey: str  # libreswan's RFC 3110 form, "0sAwEAA..."
    pubkey: str  # base64 DER SubjectPublicKeyInfo, as ``leftpubkey=`` takes it


@dataclass
class Pluto:
    """One pluto with a private config, rundir and NSS database under ``workdir``.

    ``pluto.ctl`` is a filesystem socket, so whack reaches it from any namespace.
    """

    name: str
    netns: str
    workdir: Path
    root: Path = field(default_factory=find_root)
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        for sub in ("nss", "run", "ipsec.d", "dump"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)

    @property
    def nssdir(self) -> Path:
        return self.workdir / "nss"

    @property
    def ctl(self) -> Path:
        return self.workdir / "run" / "pluto.ctl"

    @property
    def conf(self) -> Path:
        return self.workdir / "ipsec.conf"

    @property
    def secrets(self) -> Path:
        return self.workdir / "ipsec.secrets"

    @property
    def log(self) -> Path:
        return self.workdir / "pluto.log"

    @property
    def env(self) -> dict[str, str]:
        env = tool_env(self.root)
        env["IPSEC_CONF"] = str(self.conf)
        return env

    def init_nss(self) -> None:
        """An empty NSS database without a password (certutil from libnss3-tools)."""
        if not (self.nssdir / "cert9.db").exists():
            _run([str(self.root / "usr/bin/certutil"), "-N", "-d", f"sql:{self.nssdir}", "--empty-password"], self.env)

    def new_rsa_key(self, bits: int | None = None) -> RsaKey:
        """``ipsec newhostkey`` (pluto's default size, or ``bits`` >= 2192) then ``ipsec showhostkey``."""
        self.init_nss()
        ipsec = str(self.root / "usr/sbin/ipsec")
        size = ["--bits", str(bits)] if bits else []
        out = _run([ipsec, "newhostkey", "--nssdir", str(self.nssdir), *size], self.env)
        m = re.search(r"CKAID ([0-9a-f]{40})", out)
        if not m:
            raise BackendError(f"newhostkey printed no CKAID: {out!r}")
        ckaid = m.group(1)
        shown = _run([ipsec, "showhostkey", "--nssdir", str(self.nssdir), "--left", "--ckaid", ckaid], self.env)
        pub = _run(
            [ipsec, "showhostkey", "--nssdir", str(self.nssdir), "--left", "--pubkey", "--ckaid", ckaid], self.env
        )
        rsa = re.search(r"leftrsasigkey=(0s\S+)", shown)
        spki = re.search(r"leftpubkey=(\S+)", pub)
        if not rsa or not spki:
            raise BackendError(f"showhostkey output not understood: {shown!r} {pub!r}")
        return RsaKey(ckaid, rsa.group(1), spki.group(1))

    def write_config(self, conns: str, secrets: str = "", setup: str = "") -> None:
        """ipsec.conf with a private ``config setup`` followed by ``conns``; ipsec.secrets."""
        head = (
            "config setup\n"
            f"\tnssdir={self.nssdir}\n"
            f"\tipsecdir={self.workdir / 'ipsec.d'}\n"
            f"\tsecretsfile={self.secrets}\n"
            f"\tdumpdir={self.workdir / 'dump'}\n"
            f"\tlogfile={self.log}\n"
            "\tlogtime=no\n"
            f"{setup}\n"
        )
        self.conf.write_text(head + conns)
        self.secrets.write_text(secrets)
        self.secrets.chmod(0o600)

    def start(self, timeout: float = 10.0) -> None:
        """Start pluto in ``netns`` + a private mount namespace; wait until whack answers."""
        self.init_nss()
        pluto = self.root / "usr/libexec/ipsec/pluto"
        inner = (
            f"mount --bind {shlex.quote(str(self.root / 'usr/libexec'))} /usr/libexec && "
            f"exec {shlex.quote(str(pluto))} --config {shlex.quote(str(self.conf))} "
            f"--rundir {shlex.quote(str(self.workdir / 'run'))} --nofork"
        )
        argv = ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--propagation", "private", "sh", "-c", inner]
        out = open(self.workdir / "pluto.stderr", "wb")
        self.proc = subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BackendError(f"pluto {self.name} exited {self.proc.returncode}: {self.tail()}")
            if self.ctl.exists() and self.whack("--listen", check=False)[0] == 0:
                return
            time.sleep(0.05)
        raise BackendError(f"pluto {self.name} did not answer within {timeout}s: {self.tail()}")

    def whack(self, *args: str, check: bool = True) -> tuple[int, str]:
        """Run the root's whack against this pluto; (returncode, stdout+stderr)."""
        argv = [str(self.root / "usr/libexec/ipsec/whack"), "--ctlsocket", str(self.ctl), *args]
        out = subprocess.run(argv, capture_output=True, text=True, env=self.env, check=False, timeout=60)
        text = out.stdout + out.stderr
        if check and out.returncode != 0:
            raise BackendError(f"whack {' '.join(args)} failed ({out.returncode}): {text.strip()}")
        return out.returncode, text

    def tail(self, n: int = 4000) -> str:
        """The end of pluto's log and stderr, for error messages."""
        parts = []
        for p in (self.log, self.workdir / "pluto.stderr"):
            if p.exists():
                parts.append(p.read_text(errors="replace")[-n:])
        return "\n".join(parts)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM exactly our pluto (the Popen pid), SIGKILL it if it lingers."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


# --- two plutos on one veth link ----------------------------------------------------------------


@dataclass
class PlutoPair:
    """Two plutos ("a" and "b") in namespaces ``btns-lsw-<tag>a``/``b`` joined by one veth.

    Address pair ``i`` is 10.231.i.1 (a) <-> 10.231.i.2 (b); pair 0 is on the link, the
    others are added to it, so each conn can use its own host pair.
    """

    tag: str
    workdir: Path
    pairs: int = 1
    a: Pluto | None = None
    b: Pluto | None = None

    @property
    def namespaces(self) -> tuple[str, str]:
        return f"{NS_PREFIX}{self.tag}a", f"{NS_PREFIX}{self.tag}b"

    @staticmethod
    def addr(pair: int, side: str) -> str:
        return f"10.231.{pair}.{1 if side == 'a' else 2}"

    def setup(self) -> tuple[Pluto, Pluto]:
        """Namespaces, link, addresses and the two (not yet started) plutos."""
        ns_a, ns_b = self.namespaces
        self.teardown()
        netns_add(ns_a)
        netns_add(ns_b)
        veth_link(ns_a, self.addr(0, "a"), ns_b, self.addr(0, "b"), self.tag)
        for i in range(1, self.pairs):
            for ns, side in ((ns_a, "a"), (ns_b, "b")):
                link = f"{NS_PREFIX}{self.tag}{side}"[:15]
                _run(["ip", "-n", ns, "addr", "add", f"{self.addr(i, side)}/24", "dev", link])
        root = find_root(fetch=True)
        self.a = Pluto("a", ns_a, Path(self.workdir) / "a", root)
        self.b = Pluto("b", ns_b, Path(self.workdir) / "b", root)
        return self.a, self.b

    def teardown(self) -> None:
        """Stop both plutos (by pid) and delete the namespaces (the veth goes with them)."""
        for p in (self.a, self.b):
            if p is not None:
                p.stop()
        for ns in self.namespaces:
            netns_del(ns)


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds pass; its last answer."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
