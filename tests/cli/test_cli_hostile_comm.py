"""Attack on ``btns sockets``' PROCESS column: a hostile local user names a process (its ``comm``,
15 bytes of anything but NUL) with a newline or a terminal escape, holding a clear socket. The
table must not carry the control characters (a forged row, a row whose "clear" the terminal hides)
nor let a quote forge another holder; JSON carries the name as it is."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import pytest

from .conftest import btns, btns_json, peer_args

pytestmark = pytest.mark.testbed

HOLDER = textwrap.dedent(
    """
    import os, socket, sys
    with open("/proc/self/comm", "wb") as f:
        f.write(os.fsencode(sys.argv[1]))
    s = socket.create_connection((sys.argv[2], int(sys.argv[3])))
    print(s.getsockname()[1], os.getpid(), s.fileno(), flush=True)
    sys.stdin.read()
    """
)

#: (name, as the table shows it: escaped like a Python string literal's body)
NAMES = [
    ("\nprotected", "\\nprotected"),  # a second line
    ("a\x1b[8m", "a\\x1b[8m"),  # SGR conceal: the rest of the row (its "clear") invisible on a terminal
    ('x",pid=1,fd=3', 'x\\",pid=1,fd=3'),  # a forged holder inside users:((...))
    (" sshd", " sshd"),  # a leading space is part of the name (not stripped into "sshd")
    ("b\udcff", "b\\udcff"),  # not UTF-8 (byte 0xff): was UnicodeDecodeError, the whole command failed
]


@pytest.mark.parametrize(("name", "shown"), NAMES)
def test_a_hostile_process_name_forges_no_table_text(tb, name, shown):
    with tb.in_netns(tb.a):
        listener = socket.socket()
    with listener:
        listener.bind((str(tb.a.addr(4)), 0))
        listener.listen(1)
        host, port = listener.getsockname()
        holder = subprocess.Popen(
            ["ip", "netns", "exec", tb.a.netns, sys.executable, "-c", HOLDER, name, host, str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            local_port, pid, fd = map(int, holder.stdout.readline().split())
            entries = btns_json("sockets", *peer_args(tb.a))
            mine = [e for e in entries if e["local_port"] == local_port and e["proto"] == "tcp"]
            assert [p["comm"] for e in mine for p in e["processes"]] == [name]
            text = btns("sockets", *peer_args(tb.a))
        finally:
            holder.stdin.close()
            holder.wait(timeout=10)
    assert text.returncode == 0, text.stderr
    assert "\x1b" not in text.stdout and "\r" not in text.stdout
    lines = text.stdout.splitlines()
    rows = [line for line in lines if line.split()[2:3] == [f"{host}:{local_port}"]]  # (LOCAL column)
    assert len(rows) == 1 and not [line for line in lines if line.lstrip().startswith("protected")], lines
    assert f'users:(("{shown}",pid={pid},fd={fd}))' in rows[0], rows[0]
    assert rows[0].split()[-6] == "clear", rows[0]
