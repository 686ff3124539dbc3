"""The container engine on the host: podman (with podman-compose, scripts/compose/) or docker
(``docker compose``), the compose project's containers, and the one-testbed-per-host lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from .settings import CACHE, CANNOT_RUN, ENGINES, PROJECT, TESTBED_DOWN, DemoError


def repo_root() -> Path | None:
    """The checkout holding docker/ and scripts/compose/ (this module in lab/src/btns_lab/compose of it)."""
    env = os.environ.get("BTNS_REPO")
    for root in ([Path(env)] if env else []) + [Path(__file__).resolve().parents[4]]:
        if (root / "docker" / "docker-compose.yml").is_file() and (root / "scripts" / "compose" / "up.sh").is_file():
            return root
    return None


def run_command(argv: Sequence[str], env: Mapping[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
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
    return run_command(probe, os.environ, timeout=20).returncode == 0


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
            check = run_command([self.script("setup.sh"), "--check"], self.env, timeout=120)
            if check.returncode != 0:
                return (check.stderr.strip() or check.stdout.strip()) + "\n(run scripts/compose/setup.sh)"
            info = run_command(["podman", "info"], self.env, timeout=120)
            if info.returncode != 0:
                return f"podman does not work here: {info.stderr.strip()[-400:]}"
        else:
            version = run_command(["docker", "compose", "version"], self.env, timeout=60)
            if version.returncode != 0:
                return f"docker has no compose plugin (`docker compose version`: {version.stderr.strip()[-300:]})"
            info = run_command(["docker", "info"], self.env, timeout=60)
            if info.returncode != 0:
                return f"the docker engine does not answer: {info.stderr.strip()[-300:]}"
        return None

    def _compose(self, *args: str) -> list[str]:
        return ["docker", "compose", "-p", PROJECT, "-f", str(self.compose_file), *args]

    def up(self, build: bool, timeout: float) -> subprocess.CompletedProcess[str]:
        if self.name == "podman":
            return run_command([self.script("up.sh"), *([] if build else ["--no-build"])], self.env, timeout)
        return run_command(self._compose("up", "-d", *(["--build"] if build else [])), self.env, timeout)

    def down(self) -> subprocess.CompletedProcess[str]:
        if self.name == "podman":
            return run_command([self.script("down.sh")], self.env, timeout=300)
        return run_command(self._compose("down", "--volumes", "--timeout", "5"), self.env, timeout=300)

    def container(self, service: str, stopped_too: bool = False) -> str | None:
        """The id of the service's running container (or of a stopped one too), or None."""
        out = run_command(
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
        return run_command(self.exec_argv(service, *argv), self.env, timeout)

    def logs(self, service: str, tail: int = 30) -> str:
        cid = self.container(service, stopped_too=True)
        if cid is None:
            return f"(no container for {service})"
        res = run_command([self.name, "logs", "--tail", str(tail), cid], self.env, timeout=60)
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
