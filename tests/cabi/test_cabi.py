"""libbtns-ipsec.so from C: installed by pip, compiled with pkg-config, run without any set-up.

No daemon is needed here; the testbed tests are in test_cabi_testbed.py.
"""

from __future__ import annotations

import errno
import hashlib
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from btns_vici import AuthMethod, IToken
from btns_vici.cabi import HEADER, LIBRARY, header_path, installed_paths
from btns_vici.capi import CONSTANTS

from .conftest import C_DIR, EXAMPLES, NO_DAEMON, Compiler, fields, pkg_config, run


def test_install_puts_library_header_and_pc_under_the_prefix(cabi_prefix: Path) -> None:
    paths = installed_paths(str(cabi_prefix))
    for what, path in paths.items():
        assert path.is_file(), f"{what} not installed at {path}"
    assert paths["header"].read_text() == header_path().read_text()
    libs = pkg_config(cabi_prefix, "--libs")
    libdir = str(Path(libs[0][2:]).resolve())
    assert Path(libdir) == (cabi_prefix / "lib").resolve()
    assert f"-Wl,-rpath,{libs[0][2:]}" in libs and "-lbtns-ipsec" in libs
    assert pkg_config(cabi_prefix, "--modversion") == ["0.1.0"]


def test_library_exports_every_draft_function(cabi_prefix: Path) -> None:
    out = subprocess.run(
        ["nm", "-D", "--defined-only", str(cabi_prefix / "lib" / LIBRARY)], capture_output=True, text=True, check=True
    ).stdout
    exported = set(re.findall(r" T (ipsec_\w+)", out))
    draft = {
        "ipsec_create_iToken",
        "ipsec_free_iToken",
        "ipsec_get_token_attr",
        "ipsec_set_token_attr",
        "ipsec_create_pToken",
        "ipsec_free_pToken",
        "ipsec_set_socket_pToken",
        "ipsec_get_socket_pToken",
        "ipsec_set_msg_pToken",
        "ipsec_get_msg_pToken",
        "ipsec_cmp_pToken",
        "ipsec_dup_pToken",
    }
    extensions = {"ipsec_import_iToken", "ipsec_export_iToken", "ipsec_sendmsg", "ipsec_recvmsg"}
    assert exported == draft | extensions


def test_header_alone_compiles_strictly(cabi_prefix: Path, tmp_path: Path) -> None:
    src = tmp_path / "only_header.c"
    src.write_text(f"#include <{HEADER}>\nint main(void) {{ return IPSEC_API_ATTR_ANY - 2; }}\n")
    include = pkg_config(cabi_prefix, "--cflags")
    for std in ("-std=c99", "-std=c11"):
        proc = subprocess.run(
            ["cc", std, "-pedantic", "-Wall", "-Wextra", "-Werror", "-fsyntax-only", *include, str(src)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr


def test_header_constants_are_capi_values(compile_c: Compiler, tmp_path: Path) -> None:
    src = tmp_path / "constants.c"
    lines = [f'    printf("%s %d\\n", "{name}", (int){name});' for name in CONSTANTS]
    src.write_text(
        "#include <stdio.h>\n#include <ipsec_api.h>\nint main(void)\n{\n" + "\n".join(lines) + "\n    return 0;\n}\n"
    )
    proc = run(compile_c(src))
    assert proc.returncode == 0, proc.stderr
    printed = {name: int(value) for name, value in (line.split() for line in proc.stdout.splitlines())}
    assert printed == CONSTANTS
    assert printed["IPSEC_API_ATTR_authMeth_LEAPOFFFAITH"] == printed["IPSEC_API_ATTR_authMeth_LEAPOFFAITH"]


def test_bad_input_never_crashes(compile_c: Compiler) -> None:
    proc = run(compile_c(C_DIR / "bad_input.c"))
    failures = [line for line in proc.stdout.splitlines() if line.startswith("not ok")]
    assert proc.returncode == 0 and not failures, proc.stdout + proc.stderr
    summary = re.search(r"bad_input: (\d+) passed, 0 failed", proc.stdout)
    assert summary and int(summary.group(1)) >= 100, proc.stdout


def test_bad_input_under_valgrind(compile_c: Compiler) -> None:
    """No invalid read or write in the library's C side (the Python core is excluded as noise)."""
    if not Path("/usr/bin/valgrind").exists():
        pytest.skip("valgrind not installed")
    exe = compile_c(C_DIR / "bad_input.c")
    proc = run(
        [
            "/usr/bin/valgrind",
            "--error-exitcode=99",
            "--errors-for-leak-kinds=none",
            "--leak-check=no",
            "--suppressions=/dev/null",
            "--undef-value-errors=no",
            str(exe),
        ],
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Invalid read" not in proc.stderr and "Invalid write" not in proc.stderr


def _peer_itoken() -> IToken:
    der = bytes.fromhex("302a300506032b6570032100") + bytes(range(32))
    return IToken.from_identity(
        authentication_method=AuthMethod.PKIX_TRUSTED,
        pub_key_id=der,
        certificate_dn="CN=host-b.btns.test",
        certificate_authority_dn="CN=BTNS Test CA",
        channel_binding="btns-cb-v1:spki-sha256:" + hashlib.sha256(der).hexdigest(),
        audit_string="id 'CN=host-b.btns.test' authenticated by X.509",
    )


def test_example_itoken_attrs(compile_c: Compiler, tmp_path: Path) -> None:
    tok = _peer_itoken()
    blob = tmp_path / "peer.itoken"
    blob.write_bytes(tok.to_bytes())
    proc = run(compile_c(EXAMPLES / "itoken_attrs.c"), str(blob))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = fields(proc.stdout)
    assert got["import"] == f"{len(tok.to_bytes())} bytes"
    assert got["authenticationMethod"] == f"PKIX_TRUSTED ({int(AuthMethod.PKIX_TRUSTED)})"
    assert got["certificateDN"] == tok.certificate_dn
    assert got["certificateAuthorityDN"] == tok.certificate_authority_dn
    assert got["channelBinding"] == tok.channel_binding
    assert got["auditString"] == tok.audit_string
    assert tok.pub_key_id is not None
    assert got["pubKeyID"] == f"{len(tok.pub_key_id)} bytes {tok.pub_key_id.hex()}"
    assert got["authMeth_PKIX_TRUSTED"] == "ENABLE (1)" and got["authMeth_BTNS"] == "DISABLE (0)"
    assert got["set certificateDN"] == f"Operation not permitted (errno {errno.EPERM})"
    assert got["template.authMeth_BTNS"] == "ENABLE (1)"
    assert got["template.authMeth_LEAPOFFAITH"] == "ENABLE (1)"
    assert got["template.authMeth_PRESHAREDKEY"] == "DISABLE (0)"
    assert got["template.authMeth_EAP"] == "ANY (2)"
    assert got["template.authenticationMethod"].startswith("(none: No data available")


def test_example_itoken_attrs_refuses_malformed(compile_c: Compiler, tmp_path: Path) -> None:
    blob = tmp_path / "bad.itoken"
    blob.write_bytes(_peer_itoken().to_bytes()[:-3])
    proc = run(compile_c(EXAMPLES / "itoken_attrs.c"), str(blob))
    assert proc.returncode == 1
    assert fields(proc.stdout)["import"] == f"error Invalid argument (errno {errno.EINVAL})"


@pytest.fixture
def tcp_listener():
    """A local TCP server accepting connections in a thread; yields its port."""
    srv = socket.create_server(("127.0.0.1", 0))
    conns: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conns.append(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield srv.getsockname()[1]
    srv.close()
    for c in conns:
        c.close()


def test_example_get_ptoken_reports_daemon_down(compile_c: Compiler, tcp_listener: int) -> None:
    proc = run(compile_c(EXAMPLES / "get_ptoken.c"), "127.0.0.1", str(tcp_listener), env=NO_DAEMON)
    assert proc.returncode == 1
    assert f"ipsec_get_socket_pToken: Connection refused (errno {errno.ECONNREFUSED})" in proc.stderr


def test_example_set_socket_ptoken_reports_daemon_down(compile_c: Compiler, tcp_listener: int) -> None:
    proc = run(compile_c(EXAMPLES / "set_socket_ptoken.c"), "127.0.0.1", str(tcp_listener), env=NO_DAEMON)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    got = fields(proc.stdout)
    assert got["demand"] == "privacy >= LEVEL_MEDIUM, peer by BTNS or leap of faith"
    assert got["ipsec_set_socket_pToken"] == f"Connection refused (errno {errno.ECONNREFUSED})"


@pytest.mark.parametrize("addr", ["127.0.0.1", "::1"])
def test_msg_functions_over_udp_loopback(compile_c: Compiler, addr: str) -> None:
    proc = run(compile_c(C_DIR / "msg_udp.c"), addr, env=NO_DAEMON)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = fields(proc.stdout)
    assert got["sendmsg_plain"] == "5" and got["recvmsg"] == "5"
    assert got["pktinfo"] == "1" and got["localport_ok"] == "1" and got["source_ok"] == "1"
    # The flow is complete; only the daemon is missing: reported, never taken for "unprotected".
    assert got["get_msg_pToken"] == f"-1 errno {errno.ECONNREFUSED} Connection refused"
    assert got["set_msg_pToken"] == "0"
    # Fail closed: a datagram whose pToken cannot be checked is not sent.
    assert got["sendmsg_demand"] == f"-1 errno {errno.ECONNREFUSED} Connection refused"
    assert got["received_after_demand"] == "-1"


def test_core_that_cannot_start_gives_elibacc(compile_c: Compiler) -> None:
    """If the embedded Python cannot import btns_vici, every call fails with ELIBACC (and does not crash)."""
    exe = compile_c(C_DIR / "bad_input.c")
    proc = run(
        exe,
        env={
            "PYTHONPATH": "/nonexistent",
            "PYTHONNOUSERSITE": "1",
            "PYTHONSAFEPATH": "1",
            "PYTHONHOME": "/nonexistent/btns-no-python",
        },
    )
    assert proc.returncode == 1
    assert f"errno={errno.ELIBACC}" in proc.stdout
    assert "Segmentation" not in proc.stderr


def test_dev_environment_has_the_library() -> None:
    """scripts/setup.sh builds the C ABI into the dev venv too (``btns-cabi build --prefix .venv``)."""
    paths = installed_paths(sys.prefix)
    missing = [str(p) for p in paths.values() if not p.is_file()]
    assert not missing, f"not installed: {missing}; run scripts/setup.sh (btns-cabi build)"


def test_library_loaded_into_a_python_process(cabi_prefix: Path) -> None:
    """A Python program may load the library too (ctypes): it then runs in that interpreter."""
    code = f"""
import ctypes
lib = ctypes.CDLL({str(cabi_prefix / "lib" / LIBRARY)!r}, use_errno=True)
lib.ipsec_create_pToken.restype = ctypes.c_void_p
lib.ipsec_free_pToken.argtypes = [ctypes.c_void_p]
p = lib.ipsec_create_pToken()
from btns_vici.cabi import _runtime
print(len(_runtime.handles), lib.ipsec_free_pToken(p), lib.ipsec_free_pToken(p), ctypes.get_errno())
"""
    proc = run([str(cabi_prefix / "bin" / "python"), "-c", code])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "0", "-1", str(errno.EBADF)]
