"""The two-peer demo on the compose testbed (docker/docker-compose.yml).

The same demo as :mod:`btns_vici.demo`, with each peer in its own container:

* on the host, this module takes the compose testbed's lock, brings the testbed up with
  ``BTNS_CONN=no`` (each container runs charon only; the library makes every connection)
  through ``scripts/compose/up.sh`` (podman + podman-compose) or ``docker compose``,
  runs the two peer programs below inside the containers, prints both ends' pTokens and
  iTokens with the agreement checks of the netns demo, and takes the testbed down
  (unless ``--keep``). Exit 0 only when every check passes.
* inside the containers (``python -m btns_vici.compose_demo peer server|client``): each
  end has a host key made on first use in ``/var/lib/btns-vici`` (:mod:`btns_vici.hostkey`),
  publishes its public half on the shared volume and uses the directory holding the
  peer's as its peer-key directory (BTNS: raw keys exchanged out of band). bob's
  listening socket and alice's socket get a pToken demanding encryption (privacy at
  least LEVEL_MEDIUM) and BTNS (``set_socket_ptoken``); ``listen``/``accept``/``connect``
  have charon negotiate and verify the SA. Each end prints its pToken as one JSON line.

The data plane is ``$BTNS_DATAPLANE`` (``xfrm``: kernel ESP, transport mode;
``libipsec``: userspace ESP, tunnel mode); by default ``xfrm`` when the host kernel can do
ESP, else ``libipsec``.

Exit codes: 0 every check passed; 1 a check or the connection failed; 2 the demo cannot run
here (not root, no TUN, no checkout, no usable engine); 3 the compose testbed did not come up.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .core.constants import Attr
from .core.selectors import TrafficSelector
from .core.tokens import IToken, PToken

PROJECT = os.environ.get("BTNS_COMPOSE_PROJECT", "btns-cmp")
CACHE = os.environ.get("BTNS_COMPOSE_CACHE", "/var/cache/btns-compose")
PEERS = {"alice": "172.31.250.10", "bob": "172.31.250.11"}
SERVER, CLIENT = "bob", "alice"
PORT = 7777
MESSAGE = b"hello over IPsec"
#: In the containers: the library's host key directory, and the key exchange on the shared volume.
KEY_DIR = "/var/lib/btns-vici"
EXCHANGE = "/shared/btns-demo"
ENGINES = ("podman", "docker")
#: Exit codes besides 0 (every check passed) and 1 (a check or the connection failed).
CANNOT_RUN = 2  # not root, no TUN, no checkout, no usable engine, bad option
TESTBED_DOWN = 3  # the compose testbed could not be brought up (build, start, charons)
DATAPLANES = ("xfrm", "libipsec")


class DemoError(Exception):
    """The demo cannot run or failed; the message says why."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# ====================================================================================================
# Tokens as JSON (container -> host)
# ====================================================================================================


def ptoken_to_json(p: PToken) -> dict[str, Any]:
    """Every attribute of a pToken (iTokens in their serialized form) and its traffic selectors."""
    attrs: dict[str, Any] = {}
    for attr, value in p.attributes().items():
        attrs[attr.name] = {"itoken": value.to_bytes().hex()} if isinstance(value, IToken) else value
    return {
        "attributes": attrs,
        "local_ts": [_ts_to_json(ts) for ts in p.local_ts],
        "remote_ts": [_ts_to_json(ts) for ts in p.remote_ts],
    }


def ptoken_from_json(data: Mapping[str, Any]) -> PToken:
    """The pToken that :func:`ptoken_to_json` described."""
    p = PToken()
    for name, value in data["attributes"].items():
        if isinstance(value, dict):
            value = IToken.from_bytes(bytes.fromhex(value["itoken"]))
        p._set_internal(Attr[name], value)
    p.local_ts = tuple(_ts_from_json(ts) for ts in data["local_ts"])
    p.remote_ts = tuple(_ts_from_json(ts) for ts in data["remote_ts"])
    return p


def _ts_to_json(ts: TrafficSelector) -> list[Any]:
    return [str(ts.start), str(ts.end), ts.proto, ts.port_lo, ts.port_hi]


def _ts_from_json(v: Sequence[Any]) -> TrafficSelector:
    return TrafficSelector(ipaddress.ip_address(v[0]), ipaddress.ip_address(v[1]), int(v[2]), int(v[3]), int(v[4]))


# ====================================================================================================
# Inside a container: one end of the connection
# ====================================================================================================


def _emit(**record: Any) -> None:
    print(json.dumps(record), flush=True)


def _emit_tokens(role: str, name: str, host_key: bytes, sock: socket.socket, received: bytes, be: Any) -> None:
    """One end's verified tokens, as the host side reads them."""
    from .api import get_socket_ptoken

    _emit(
        event="tokens",
        role=role,
        name=name,
        host_key=host_key.hex(),
        socket=list(sock.getsockname()[:2]),
        received=received.decode(errors="replace"),
        ptoken=ptoken_to_json(get_socket_ptoken(sock, be)),
    )


def _publish(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # no .pem suffix: never read as a key
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _await(path: Path, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise DemoError(f"{what} did not appear at {path} within {timeout:.0f} s")
        time.sleep(0.05)


def peer_main(role: str, name: str, peer: str, timeout: float) -> int:
    """One end inside its container; prints JSON lines (events, then its tokens or an error)."""
    from .api import accept, connect, listen, set_socket_ptoken
    from .demo import btns_demand
    from .hostkey import load_or_create
    from .plugins import get_backend

    try:
        host = load_or_create(KEY_DIR)
        exchange = Path(EXCHANGE)
        mine, theirs = exchange / name, exchange / peer
        mine.mkdir(parents=True, exist_ok=True)
        _publish(mine / f"{name}.pem", host.public_pem)
        _await(theirs / f"{peer}.pem", timeout, f"{peer}'s public key")
        be = get_backend("strongswan", {"key_dir": KEY_DIR, "peer_keys": str(theirs)})
        _emit(event="keys", host_key=host.public_der.hex(), key_dir=KEY_DIR, peer_keys=str(theirs))
        addr, peer_addr = PEERS[name], PEERS[peer]
        if role == "server":
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as srv:
                srv.settimeout(timeout)
                srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                set_socket_ptoken(srv, btns_demand(), be)
                srv.bind((addr, PORT))
                listen(srv, 1, be)
                _publish(mine / "listening", b"")
                _emit(event="listening", address=[addr, PORT])
                conn, _ = accept(srv, be, latch_=False)
                with conn:
                    conn.settimeout(timeout)
                    received = conn.recv(64)
                    conn.sendall(received[::-1])
                    _emit_tokens(role, name, host.public_der, conn, received, be)
                    conn.recv(1)  # until the client closes
        else:
            _await(theirs / "listening", timeout, f"{peer}'s listening socket")
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as cli:
                cli.settimeout(timeout)
                set_socket_ptoken(cli, btns_demand(), be)
                connect(cli, (peer_addr, PORT), be, latch_=False)
                cli.sendall(MESSAGE)
                echo = cli.recv(64)
                _emit_tokens(role, name, host.public_der, cli, echo, be)
    except (OSError, DemoError) as exc:
        _emit(event="error", error=f"{type(exc).__name__}: {exc}")
        return 1
    return 0


# ====================================================================================================
# On the host: the engine, the testbed, the two ends
# ====================================================================================================


def repo_root() -> Path | None:
    """The checkout holding docker/ and scripts/compose/ (this module in src/btns_vici of it)."""
    env = os.environ.get("BTNS_REPO")
    for root in ([Path(env)] if env else []) + [Path(__file__).resolve().parents[2]]:
        if (root / "docker" / "docker-compose.yml").is_file() and (root / "scripts" / "compose" / "up.sh").is_file():
            return root
    return None


def _run(argv: Sequence[str], env: Mapping[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, env=dict(env), timeout=timeout, check=False)
    except FileNotFoundError as exc:
        return subprocess.CompletedProcess(list(argv), 127, "", str(exc))
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(list(argv), 124, "", f"{argv[0]}: timed out after {exc.timeout:.0f} s")


def kernel_has_esp() -> bool:
    """Whether this kernel can do ESP: esp4 loaded, or an ESP SA can be added (in a throwaway netns,
    which also loads esp4 where it is a module)."""
    if Path("/sys/module/esp4").exists():
        return True
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    probe = [
        "unshare",
        "--net",
        "ip",
        "xfrm",
        "state",
        "add",
        "src",
        "192.0.2.1",
        "dst",
        "192.0.2.2",
        "proto",
        "esp",
        "spi",
        "0x0b75",
        "mode",
        "transport",
        "aead",
        "rfc4106(gcm(aes))",
        "0x000102030405060708090a0b0c0d0e0f10111213",
        "128",
    ]
    return _run(probe, os.environ, timeout=20).returncode == 0


def default_dataplane() -> str:
    return os.environ.get("BTNS_DATAPLANE") or ("xfrm" if kernel_has_esp() else "libipsec")


@dataclass
class Engine:
    """podman (with podman-compose through scripts/compose/) or docker (with ``docker compose``)."""

    name: str
    repo: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def compose_file(self) -> Path:
        return self.repo / "docker" / "docker-compose.yml"

    def script(self, name: str) -> str:
        return str(self.repo / "scripts" / "compose" / name)

    def problem(self) -> str | None:
        """Why this engine cannot run the testbed here, or None."""
        if shutil.which(self.name) is None:
            return f"{self.name} is not installed"
        if self.name == "podman":
            check = _run([self.script("setup.sh"), "--check"], self.env, timeout=120)
            if check.returncode != 0:
                return (check.stderr.strip() or check.stdout.strip()) + "\n(run scripts/compose/setup.sh)"
            info = _run(["podman", "info"], self.env, timeout=120)
            if info.returncode != 0:
                return f"podman does not work here: {info.stderr.strip()[-400:]}"
        else:
            version = _run(["docker", "compose", "version"], self.env, timeout=60)
            if version.returncode != 0:
                return f"docker has no compose plugin (`docker compose version`: {version.stderr.strip()[-300:]})"
            info = _run(["docker", "info"], self.env, timeout=60)
            if info.returncode != 0:
                return f"the docker engine does not answer: {info.stderr.strip()[-300:]}"
        return None

    def _compose(self, *args: str) -> list[str]:
        return ["docker", "compose", "-p", PROJECT, "-f", str(self.compose_file), *args]

    def up(self, build: bool, timeout: float) -> subprocess.CompletedProcess[str]:
        if self.name == "podman":
            return _run([self.script("up.sh"), *([] if build else ["--no-build"])], self.env, timeout)
        return _run(self._compose("up", "-d", *(["--build"] if build else [])), self.env, timeout)

    def down(self) -> subprocess.CompletedProcess[str]:
        if self.name == "podman":
            return _run([self.script("down.sh")], self.env, timeout=300)
        return _run(self._compose("down", "--volumes", "--timeout", "5"), self.env, timeout=300)

    def container(self, service: str, stopped_too: bool = False) -> str | None:
        """The id of the service's running container (or of a stopped one too), or None."""
        out = _run(
            [
                self.name,
                "ps",
                "-q",
                *(["-a"] if stopped_too else []),
                "--filter",
                f"label=com.docker.compose.project={PROJECT}",
                "--filter",
                f"label=com.docker.compose.service={service}",
            ],
            self.env,
            timeout=60,
        )
        ids = out.stdout.split()
        return ids[0] if ids else None

    def exec_argv(self, service: str, *argv: str) -> list[str]:
        cid = self.container(service)
        if cid is None:
            raise DemoError(f"no running container for {service} (project {PROJECT})")
        return [self.name, "exec", cid, *argv]

    def exec(self, service: str, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return _run(self.exec_argv(service, *argv), self.env, timeout)

    def logs(self, service: str, tail: int = 30) -> str:
        cid = self.container(service, stopped_too=True)
        if cid is None:
            return f"(no container for {service})"
        res = _run([self.name, "logs", "--tail", str(tail), cid], self.env, timeout=60)
        return (res.stdout + res.stderr).strip()


def make_engine(name: str, repo: Path, dataplane: str) -> Engine:
    env = {
        **os.environ,
        "BTNS_COMPOSE_PROJECT": PROJECT,
        "BTNS_DATAPLANE": dataplane,
        "BTNS_AUTH": "pubkey",
        "BTNS_CONN": "no",
    }
    if name == "podman":  # the engine settings scripts/compose/setup.sh writes (runc, ulimits)
        env.setdefault("CONTAINERS_CONF", f"{CACHE}/containers.conf")
    return Engine(name, repo, env)


def choose_engine(repo: Path, dataplane: str, wanted: str | None) -> Engine:
    """``wanted`` (or ``$BTNS_ENGINE``), else podman when usable, else docker; DemoError when none is."""
    wanted = wanted or os.environ.get("BTNS_ENGINE") or None
    if wanted is not None and wanted not in ENGINES:
        raise DemoError(f"unknown container engine {wanted!r} (podman or docker)", CANNOT_RUN)
    problems = []
    for name in (wanted,) if wanted else ENGINES:
        engine = make_engine(name, repo, dataplane)
        problem = engine.problem()
        if problem is None:
            return engine
        problems.append(f"{name}: {problem}")
    raise DemoError("no usable container engine:\n  " + "\n  ".join(problems), CANNOT_RUN)


@contextlib.contextmanager
def testbed_lock(timeout: float, out: TextIO) -> Iterator[None]:
    """One compose testbed per host at a time (the same lock as tests/compose)."""
    Path(CACHE).mkdir(parents=True, exist_ok=True)
    with open(f"{CACHE}/{PROJECT}.lock", "w") as lock:
        deadline = time.monotonic() + timeout
        said = False
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not said:
                    print(f"waiting for another compose testbed run to finish (lock {lock.name})", file=out)
                    said = True
                if time.monotonic() > deadline:
                    raise DemoError(f"another run has held {lock.name} for {timeout:.0f} s", TESTBED_DOWN) from None
                time.sleep(1)
        yield


def preflight() -> str | None:
    if os.geteuid() != 0:
        return "the compose demo needs root (rootful containers with NET_ADMIN): run it as root"
    if not Path("/dev/net/tun").exists():
        return "/dev/net/tun is missing (the containers' kernel-libipsec needs TUN)"
    return None


def _wait_for_charons(engine: Engine, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for service in (SERVER, CLIENT):
        while True:
            cid = engine.container(service)
            if (
                cid is not None
                and _run([engine.name, "exec", cid, "swanctl", "--stats"], engine.env, 30).returncode == 0
            ):
                break
            if cid is None and engine.container(service, stopped_too=True) is not None:
                raise DemoError(f"{service}'s container stopped", TESTBED_DOWN)
            if time.monotonic() > deadline:
                raise DemoError(f"{service}'s charon did not answer within {timeout:.0f} s", TESTBED_DOWN)
            time.sleep(0.2)


def _records(text: str) -> list[dict[str, Any]]:
    found = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if isinstance(rec, dict) and "event" in rec:
                found.append(rec)
    return found


def _tokens(name: str, proc: subprocess.Popen[str], out: str, err: str) -> dict[str, Any]:
    recs = _records(out)
    for rec in recs:
        if rec["event"] == "error":
            raise DemoError(f"{name}: {rec['error']}")
    for rec in recs:
        if rec["event"] == "tokens":
            return rec
    raise DemoError(f"{name} reported no tokens (exit {proc.returncode}):\n{out.strip()}\n{err.strip()}")


def run_ends(engine: Engine, timeout: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Start bob's server, then alice's client, in their containers; their token records."""
    argv = ["python", "-m", "btns_vici.compose_demo", "peer"]
    server = subprocess.Popen(
        engine.exec_argv(SERVER, *argv, "server", "--name", SERVER, "--peer", CLIENT, "--timeout", str(timeout)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=engine.env,
    )
    client = subprocess.Popen(
        engine.exec_argv(CLIENT, *argv, "client", "--name", CLIENT, "--peer", SERVER, "--timeout", str(timeout)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=engine.env,
    )
    results: dict[str, tuple[str, str]] = {}
    try:
        for name, proc in ((CLIENT, client), (SERVER, server)):
            if name == SERVER and client.returncode != 0:
                proc.kill()  # the client gave up: do not wait for the server's accept() to time out
            try:
                results[name] = proc.communicate(timeout=timeout + 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                results[name] = proc.communicate()
    finally:
        for proc in (server, client):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    try:
        return _tokens(CLIENT, client, *results[CLIENT]), _tokens(SERVER, server, *results[SERVER])
    except DemoError as exc:
        raise DemoError(
            f"{exc}\n" + "\n".join(f"--- {name}'s program ---\n{(o + e).strip()}" for name, (o, e) in results.items())
        ) from None


def run(
    out: TextIO = sys.stdout,
    keep: bool = False,
    build: bool = True,
    engine_name: str | None = None,
    dataplane: str | None = None,
    timeout: float = 60.0,
    lock_timeout: float = 1800.0,
) -> int:
    """Bring up the compose testbed, connect with demanded protection, print and compare both ends' tokens."""
    from .demo import agreement_checks, describe_ptoken, print_checks

    problem = preflight()
    repo = repo_root()
    if problem is None and repo is None:
        problem = "the compose demo runs from a checkout of btns-vici (docker/, scripts/compose/ not found)"
    if problem:
        print(f"btns compose demo: {problem}", file=sys.stderr)
        return CANNOT_RUN
    assert repo is not None
    dataplane = dataplane or default_dataplane()
    if dataplane not in DATAPLANES:
        print(f"btns compose demo: BTNS_DATAPLANE must be xfrm or libipsec, not {dataplane!r}", file=sys.stderr)
        return CANNOT_RUN
    timings: dict[str, float] = {}
    started = time.monotonic()
    try:
        engine = choose_engine(repo, dataplane, engine_name)
        with testbed_lock(lock_timeout, out):
            t0 = time.monotonic()
            up = engine.up(build, timeout=1800)
            timings["up"] = time.monotonic() - t0
            try:
                if up.returncode != 0:
                    raise DemoError(
                        f"bringing the compose testbed up failed:\n{(up.stdout + up.stderr).strip()}", TESTBED_DOWN
                    )
                t1 = time.monotonic()
                _wait_for_charons(engine, timeout=60)
                timings["charons"] = time.monotonic() - t1
                mode = "transport" if dataplane == "xfrm" else "tunnel"
                print(
                    f"testbed: compose project {PROJECT} ({engine.name}), {CLIENT} {PEERS[CLIENT]} <-> "
                    f"{SERVER} {PEERS[SERVER]}, one charon each ({dataplane}: ESP in {mode} mode), no conn loaded",
                    file=out,
                )
                print(
                    f"{SERVER}: listening on {PEERS[SERVER]}:{PORT}, {CLIENT}: connecting, each socket with a pToken "
                    "demanding encryption (privacy >= LEVEL_MEDIUM) and BTNS",
                    file=out,
                )
                t2 = time.monotonic()
                a, b = run_ends(engine, timeout)
                timings["connection"] = time.monotonic() - t2
            except DemoError as exc:
                for service in (CLIENT, SERVER):
                    print(f"--- {service}: last log lines ---\n{engine.logs(service)}", file=sys.stderr)
                raise exc
            finally:
                if keep:
                    print(
                        f"testbed kept up (--keep): take it down (and restore the host sysctls podman changed) "
                        f"with {engine.script('down.sh')}"
                        if engine.name == "podman"
                        else f"testbed kept up (--keep): docker compose -p {PROJECT} down --volumes",
                        file=out,
                    )
                else:
                    t3 = time.monotonic()
                    down = engine.down()
                    timings["down"] = time.monotonic() - t3
                    if down.returncode != 0:
                        print(
                            f"btns compose demo: taking the testbed down failed:\n{down.stdout}{down.stderr}",
                            file=sys.stderr,
                        )
    except DemoError as exc:
        print(f"btns compose demo: {exc}", file=sys.stderr)
        return exc.code
    ta, tb = ptoken_from_json(a["ptoken"]), ptoken_from_json(b["ptoken"])
    print(f"A -> B: {b['received'].encode()!r}", file=out)
    print(f"B -> A: {a['received'].encode()!r}", file=out)
    for line in describe_ptoken(f"peer A ({CLIENT}), client socket {tuple(a['socket'])}", ta):
        print(line, file=out)
    for line in describe_ptoken(f"peer B ({SERVER}), server socket {tuple(b['socket'])}", tb):
        print(line, file=out)
    checks = agreement_checks(ta, tb, bytes.fromhex(b["host_key"]))
    checks["B received what A sent"] = b["received"] == MESSAGE.decode()
    checks["A got B's answer"] = a["received"] == MESSAGE.decode()[::-1]
    print_checks(checks, out)
    timings["total"] = time.monotonic() - started
    print("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()), file=out)
    return 0 if all(checks.values()) else 1


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["peer"]:
        p = argparse.ArgumentParser(prog="python -m btns_vici.compose_demo peer")
        p.add_argument("role", choices=("server", "client"))
        p.add_argument("--name", required=True, choices=sorted(PEERS))
        p.add_argument("--peer", required=True, choices=sorted(PEERS))
        p.add_argument("--timeout", type=float, default=60.0)
        a = p.parse_args(argv[1:])
        sys.exit(peer_main(a.role, a.name, a.peer, a.timeout))
    p = argparse.ArgumentParser(
        prog="python -m btns_vici.compose_demo",
        description="The two-peer demo on the compose testbed (docker/): bob listens, alice connects, each "
        "socket demanding encryption and BTNS with set_socket_pToken; both ends' tokens are compared.",
    )
    p.add_argument("--keep", action="store_true", help="leave the testbed up afterwards")
    p.add_argument("--no-build", dest="build", action="store_false", help="reuse the peer image as it is")
    p.add_argument("--engine", choices=ENGINES, help="container engine (default: $BTNS_ENGINE, else podman, docker)")
    p.add_argument(
        "--dataplane",
        choices=DATAPLANES,
        help="default: $BTNS_DATAPLANE, else xfrm when the kernel can do ESP, else libipsec",
    )
    a = p.parse_args(argv)
    sys.exit(run(keep=a.keep, build=a.build, engine_name=a.engine, dataplane=a.dataplane))


if __name__ == "__main__":
    main()
