"""The two-peer demo: a TCP connection protected by BTNS raw keys, and both ends' tokens.

Runs on the network-namespace testbed (:mod:`btns_vici.testbed`): two charons,
each in its own namespace, with unauthenticated raw public keys. Prints each
end's pToken and iToken and checks that they agree: A's peer iToken is B's own
identity (B's remote_iToken) and vice versa, and the channel bindings match.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from typing import TextIO

from .api import get_socket_ptoken
from .constants import Attr, Setting
from .plugins import get_backend
from .tokens import IToken, PToken


def describe_itoken(tok: IToken | None, indent: str = "    ") -> list[str]:
    if tok is None:
        return [f"{indent}(none)"]
    method = tok.authentication_method
    key = tok.pub_key_id
    return [
        f"{indent}authenticationMethod: {method.name if method else '-'}",
        f"{indent}pubKeyID:             {key.hex()[:48] + '...' if key else '-'} ({len(key or b'')} bytes DER SPKI)",
        f"{indent}certificateDN:        {tok.certificate_dn or '-'}",
        f"{indent}channelBinding:       {tok.channel_binding or '-'}",
        f"{indent}auditString:          {tok.audit_string or '-'}",
    ]


def describe_ptoken(name: str, p: PToken) -> list[str]:
    lines = [
        f"{name}:",
        f"  privacyProtected:     {p.privacy_protected.name}",
        f"  integrityProtected:   {p.integrity_protected.name}",
        f"  compressionAvailable: {p.compression_available.name}",
        f"  tunnelMode:           {p.tunnel_mode.name}",
        f"  ipoptionsProtected:   {p.ipoptions_protected.name}",
        f"  policyName:           {p.policy_name or '-'}",
        f"  informationString:    {p.information_string or '-'}",
        "  iToken (the peer):",
        *describe_itoken(p.itoken),
        "  remote_iToken (what we showed the peer):",
        *describe_itoken(p.remote_itoken),
    ]
    return lines


def preflight() -> str | None:
    """Why the demo cannot run here, or None."""
    if os.geteuid() != 0:
        return "the demo needs root (network namespaces, TUN devices, charon): run it as root"
    if shutil.which("swanctl") is None or not os.path.exists("/usr/lib/ipsec/charon"):
        return "strongSwan is not installed: run ./scripts/setup.sh (or apt-get install strongswan-charon)"
    return None


def run(out: TextIO = sys.stdout, family: int = 4) -> int:
    """Bring up the testbed, connect, print and compare both ends' tokens. Exit code 0 on success."""
    problem = preflight()
    if problem:
        print(f"btns demo: {problem}", file=sys.stderr)
        return 2
    from .testbed import Testbed, connected_pair

    with Testbed() as tb:
        print(f"testbed: namespaces {tb.a.netns} ({tb.a.v4}) and {tb.b.netns} ({tb.b.v4})", file=out)
        tb.up("demo", "rawkey", family)
        print("IKE_SA 'demo' up: raw public keys, no certificates (BTNS)", file=out)
        client, server = connected_pair(tb, socket.IPPROTO_TCP, family)
        with client, server:
            ta = get_socket_ptoken(client, get_backend("strongswan", tb.a.options))
            tb_ = get_socket_ptoken(server, get_backend("strongswan", tb.b.options))
            for line in describe_ptoken(f"peer A, client socket {client.getsockname()[:2]}", ta):
                print(line, file=out)
            for line in describe_ptoken(f"peer B, server socket {server.getsockname()[:2]}", tb_):
                print(line, file=out)
            checks = {
                "A's connection is encrypted": ta.privacy_protected >= Setting.LEVEL_LOW,
                "B's connection is encrypted": tb_.privacy_protected >= Setting.LEVEL_LOW,
                "A's peer iToken is B's own identity": ta.itoken is not None and ta.itoken == tb_.remote_itoken,
                "B's peer iToken is A's own identity": tb_.itoken is not None and tb_.itoken == ta.remote_itoken,
                "channel bindings agree": ta.itoken is not None
                and tb_.remote_itoken is not None
                and ta.itoken.channel_binding == tb_.remote_itoken.channel_binding,
                "both pTokens equivalent (ipsec_cmp_pToken)": _mirror_equal(ta, tb_),
            }
            print("checks:", file=out)
            for what, ok in checks.items():
                print(f"  [{'ok' if ok else 'FAIL'}] {what}", file=out)
            return 0 if all(checks.values()) else 1


def _mirror_equal(a: PToken, b: PToken) -> bool:
    """A's and B's views are mirror images: swap B's selectors and identities, then compare."""
    m = b.copy()
    m.local_ts, m.remote_ts = b.remote_ts, b.local_ts
    if b.remote_itoken is not None and b.itoken is not None:
        m._set_internal(Attr.iToken, b.remote_itoken)
        m._set_internal(Attr.remote_iToken, b.itoken)
    return a.equivalent(m)


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
