"""`btns token --pid --fd` on a helper process holding sockets in the testbed's namespace A."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys

import pytest

from .conftest import btns, btns_json

pytestmark = pytest.mark.testbed

HELPER = """
import json, socket, sys
b_host, b_plain, a_plain, port = sys.argv[1:5]
prot = socket.create_connection((b_host, int(port)), timeout=10)
clear = socket.create_connection((b_plain, int(port)), timeout=10, source_address=(a_plain, 0))
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
regular = open("/proc/self/status")
print(json.dumps({"protected": prot.fileno(), "clear": clear.fileno(), "unconnected": udp.fileno(),
                  "unix": unix.fileno(), "file": regular.fileno()}), flush=True)
sys.stdin.read()  # hold everything until the test closes our stdin
"""


@pytest.fixture
def helper(tb, conn):
    """A process in A holding a protected, a clear, an unconnected and a non-IP socket and a file."""
    with tb.in_netns(tb.b):
        servers = [socket.socket(), socket.socket()]
    for s, addr in zip(servers, (tb.b.v4, tb.b.v4_plain), strict=True):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((str(addr), 7450))
        s.listen(4)
    proc = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            tb.a.netns,
            sys.executable,
            "-c",
            HELPER,
            str(tb.b.v4),
            str(tb.b.v4_plain),
            str(tb.a.v4_plain),
            "7450",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        fds = json.loads(proc.stdout.readline())
        yield proc.pid, fds  # `ip netns exec` execs: the pid is the helper's
    finally:
        proc.stdin.close()
        proc.wait(10)
        for s in servers:
            s.close()


def test_token_of_a_protected_socket(tb, conn, helper):
    pid, fds = helper
    # no --netns: the socket's namespace is found from the socket itself
    out = btns_json("token", "--pid", str(pid), "--fd", str(fds["protected"]), "--vici-socket", tb.a.vici_path)
    assert out["netns"] == tb.a.netns and out["status"] == "protected"
    assert out["flow"]["remote_addr"] == str(tb.b.v4) and out["flow"]["remote_port"] == 7450
    tok = out["ptoken"]
    assert tok["protected"] and tok["privacyProtected"] == "LEVEL_HIGH" and tok["tunnelMode"] == "ENABLE"
    assert tok["policyName"] == f"{conn}/host"
    assert tok["iToken"]["authenticationMethod"] == "BTNS"
    assert tok["iToken"]["pubKeyID"] == tb.b.key.public_der.hex()  # the peer's raw key, exactly
    assert tok["remote_iToken"]["pubKeyID"] == tb.a.key.public_der.hex()
    assert out["protection"]["peer_id"] == f"b-{conn}-v4@btns.test"

    text = btns("token", "--pid", str(pid), "--fd", str(fds["protected"]), "--vici-socket", tb.a.vici_path)
    assert text.returncode == 0, text.stderr
    assert "privacyProtected:     LEVEL_HIGH" in text.stdout
    assert "authenticationMethod: BTNS" in text.stdout and f"(netns {tb.a.netns})" in text.stdout


def test_token_of_a_clear_and_an_unconnected_socket_is_exit_1(tb, helper):
    pid, fds = helper
    out = btns_json("token", "--pid", str(pid), "--fd", str(fds["clear"]), "--vici-socket", tb.a.vici_path, code=1)
    assert out["status"] == "clear" and out["protection"] is None
    assert out["ptoken"]["protected"] is False and out["ptoken"]["iToken"] is None
    assert "NOT protected" in out["ptoken"]["informationString"]
    out = btns_json(
        "token", "--pid", str(pid), "--fd", str(fds["unconnected"]), "--vici-socket", tb.a.vici_path, code=1
    )
    assert out["status"] == "unconnected" and out["ptoken"] is None


@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("file", "is not a socket (/proc/"),
        ("unix", "IPsec protects only IPv4 and IPv6 sockets"),
        (None, "has no open file descriptor 999"),
    ],
)
def test_token_of_what_is_no_ip_socket_is_exit_5(tb, helper, which, message):
    pid, fds = helper
    res = btns("token", "--pid", str(pid), "--fd", str(fds[which] if which else 999))
    assert res.returncode == 5 and message in res.stderr, res.stderr


def test_token_of_no_process_is_exit_5():
    with open("/proc/sys/kernel/pid_max") as f:
        res = btns("token", "--pid", str(int(f.read()) + 1), "--fd", "0")  # above pid_max: never a process
    assert res.returncode == 5 and "no process" in res.stderr, res.stderr


def test_token_not_permitted_is_exit_4(tb, helper):
    pid, fds = helper
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed to run btns as another user"
    res = btns(
        "token",
        "--pid",
        str(pid),
        "--fd",
        str(fds["protected"]),
        prefix=[setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"],
    )
    assert res.returncode == 4, res.stderr
    assert "not permitted" in res.stderr and "ptrace" in res.stderr
