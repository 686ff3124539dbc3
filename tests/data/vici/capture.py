"""Regenerate the captured VICI replies and events in this directory from a real charon.

Run as root: ``.venv/bin/python tests/data/vici/capture.py``. Each ``*.vici`` file is
one VICI message in wire encoding (what follows the packet header and name).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from btns_lab.testbed import Testbed
from btns_vici.strongswan.events import EventStream
from btns_vici.strongswan.session import ViciSession, encode_message

HERE = Path(__file__).parent


def save(name: str, msg: dict) -> None:
    (HERE / f"{name}.vici").write_bytes(encode_message(msg))


def main() -> None:
    with Testbed() as tb:
        ev = EventStream(tb.a.vici_path)
        s = ViciSession(tb.a.vici_path)
        tb.up("rawkey4", "rawkey", 4)
        tb.up("psk4", "psk", 4, esp="aes128-sha256")
        tb.up("x5094", "x509", 4)
        tb.up("rawkey6", "rawkey", 6)
        ports = {
            "p20000": (["10.231.0.1/32[tcp/20000]"], ["10.231.0.2/32[tcp]"]),
            "prange": (["10.231.0.1/32[udp/5000-6000]"], ["10.231.0.2/32[udp/5000-6000]"]),
            "v6port": (["fd00:b75::1/128[udp/5000]"], ["fd00:b75::2/128"]),
        }
        tb.load_conn("ports", "psk", 4, children=ports)
        for c in ports:
            tb.initiate("ports", c)
        time.sleep(0.2)
        for i, sa in enumerate(s.list_sas()):
            save(f"list-sas-{next(iter(sa))}", sa)
            del i
        for conn in s.list_conns():
            save(f"list-conns-{next(iter(conn))}", conn)
        for i, cert in enumerate(s.list_certs()):
            save(f"list-certs-{i}-{cert['type'].decode().lower()}", cert)
        save("stats", s.stats())
        s.request("rekey", {"child": "host", "ike": "psk4"})
        time.sleep(0.3)
        s.request("rekey", {"ike": "rawkey4"})
        time.sleep(0.3)
        s.streamed("terminate", "control-log", {"child": "host", "ike": "x5094", "timeout": "5000"})
        s.streamed("terminate", "control-log", {"ike": "rawkey6", "timeout": "5000"})
        time.sleep(0.3)
        names = []
        for i, (name, msg) in enumerate(ev.poll(0.5) + ev.barrier()):
            save(f"event-{i:02d}-{name}", msg)
            names.append(name)
        (HERE / "events.json").write_text(json.dumps(names, indent=1) + "\n")
        ev.close()
        s.close()


if __name__ == "__main__":
    main()
