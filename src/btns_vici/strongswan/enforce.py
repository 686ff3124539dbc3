"""ipsec_set_socket_pToken for strongSwan: VICI connections whose auth and proposals meet a pToken.

What the library builds itself are raw-key connections (README "Enforcement"):
our host key (:mod:`btns_vici.hostkey`) against the peer's bare public key, no
certificate, no CA. strongSwan cannot accept a raw key it does not know, so the
peer key comes either from the demanded iToken (a pinned key: leap of faith)
or from the directory of peer keys ``options["peer_keys"]`` / ``$BTNS_PEER_KEYS``
(BTNS in strongSwan terms: keys exchanged out of band, anchored nowhere).
PSK and X.509 protection is accepted when an operator-configured connection
already provides it; methods strongSwan lacks (NULL auth, group keys) are EOPNOTSUPP.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import guard, knownpeers, leap
from ..backend import Enforcement
from ..core.constants import Attr
from ..core.errors import BtnsError, NotSupportedError
from ..core.records import XFRM
from ..core.requirements import (
    allowed_methods,
    is_no_demand,
    is_opportunistic,
    operator_policy,
)
from ..core.tokens import PToken
from ..hookspecs import hookimpl
from .conns import (
    XFRM_REQID,
    check_supported,
    conn_config,
    conn_name,
    demand_allows_raw_keys,
    pinned_key,
)

if TYPE_CHECKING:  # hostkey imports cryptography: loaded when a key is, not with the plugin
    from ..hostkey import HostIdentity


def local_identity(demand: PToken, options: Mapping[str, str]) -> HostIdentity:
    """Which of our keys to authenticate with: the one the demanded remote_iToken names, else host.key.

    Every ``*.key`` (PKCS#8 PEM, owner-only) in the key directory is one of our identities; a
    remote_iToken pinning a pubKeyID selects the key whose public half it is (ENOKEY if none).
    """
    from ..hostkey import HostIdentity, _check_private, key_dir, load_or_create

    default = load_or_create(options.get("key_dir"))
    tok = demand.remote_itoken
    wanted = tok.pub_key_id if tok is not None else None
    if wanted is None or wanted == default.public_der:
        return default
    from cryptography.hazmat.primitives import serialization

    directory = key_dir(options.get("key_dir"))
    for path in sorted(directory.glob("*.key")):
        try:
            _check_private(path)
            pem = path.read_bytes()
            key = serialization.load_pem_private_key(pem, password=None)
        except (OSError, ValueError, TypeError, BtnsError):
            continue
        der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if der == wanted:
            return HostIdentity(path, pem, der)
    raise BtnsError(
        f"the demanded remote_iToken names a key that is none of ours (no matching *.key in {directory})",
        errno.ENOKEY,
    )


def peer_keys(
    demand: PToken, options: Mapping[str, str], peer: Any = None, session: Any = None, local: Any = None
) -> list[bytes]:
    """DER SPKI keys the peer may authenticate with: the pinned one; else, with leap of faith on
    (README "Leap of faith"), the key the peer ``peer`` presents in the key exchange (sent from
    ``local``, the connection's own address), checked against the known-peers store; else the
    peer-key directory."""
    pinned = pinned_key(demand)
    if pinned is not None:
        return [pinned]
    if peer is not None and leap.enabled(options):
        return [leap.initiator_key(peer, allowed_methods(demand), options, session, local)]
    directory = options.get("peer_keys") or os.environ.get("BTNS_PEER_KEYS")
    keys = []
    if directory and Path(directory).is_dir():
        for path in sorted(Path(directory).iterdir()):
            if path.suffix in (".pem", ".pub") and path.is_file():
                keys.append(_der_of(path.read_bytes(), path))
    if not keys and leap.enabled(options):
        # A listener with leap of faith and no configured keys: the learner loads one responder
        # connection per peer it learns; this one only our own key could satisfy (a placeholder).
        from ..hostkey import load_or_create

        knownpeers.register(options.get("key_dir"))
        return [load_or_create(options.get("key_dir")).public_der]
    if not keys:
        raise BtnsError(
            "strongSwan cannot accept an unknown raw key: pin the peer with an iToken or put its public "
            "key (PEM) into the peer-key directory ($BTNS_PEER_KEYS)",
            errno.ENOKEY,
        )
    return keys


def _der_of(data: bytes, where: Path) -> bytes:
    from cryptography.hazmat.primitives import serialization

    try:
        key = (
            serialization.load_pem_public_key(data)
            if b"-----BEGIN" in data
            else (serialization.load_der_public_key(data))
        )
    except ValueError as exc:
        raise BtnsError(f"{where}: not a public key ({exc})", errno.EINVAL) from None
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


# -- talking to charon (the I/O edge of this module) ------------------------------------------


def _load_host_key(session: Any, host: HostIdentity) -> None:
    session.request("load-key", {"type": "any", "data": host.private_pem.decode()})


def establish(
    session: Any,
    dataplane: str,
    options: Mapping[str, str],
    local_addr: ipaddress.IPv4Address | ipaddress.IPv6Address,
    remote_addr: ipaddress.IPv4Address | ipaddress.IPv6Address,
    demand: PToken,
    timeout_ms: int = 10000,
) -> str:
    """Load and initiate a raw-key connection to ``remote_addr`` meeting ``demand``; its name."""

    check_supported(demand, dataplane)
    if is_no_demand(demand):
        return ""  # the system default: nothing to negotiate
    op = operator_policy(demand)
    if op is not None:
        return initiate_operator(session, op, remote_addr, timeout_ms)
    if is_opportunistic(demand):
        try:
            return establish(session, dataplane, options, local_addr, remote_addr, _without_policy(demand), timeout_ms)
        except BtnsError:
            return ""  # "use": the peer cannot; the connection goes out in clear, and is reported so
    if not demand_allows_raw_keys(demand):
        raise NotSupportedError(
            "the demanded authentication methods need a connection the operator configured "
            "(the library builds raw-key connections only), and no such SA covers this flow"
        )
    host = local_identity(demand, options)
    keys = peer_keys(demand, options, peer=remote_addr, session=session, local=local_addr)
    name = conn_name("init", str(local_addr), str(remote_addr), demand, keys, dataplane, _alt(host, options))
    _load_host_key(session, host)
    session.request("load-conn", conn_config(name, local_addr, remote_addr, host, keys, demand, dataplane))
    try:
        _initiate(session, name, name, timeout_ms, f"no SA meeting the pToken could be negotiated with {remote_addr}")
    except BtnsError:
        _unload_if_idle(session, name)
        raise
    return name


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _unload_if_idle(session: Any, name: str) -> None:
    """A failed negotiation leaves nothing behind: charon would go on retransmitting for its IKE_SA
    after the initiate's timeout, so the half-open IKE_SAs of ``name`` are terminated, and the
    connection goes unless an established IKE_SA (another socket's, same demand) still uses it.
    Best effort: the error that matters is the caller's."""
    try:
        established = False
        for entry in session.list_sas(ike=name):
            for sa in entry.values():
                if not isinstance(sa, dict):
                    continue
                state, ike_id = (
                    v.decode() if isinstance(v, bytes) else str(v) for v in (sa.get("state"), sa.get("uniqueid"))
                )
                if state == "ESTABLISHED":
                    established = True
                elif ike_id.isdigit():
                    session.streamed("terminate", "control-log", {"ike-id": ike_id, "force": "yes", "timeout": "-1"})
        if not established:
            session.request("unload-conn", {"name": name})
    except OSError:
        pass


def _initiate(session: Any, ike: str, child: str, timeout_ms: int, failure: str) -> None:
    """VICI ``initiate`` of ``ike``/``child`` within ``timeout_ms``; EHOSTUNREACH ("failure: why") if not up."""
    msg = {"ike": ike, "child": child, "timeout": str(timeout_ms), "init-limits": "no"}
    try:
        session.streamed("initiate", "control-log", msg)
    except BtnsError as exc:
        raise BtnsError(f"{failure}: {exc.strerror}", errno.EHOSTUNREACH) from None


def _alt(host: HostIdentity, options: Mapping[str, str]) -> bytes:
    """Our key's DER when it is not the default host key (part of the connection's name), else b""."""
    from ..hostkey import KEY_NAME

    return b"" if host.path.name == KEY_NAME else host.public_der


def _without_policy(demand: PToken) -> PToken:
    """``demand`` without its policyName keyword (what an opportunistic attempt negotiates)."""
    out = PToken()
    for attr, value in demand.attributes().items():
        if attr != Attr.policyName:
            out.set_attr(attr, value)
    return out


def initiate_operator(session: Any, op: tuple[str, str | None], remote_addr: Any, timeout_ms: int = 10000) -> str:
    """Bring up the operator connection the demanded policyName names (conn, child) unless it is up."""
    conn, child = op
    known: dict[str, Any] = {}
    for entry in session.list_conns(ike=conn):
        known.update(entry)
    cfg = known.get(conn)
    if cfg is None:
        raise BtnsError(f"policyName {conn!r}: the IKE daemon has no such connection", errno.EHOSTUNREACH)
    children = list((cfg.get("children") or {}).keys())
    if child is None:
        if not children:
            raise BtnsError(f"policyName {conn!r}: the connection has no CHILD config", errno.EHOSTUNREACH)
        child = children[0] if isinstance(children[0], str) else children[0].decode()
    elif child not in [c if isinstance(c, str) else c.decode() for c in children]:
        raise BtnsError(f"policyName {conn}/{child}: no such CHILD config", errno.EHOSTUNREACH)
    _initiate(session, conn, child, timeout_ms, f"operator connection {conn}/{child} to {remote_addr} did not come up")
    return f"{conn}/{child}"


def serve(
    session: Any,
    dataplane: str,
    options: Mapping[str, str],
    local_addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
    demand: PToken,
) -> str:
    """Load a responder connection for ``local_addr`` (None: any of ours, a wildcard-bound
    listener) accepting peers that meet ``demand``; its name."""

    check_supported(demand, dataplane)
    if local_addr is not None and local_addr.is_unspecified:
        local_addr = None  # bound to 0.0.0.0 / ::: any of our addresses
    if is_no_demand(demand) or operator_policy(demand) is not None:
        return ""  # nothing to load: the system default, or the operator's own connection answers
    if is_opportunistic(demand):
        demand = _without_policy(demand)
        try:
            peer_keys(demand, options)
        except BtnsError:
            return ""  # "use" without any peer key: clear only
    if not demand_allows_raw_keys(demand):
        raise NotSupportedError("the library builds raw-key responder connections only")
    host = local_identity(demand, options)
    keys = peer_keys(demand, options)
    name = conn_name("resp", str(local_addr or "%any"), "%any", demand, keys, dataplane, _alt(host, options))
    _load_host_key(session, host)
    session.request("load-conn", conn_config(name, local_addr, None, host, keys, demand, dataplane))
    return name


def operator_reqid(session: Any, op: tuple[str, str | None], remote: Any = None) -> int:
    """The reqid an operator connection's CHILD_SAs use: of one installed now (to ``remote``, if
    given), else configured (0: unknown)."""
    conn, child = op
    for entry in session.list_sas(ike=conn):
        for sec in entry.values():
            if remote is not None and _text(sec.get("remote-host", b"")) != str(remote):
                continue
            for c in (sec.get("child-sas") or {}).values():
                name = c.get("name", b"").decode()
                if (child is None or name == child) and c.get("state") == b"INSTALLED":
                    return int(c.get("reqid", b"0"))
    for entry in session.list_conns(ike=conn):
        for sec in entry.values():
            for name, c in (sec.get("children") or {}).items():
                name = name if isinstance(name, str) else name.decode()
                if child is None or name == child:
                    with contextlib.suppress(ValueError, TypeError):
                        return int(c.get("reqid", b"0"))
    return 0


class EnforceHooks:
    """The enforcement hooks of the strongSwan plugin (mixed into StrongswanPlugin)."""

    def context(self, options: Mapping[str, str]) -> Any:  # provided by the plugin
        raise NotImplementedError

    @hookimpl
    def btns_enforce(self, options: Mapping[str, str], sock: Any, ptoken: PToken) -> Enforcement:
        ctx = self.context(options)
        dataplane = ctx.dataplane()
        check_supported(ptoken, dataplane)
        if is_no_demand(ptoken):
            return Enforcement(connection="(none: system default)", dataplane_guard="none (no demand)")
        trap = dataplane == XFRM and options.get("acquire", "yes") != "no"
        if is_opportunistic(ptoken):
            if trap:  # a plain connect(2)'s ACQUIRE attempts the SA; clear until (unless) it is up
                return Enforcement(
                    connection="(attempted on the kernel's ACQUIRE; clear if the peer cannot)",
                    dataplane_guard=self._trap(options, sock, ptoken, XFRM_REQID, use=True),
                )
            how = guard.apply(sock, dataplane, reqid=XFRM_REQID if dataplane == XFRM else 0, optional=True)
            return Enforcement(
                connection="(attempted on connect/listen; clear if the peer cannot)", dataplane_guard=how
            )
        op = operator_policy(ptoken)
        reqid = XFRM_REQID
        if op is not None and dataplane == XFRM:
            reqid = operator_reqid(ctx.session, op) or XFRM_REQID
        if trap:
            # A plain connect(2) negotiates through the kernel's ACQUIRE (btns_vici.acquire).
            return Enforcement(
                connection="(negotiated on the kernel's ACQUIRE)",
                dataplane_guard=self._trap(options, sock, ptoken, reqid),
            )
        how = guard.apply(sock, dataplane, reqid=reqid if dataplane == XFRM else 0)
        return Enforcement(connection="(established on connect/listen)", dataplane_guard=how)

    def _trap(self, options: Mapping[str, str], sock: Any, ptoken: PToken, reqid: int, use: bool = False) -> str:
        from .. import acquire
        from ..backend import Backend
        from ..plugins import get_plugin_manager

        def negotiate(flow: Any, demand: PToken) -> tuple[str, int]:
            """The connection negotiated for ``flow`` and, for an operator's, its SA's reqid (from
            charon once the initiate returned: the event-fed index may not have seen it yet)."""
            ctx = self.context(options)
            name = establish(
                ctx.session, XFRM, options, flow.local_addr, flow.remote_addr, demand, acquire.NEGOTIATION_MS
            )
            op = operator_policy(demand)
            return name, operator_reqid(ctx.session, op, flow.remote_addr) if op is not None else 0

        def backend() -> Backend:
            return Backend(get_plugin_manager(), "strongswan", options)

        how = acquire.arm(sock, ptoken, reqid, options, backend, negotiate, use)
        # A socket already bound to an address (a server, before its plain listen(2)): peers may
        # negotiate with us from now on (the wrapper's listen() does the same).
        from ..sockets import borrowed_socket, endpoint

        with borrowed_socket(sock) as s:
            addr, port = endpoint(s.getsockname())
        if port:  # ("btns:use": loaded when a peer key is known, else nothing: clear only)
            serve(self.context(options).session, XFRM, options, addr, ptoken)
        return how

    @hookimpl
    def btns_establish(self, options: Mapping[str, str], flow: Any, ptoken: PToken) -> str:
        ctx = self.context(options)
        return establish(ctx.session, ctx.dataplane(), options, flow.local_addr, flow.remote_addr, ptoken)

    @hookimpl
    def btns_serve(self, options: Mapping[str, str], local_addr: Any, ptoken: PToken) -> str:
        ctx = self.context(options)
        return serve(ctx.session, ctx.dataplane(), options, local_addr, ptoken)

    @hookimpl
    def btns_release(self, options: Mapping[str, str], name: str) -> bool:
        """Terminate the IKE_SA of ``name`` (if any) and unload the connection."""
        ctx = self.context(options)
        with contextlib.suppress(BtnsError):
            ctx.session.streamed("terminate", "control-log", {"ike": name, "force": "yes", "timeout": "-1"})
        ctx.session.request("unload-conn", {"name": name})
        return True
