"""Records and tokens as the ``btns`` command shows them: JSON dicts and table cells."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

from ..core.records import SocketView

if TYPE_CHECKING:  # the table of `btns sas` needs none of these (start-up: README "Benchmarks")
    from ..backend import Backend
    from ..core.constants import Setting
    from ..core.records import ChildSA, IkeSA, Protection
    from ..core.selectors import Flow
    from ..core.tokens import IToken, PToken
    from .sockdiag import SocketEntry

PROTO_NAMES = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp"}


def verify_view(view: SocketView, backend: Backend) -> tuple[Protection | None, PToken]:
    """:func:`btns_vici.protection.verify` (the one place), imported on first use (start-up)."""
    from ..protection import verify

    return verify(view, backend)


def verify_flow(flow: Flow, backend: Backend) -> tuple[Protection | None, PToken]:
    """:func:`btns_vici.protection.verify_flow`, imported on first use (start-up)."""
    from ..protection import verify_flow as verify_bare_flow

    return verify_bare_flow(flow, backend)


def entry_view(entry: SocketEntry, netns_id: tuple[int, int] | None) -> SocketView | None:
    """The view of another process's socket as sock_diag shows it: bound device, mark, uid.

    sock_diag does not show SO_DONTROUTE, IP_UNICAST_IF, IP_TOS or which socket carries a
    per-socket XFRM policy: ``btns token --pid --fd`` reads the socket itself and sees them.
    Without CAP_NET_ADMIN the mark is not shown, and nothing can be proven (fail closed).
    """
    flow = entry.flow
    if flow is None:
        return None
    unknown = () if entry.mark is not None else ("SO_MARK not shown by sock_diag (needs CAP_NET_ADMIN)",)
    return SocketView(
        flow=flow,
        netns=netns_id,
        key=None,
        bound_ifindex=entry.bound_ifindex,
        mark=entry.mark or 0,
        uid=entry.uid,
        unknown=unknown,
    )


def flow_dict(flow: Flow) -> dict[str, Any]:
    return {
        "proto": PROTO_NAMES.get(flow.proto, str(flow.proto)),
        "local_addr": str(flow.local_addr),
        "local_port": flow.local_port,
        "remote_addr": str(flow.remote_addr),
        "remote_port": flow.remote_port,
    }


def itoken_dict(tok: IToken | None) -> dict[str, Any] | None:
    """An iToken's identity attributes (draft 2.1.2); the public key as hex DER SPKI."""
    if tok is None:
        return None
    method = tok.authentication_method
    key = tok.pub_key_id
    return {
        "authenticationMethod": method.name if method else None,
        "pubKeyID": key.hex() if key else None,
        "certificateDN": tok.certificate_dn,
        "certificateAuthorityDN": tok.certificate_authority_dn,
        "channelBinding": tok.channel_binding,
        "auditString": tok.audit_string,
    }


def _setting(value: Setting) -> str:
    return value.name


def ptoken_dict(tok: PToken) -> dict[str, Any]:
    """A pToken's attributes (draft 2.3.2) plus the selectors it covers."""
    return {
        "protected": tok.protected,
        "privacyProtected": _setting(tok.privacy_protected),
        "integrityProtected": _setting(tok.integrity_protected),
        "compressionAvailable": _setting(tok.compression_available),
        "tunnelMode": _setting(tok.tunnel_mode),
        "ipoptionsProtected": _setting(tok.ipoptions_protected),
        "policyName": tok.policy_name,
        "informationString": tok.information_string,
        "auditString": tok.audit_string,
        "iToken": itoken_dict(tok.itoken),
        "remote_iToken": itoken_dict(tok.remote_itoken),
        "local_ts": [str(t) for t in tok.local_ts],
        "remote_ts": [str(t) for t in tok.remote_ts],
    }


def alg_text(child: ChildSA) -> str:
    """``CHACHA20_POLY1305-256``, ``AES_CBC-128/HMAC_SHA2_256_128``, ..."""
    encr = child.encr_alg or "none"
    if child.encr_keysize:
        encr += f"-{child.encr_keysize}"
    return encr + (f"/{child.integ_alg}" if child.integ_alg else "")


def sa_name(ike: IkeSA, child: ChildSA) -> str:
    return f"{ike.name}/{child.name}"


def spis(child: ChildSA) -> str:
    return f"{child.spi_in:08x}/{child.spi_out:08x}"


def protection_dict(p: Protection) -> dict[str, Any]:
    """The SA pair carrying a flow, as ``sockets`` and ``token`` report it."""
    ike, child = p.ike_sa, p.child_sa
    return {
        "sa": sa_name(ike, child),
        "ike_sa": {
            "name": ike.name,
            "uniqueid": ike.uniqueid,
            "local_host": str(ike.local_host),
            "remote_host": str(ike.remote_host),
        },
        "child_sa": {"name": child.name, "uniqueid": child.uniqueid, "reqid": child.reqid},
        "spi_in": f"{child.spi_in:08x}",
        "spi_out": f"{child.spi_out:08x}",
        "protocol": child.protocol,
        "mode": child.mode,
        "algorithms": alg_text(child),
        "ipcomp": child.ipcomp,
        "encap": child.encap,
        "peer_id": ike.remote.ike_id,
        "auth_method": ike.remote.auth_method.name,
        "dataplane": p.proof.dataplane,
        "proof": p.proof.detail,
    }


def protection_cells(p: Protection | None) -> list[str]:
    """Table cells SA, SPI-IN/OUT, MODE, ALG, PEER-ID, AUTH; ``clear`` when nothing protects the flow."""
    if p is None:
        return ["clear", "", "", "", "", ""]
    ike, child = p.ike_sa, p.child_sa
    return [
        sa_name(ike, child),
        spis(child),
        f"{child.protocol}/{child.mode}".lower(),
        alg_text(child),
        ike.remote.ike_id,
        ike.remote.auth_method.name,
    ]


# ---- tokens as lines of text (btns token, the demos) -----------------------------------------


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
