"""The two-peer demo: a TCP connection that demands IPsec, and both ends' tokens.

Runs on the network-namespace testbed (:mod:`btns_lab.testbed`): two charons,
each in its own namespace. Each end gets a host key made on first use; the raw
public keys are exchanged out of band (BTNS: no certificates, no CA). The
server's listening socket and the client's socket get a pToken demanding
encryption and BTNS (ipsec_set_socket_pToken); the library has charon
negotiate the SA, arms the data-plane guard, connects and verifies. Then it
prints each end's pToken and iToken and checks that they agree.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import threading
from typing import TextIO

from btns_vici.api import accept, connect, get_socket_ptoken, listen, set_socket_ptoken
from btns_vici.cli.describe import describe_ptoken
from btns_vici.core.constants import Attr, AuthMethod, Setting
from btns_vici.core.derive import restored_ptoken
from btns_vici.core.tokens import IToken, PToken
from btns_vici.hostkey import load_or_create
from btns_vici.plugins import get_backend


def preflight() -> str | None:
    """Why the demo cannot run here, or None."""
    if os.geteuid() != 0:
        return "the demo needs root (network namespaces, TUN devices, charon): run it as root"
    if shutil.which("swanctl") is None or not os.path.exists("/usr/lib/ipsec/charon"):
        return "strongSwan is not installed: run ./scripts/setup.sh (or apt-get install strongswan-charon)"
    return None


def btns_demand() -> PToken:
    """What the demo asks for: encryption (at least MEDIUM), integrity, BTNS raw keys."""
    p = PToken()
    p.privacy_protected = Setting.LEVEL_MEDIUM
    p.integrity_protected = Setting.ENABLE
    t = IToken()
    t.set_auth_method(AuthMethod.BTNS, Setting.ENABLE)
    p.itoken = t
    return p


def run(out: TextIO = sys.stdout, family: int = 4) -> int:
    """Bring up the testbed, connect with demanded protection, print and compare both ends' tokens."""
    problem = preflight()
    if problem:
        print(f"btns demo: {problem}", file=sys.stderr)
        return 2
    from .testbed import Testbed

    with Testbed() as tb:
        print(
            f"testbed: {tb.a.netns} ({tb.a.addr(family)}) <-> {tb.b.netns} ({tb.b.addr(family)}), "
            "one charon each (kernel-libipsec)",
            file=out,
        )
        ends = {}
        for me in tb.peers:
            keys = tb.workdir / f"{me.name}-keys"
            ends[me.name] = (load_or_create(keys), tb.workdir / f"{me.name}-peers")
            ends[me.name][1].mkdir()
        for me, peer in (("a", "b"), ("b", "a")):  # raw keys exchanged out of band: BTNS
            (ends[me][1] / f"{peer}.pem").write_bytes(ends[peer][0].public_pem)
        opts = {
            p.name: {**p.options, "key_dir": str(ends[p.name][0].path.parent), "peer_keys": str(ends[p.name][1])}
            for p in tb.peers
        }
        be_a, be_b = get_backend("strongswan", opts["a"]), get_backend("strongswan", opts["b"])
        fam = socket.AF_INET if family == 4 else socket.AF_INET6
        with tb.in_netns(tb.b):
            srv = socket.socket(fam, socket.SOCK_STREAM)
        with tb.in_netns(tb.a):
            cli = socket.socket(fam, socket.SOCK_STREAM)
        with srv, cli:
            for s in (srv, cli):
                s.settimeout(15)
            set_socket_ptoken(srv, btns_demand(), be_b)
            srv.bind((str(tb.b.addr(family)), 7777))
            listen(srv, 1, be_b)
            print("B: listening with a pToken demanding encryption and BTNS", file=out)
            set_socket_ptoken(cli, btns_demand(), be_a)
            accepted: list = []
            thread = threading.Thread(target=lambda: accepted.append(accept(srv, be_b, latch_=False)))
            thread.start()
            connect(cli, (str(tb.b.addr(family)), 7777), be_a, latch_=False)
            thread.join(15)
            if not accepted:
                print("btns demo: the server did not accept the connection", file=sys.stderr)
                return 1
            server, _ = accepted[0]
            with server:
                cli.sendall(b"hello over IPsec")
                print(f"A -> B: {server.recv(64)!r}", file=out)
                ta = get_socket_ptoken(cli, be_a)
                tb_ = get_socket_ptoken(server, be_b)
                for line in describe_ptoken(f"peer A, client socket {cli.getsockname()[:2]}", ta):
                    print(line, file=out)
                for line in describe_ptoken(f"peer B, server socket {server.getsockname()[:2]}", tb_):
                    print(line, file=out)
                checks = agreement_checks(ta, tb_, ends["b"][0].public_der)
        print_checks(checks, out)
        return 0 if all(checks.values()) else 1


def agreement_checks(a: PToken, b: PToken, b_host_key: bytes) -> dict[str, bool]:
    """Whether the client's (A's) and the server's (B's) views of one connection agree.

    ``b_host_key`` is B's host key (DER SubjectPublicKeyInfo), which A must see as its peer's key.
    """
    return {
        "A's connection is encrypted": a.privacy_protected >= Setting.LEVEL_MEDIUM,
        "B's connection is encrypted": b.privacy_protected >= Setting.LEVEL_MEDIUM,
        "A's peer key is B's host key": a.itoken is not None and a.itoken.pub_key_id == b_host_key,
        "A's peer iToken is B's own identity": a.itoken is not None and a.itoken == b.remote_itoken,
        "B's peer iToken is A's own identity": b.itoken is not None and b.itoken == a.remote_itoken,
        "channel bindings agree": a.itoken is not None
        and b.remote_itoken is not None
        and a.itoken.channel_binding == b.remote_itoken.channel_binding,
        "both pTokens equivalent (ipsec_cmp_pToken)": _mirror_equal(a, b),
    }


def print_checks(checks: dict[str, bool], out: TextIO) -> None:
    print("checks:", file=out)
    for what, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {what}", file=out)


def _mirror_equal(a: PToken, b: PToken) -> bool:
    """A's and B's views are mirror images: swap B's selectors and identities, then compare."""
    attributes = b.attributes()
    if b.remote_itoken is not None and b.itoken is not None:
        attributes[Attr.iToken], attributes[Attr.remote_iToken] = b.remote_itoken, b.itoken
    return a.equivalent(restored_ptoken(attributes, b.remote_ts, b.local_ts))


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m btns_lab.demo", description="The two-peer demo on the network-namespace testbed."
    )
    parser.add_argument("--ipv6", action="store_true", help="connect over IPv6")
    args = parser.parse_args(argv)
    sys.exit(run(family=6 if args.ipv6 else 4))


if __name__ == "__main__":
    main()
