"""Normalized SA records: what every backend yields, whatever its IKE daemon. Pure data.

A backend (strongSwan over VICI, libreswan over whack, ...) turns its daemon's
view into these frozen dataclasses; :mod:`btns_vici.core.derive` turns them into tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .constants import AuthMethod
from .selectors import Flow, IPAddress, TrafficSelector, flow_covered


@dataclass(frozen=True)
class Identity:
    """One end of an IKE_SA as authenticated (or configured to be authenticated)."""

    ike_id: str  # the IKE identity as the daemon prints it
    auth_method: AuthMethod  # normalized from the daemon's auth class / authby
    public_key: bytes | None = None  # DER SubjectPublicKeyInfo of the authenticated key
    certificate_dn: str | None = None  # subject DN of the end-entity certificate
    ca_dn: str | None = None  # DN of the CA that vouched for it
    auth_class: str = ""  # the daemon's own word ("public key", "pre-shared key", "null", ...)


@dataclass(frozen=True)
class ChildSA:
    """One CHILD_SA (an ESP/AH SA pair)."""

    name: str
    uniqueid: str
    reqid: int
    state: str  # "INSTALLED", "REKEYING", ...
    mode: str  # "TUNNEL" | "TRANSPORT" | "BEET"
    protocol: str  # "ESP" | "AH"
    spi_in: int
    spi_out: int
    encr_alg: str | None  # e.g. "AES_GCM_16", "AES_CBC", "NULL"; None for AH
    encr_keysize: int | None  # bits
    integ_alg: str | None  # e.g. "HMAC_SHA2_256_128"; None for AEAD
    local_ts: tuple[TrafficSelector, ...]
    remote_ts: tuple[TrafficSelector, ...]
    encap: bool = False  # UDP encapsulation (NAT-T)
    ipcomp_cpi_in: int | None = None
    ipcomp_cpi_out: int | None = None
    dh_group: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    packets_in: int = 0
    packets_out: int = 0
    install_time: int | None = None  # seconds since installation
    rekey_time: int | None = None
    life_time: int | None = None

    @property
    def installed(self) -> bool:
        return self.state.upper() in {"INSTALLED", "REKEYING", "REKEYED"}

    @property
    def ipcomp(self) -> bool:
        return self.ipcomp_cpi_in is not None or self.ipcomp_cpi_out is not None

    def covers(self, flow: Flow) -> bool:
        return flow_covered(flow, self.local_ts, self.remote_ts)


@dataclass(frozen=True)
class IkeSA:
    """One IKE_SA with its CHILD_SAs, normalized."""

    backend: str  # name of the backend plugin that produced it
    name: str  # connection name
    uniqueid: str
    version: int  # IKE version (1 or 2)
    state: str  # "ESTABLISHED", ...
    local_host: IPAddress
    remote_host: IPAddress
    local: Identity
    remote: Identity
    children: tuple[ChildSA, ...] = ()
    encr_alg: str | None = None
    integ_alg: str | None = None
    prf_alg: str | None = None
    dh_group: str | None = None
    established: int | None = None  # seconds since establishment
    local_spi: str = ""
    remote_spi: str = ""
    extra: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def is_established(self) -> bool:
        return self.state.upper() == "ESTABLISHED"

    def child_for(self, flow: Flow) -> ChildSA | None:
        """The installed CHILD_SA covering ``flow``, if any."""
        if not self.is_established:
            return None
        for child in self.children:
            if child.installed and child.covers(flow):
                return child
        return None


#: The two Linux data planes (README "Data planes"): the kernel's own XFRM SAs and policies, and
#: charon's userspace ESP over the TUN device :data:`LIBIPSEC_DEVICE`.
XFRM = "kernel-xfrm"
LIBIPSEC = "kernel-libipsec"
LIBIPSEC_DEVICE = "ipsec0"


@dataclass(frozen=True)
class DataplaneProof:
    """Evidence that the kernel really carries a flow through a given SA."""

    dataplane: str  # XFRM | LIBIPSEC
    detail: str  # human-readable: which state/policy/route proved it
    spi_out: int | None = None
    reqid: int | None = None
    #: False when a clear packet from the peer's address could still reach the socket (libipsec
    #: without an inbound filter): what it receives then has no integrity protection.
    inbound: bool = True


@dataclass(frozen=True)
class Protection:
    """A verified answer for one flow: the SA pair and the data-plane proof."""

    flow: Flow
    ike_sa: IkeSA
    child_sa: ChildSA
    proof: DataplaneProof


#: What a query covers: a socket's whole traffic, one datagram it sends, one datagram it received.
BOTH, OUT, IN = "both", "out", "in"


@dataclass(frozen=True)
class SocketView:
    """A socket as the kernel will treat its packets: the flow plus every key routing depends on.

    ``netns`` is the (st_dev, st_ino) of the socket's network namespace (SIOCGSKNS),
    ``bound_ifindex`` its SO_BINDTODEVICE, ``unicast_ifindex`` its IP(V6)_UNICAST_IF,
    ``mark`` its SO_MARK, ``uid`` its owner (what uid-range rules match), ``tos`` its
    IP_TOS / IPV6_TCLASS, ``dontroute`` its SO_DONTROUTE. ``direction`` says what is asked
    about: the socket's traffic both ways, one datagram it sends (``out``, where
    ``arrival_ifindex`` is None) or one it received (``in``, ``arrival_ifindex`` from
    IP_PKTINFO). ``unknown`` names facts that could not be read: any makes the answer
    unprotected (fail closed).
    """

    flow: Flow
    netns: tuple[int, int] | None
    key: tuple[int, int] | None = None
    bound_ifindex: int = 0
    unicast_ifindex: int = 0
    mark: int = 0
    uid: int | None = None
    tos: int = 0
    dontroute: bool = False
    direction: str = BOTH
    arrival_ifindex: int | None = None
    unknown: tuple[str, ...] = ()

    @property
    def oif(self) -> int:
        """The device the kernel is told to send by: the bound device, else (UDP) the unicast_if."""
        return self.bound_ifindex or self.unicast_ifindex

    def facts(self) -> str:
        """The keys as informationString/auditString name them."""
        ns = f"net:[{self.netns[1]}]" if self.netns else "unknown"
        parts = [f"netns={ns}", f"dev={self.bound_ifindex or 'none'}", f"mark=0x{self.mark:x}"]
        if self.unicast_ifindex:
            parts.append(f"unicast_if={self.unicast_ifindex}")
        if self.uid is not None:
            parts.append(f"uid={self.uid}")
        if self.tos:
            parts.append(f"tos=0x{self.tos:x}")
        if self.dontroute:
            parts.append("dontroute")
        if self.arrival_ifindex is not None:
            parts.append(f"arrived_ifindex={self.arrival_ifindex}")
        return " ".join(parts)


@dataclass(frozen=True)
class NotCarried:
    """Why the data plane does not carry a socket's packets through an SA (the fail-closed answer)."""

    reason: str
