"""The wheel on Debian's stock Python: installs without a compiler step, the CLI runs, the C ABI
builds with ``btns-cabi build`` and links that interpreter's libpython correctly."""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import pytest

from btns_vici import __version__

from .conftest import Venv, minimal_env

pytestmark = pytest.mark.packaging
CABI_TESTS = Path(__file__).resolve().parents[1] / "cabi" / "c"


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:
    kw.setdefault("env", minimal_env())
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, check=False, **kw)


def test_wheel_installs_and_the_cli_runs(system_venv: Venv) -> None:
    print(f"wheel + deps installed in {system_venv.install_seconds:.1f} s")
    res = run([system_venv.bin("btns"), "--version"])
    assert res.returncode == 0 and res.stdout.strip() == f"btns {__version__}"


def test_cabi_builds_and_links_the_system_libpython(system_venv: Venv, tmp_path: Path) -> None:
    res = run([system_venv.bin("btns-cabi"), "build"])
    assert res.returncode == 0, res.stderr
    lib = system_venv.prefix / "lib" / "libbtns-ipsec.so"
    dyn = run(["readelf", "-d", lib]).stdout
    assert "[libpython3.11.so.1.0]" in dyn
    # Debian's libpython is in a directory the dynamic linker searches: no build-machine RUNPATH.
    assert "RUNPATH" not in dyn and "RPATH" not in dyn, dyn
    assert run([system_venv.bin("btns-cabi"), "paths"]).returncode == 0

    pc = {"PKG_CONFIG_PATH": str(system_venv.prefix / "lib" / "pkgconfig")}
    flags = run(["pkg-config", "--cflags", "--libs", "btns-ipsec"], env=minimal_env(**pc)).stdout.split()
    exe = tmp_path / "bad_input"
    res = run(["cc", "-std=c99", "-Wall", "-Wextra", "-Werror", CABI_TESTS / "bad_input.c", *flags, "-o", exe])
    assert res.returncode == 0, res.stderr
    # A C program started from a bare environment finds the library, libpython and the venv's btns_vici.
    res = run([exe], env=minimal_env(BTNS_BACKEND="strongswan", BTNS_VICI_SOCKET="/nonexistent/btns.vici"))
    assert res.returncode == 0 and ", 0 failed" in res.stdout, res.stdout[-2000:] + res.stderr

    # Debian's /usr/bin/python3 is linked statically: loading the library into it must work too.
    code = f"""
import ctypes
lib = ctypes.CDLL({str(lib)!r}, use_errno=True)
lib.ipsec_create_pToken.restype = ctypes.c_void_p
lib.ipsec_free_pToken.argtypes = [ctypes.c_void_p]
p = lib.ipsec_create_pToken()
from btns_vici.cabi import _runtime
print(len(_runtime.handles), lib.ipsec_free_pToken(p), lib.ipsec_free_pToken(p), ctypes.get_errno())
"""
    res = run([system_venv.python, "-c", code])
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["1", "0", "-1", str(errno.EBADF)]


def test_cabi_build_says_what_is_missing(system_venv: Venv) -> None:
    """Without cffi the build step fails with one line naming the extra, not a traceback."""
    code = "import sys; sys.modules['cffi'] = None; from btns_vici.cabi.build import main; sys.exit(main(['build']))"
    res = run([system_venv.python, "-c", code])
    assert res.returncode == 1 and "btns-vici[cabi]" in res.stderr and "Traceback" not in res.stderr


def test_non_root_user_gets_exit_4_from_the_system_python_install(system_venv: Venv) -> None:
    """`runuser -u nobody -- btns sas` against a root-only VICI socket: exit 4, not 3."""
    import socket
    import tempfile

    with tempfile.TemporaryDirectory(prefix="btns-ctl-") as d:
        Path(d).chmod(0o755)
        path = Path(d) / "charon.vici"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
            srv.bind(str(path))
            srv.listen(1)
            path.chmod(0o600)  # as charon's: srwx------ root
            res = run(
                [
                    "runuser",
                    "-u",
                    "nobody",
                    "--",
                    system_venv.bin("btns"),
                    "--backend",
                    "strongswan",
                    "--vici-socket",
                    path,
                    "sas",
                ]
            )
            assert res.returncode == 4, res.stderr
            assert "permission denied" in res.stderr
            res = run(["runuser", "-u", "nobody", "--", system_venv.bin("btns"), "--version"])
            assert res.returncode == 0 and res.stdout.strip() == f"btns {__version__}"
        # No socket at all is still "daemon unavailable".
        path.unlink()
        res = run(
            [
                "runuser",
                "-u",
                "nobody",
                "--",
                system_venv.bin("btns"),
                "--backend",
                "strongswan",
                "--vici-socket",
                path,
                "sas",
            ]
        )
        assert res.returncode == 3, res.stderr


@pytest.mark.parametrize(
    ("command", "argv"),
    [("testbed", ["testbed", "status"]), ("demo", ["demo", "--ipv6"]), ("testbed", ["--json", "testbed", "up"])],
)
def test_lab_commands_without_btns_lab_say_what_to_install(system_venv: Venv, command: str, argv: list[str]) -> None:
    """The wheel alone has no lab: `btns testbed|demo` parse, name btns-lab and exit 5 (not found)."""
    res = run([system_venv.bin("btns"), *argv])
    assert res.returncode == 5, (res.returncode, res.stdout, res.stderr)
    assert res.stdout == ""
    assert res.stderr.startswith(f"btns {command}: not installed: ")
    assert "btns-lab" in res.stderr
    listed = run([system_venv.bin("btns"), "--help"])
    assert listed.returncode == 0 and "(not installed: needs btns-lab)" in listed.stdout
