"""After fork() the child answers with its own daemon connections; the parent's keep working."""

from __future__ import annotations

import json
import os
import socket

import pytest

import btns_vici
from btns_lab.testbed import connected_pair
from btns_vici import rtnl
from btns_vici.plugins import get_plugin_manager

pytestmark = pytest.mark.testbed


def test_a_forked_child_gets_fresh_sessions_and_a_true_answer(tb, backend_a):
    tb.up("fork", "rawkey", 4)
    cli, srv = connected_pair(tb, socket.IPPROTO_TCP, 4)
    with cli, srv:
        assert btns_vici.get_socket_ptoken(cli, backend_a).protected  # parent: sessions, index, monitors open
        parent_ctx = get_plugin_manager().get_plugin("strongswan").context(backend_a.options)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: every inherited connection was forgotten; it makes its own
            try:
                plugin = get_plugin_manager().get_plugin("strongswan")
                fresh = plugin._contexts == {} and len(rtnl._views) == 0
                tok = btns_vici.get_socket_ptoken(cli, backend_a)
                ctx = plugin.context(backend_a.options)
                out = {"fresh": fresh, "protected": tok.protected, "new_ctx": ctx is not parent_ctx}
            except BaseException as exc:  # report, never run the parent's test code in the child
                out = {"error": repr(exc)}
            os.write(w, json.dumps(out).encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            child = json.loads(f.read())
        os.waitpid(pid, 0)
        assert child == {"fresh": True, "protected": True, "new_ctx": True}, child
        assert btns_vici.get_socket_ptoken(cli, backend_a).protected  # the parent's connections are intact
