"""The compose demo on the host: take the lock, bring the testbed up, run both ends in their
containers (:mod:`.peer`), print both ends' tokens with the netns demo's agreement checks, take
the testbed down. ``python -m btns_lab.compose`` (exit codes in :mod:`.settings`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from btns_vici.cli.describe import describe_ptoken

from ..demo import agreement_checks, print_checks
from .engine import Engine, choose_engine, default_dataplane, repo_root, run_command, testbed_lock
from .settings import (
    CANNOT_RUN,
    CLIENT,
    DATAPLANES,
    ENGINES,
    MESSAGE,
    PEERS,
    PORT,
    PROJECT,
    SERVER,
    TESTBED_DOWN,
    DemoError,
)
from .tokens_json import ptoken_from_json


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
                and run_command([engine.name, "exec", cid, "swanctl", "--stats"], engine.env, 30).returncode == 0
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
    argv = ["python", "-m", "btns_lab.compose.peer"]
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
    p = argparse.ArgumentParser(
        prog="python -m btns_lab.compose",
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
