"""Typed, frozen records of the kernel's XFRM SAD and SPD entries. Pure data, no I/O.

Field names follow ``linux/xfrm.h`` and ``ip xfrm``. Key material is never kept:
an algorithm is its kernel name and key length only.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from ..core.selectors import Flow, IPAddress, normalize_address

IPPROTO_ESP = 50
IPPROTO_AH = 51
IPPROTO_COMP = 108

#: XFRM protocol numbers and the words ``ip xfrm`` uses for them.
PROTO_NAMES = {IPPROTO_ESP: "esp", IPPROTO_AH: "ah", IPPROTO_COMP: "comp", 43: "route2", 60: "hao"}
#: ``XFRM_MODE_*``.
MODE_NAMES = {0: "transport", 1: "tunnel", 2: "ro", 3: "in_trigger", 4: "beet"}
#: ``XFRM_POLICY_IN/OUT/FWD``; socket policies are stored as ``XFRM_POLICY_MAX + dir``.
DIR_NAMES = {0: "in", 1: "out", 2: "fwd"}
XFRM_POLICY_MAX = 3
ACTION_NAMES = {0: "allow", 1: "block"}
#: ``XFRM_INF``: "no limit" in lifetime configurations.
XFRM_INF = 0xFFFF_FFFF_FFFF_FFFF


@dataclass(frozen=True)
class Selector:
    """``struct xfrm_selector``: which packets an SA or policy applies to. Ports are host order."""

    family: int
    saddr: IPAddress
    daddr: IPAddress
    prefixlen_s: int
    prefixlen_d: int
    sport: int = 0
    sport_mask: int = 0
    dport: int = 0
    dport_mask: int = 0
    proto: int = 0
    ifindex: int = 0
    user: int = 0

    @property
    def src(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return ipaddress.ip_network(f"{self.saddr}/{self.prefixlen_s}", strict=False)

    @property
    def dst(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return ipaddress.ip_network(f"{self.daddr}/{self.prefixlen_d}", strict=False)

    def matches(self, saddr: IPAddress, sport: int, daddr: IPAddress, dport: int, proto: int) -> bool:
        """True when a packet with these fields is selected (the kernel's ``xfrm_selector_match``)."""
        saddr, daddr = normalize_address(saddr), normalize_address(daddr)
        if self.family not in (0, socket.AF_INET if saddr.version == 4 else socket.AF_INET6):
            return False
        if saddr.version != self.saddr.version or daddr.version != self.daddr.version:
            return False
        if saddr not in self.src or daddr not in self.dst:
            return False
        if self.proto and self.proto != proto:
            return False
        return (sport ^ self.sport) & self.sport_mask == 0 and (dport ^ self.dport) & self.dport_mask == 0

    def covers(self, flow: Flow, direction: str = "out") -> bool:
        """True when the selector selects ``flow``'s packets travelling in ``direction`` ("out"/"in")."""
        if direction == "out":
            return self.matches(flow.local_addr, flow.local_port, flow.remote_addr, flow.remote_port, flow.proto)
        return self.matches(flow.remote_addr, flow.remote_port, flow.local_addr, flow.local_port, flow.proto)


@dataclass(frozen=True)
class Lifetime:
    """``struct xfrm_lifetime_cfg``; ``XFRM_INF`` means no limit."""

    soft_byte_limit: int = XFRM_INF
    hard_byte_limit: int = XFRM_INF
    soft_packet_limit: int = XFRM_INF
    hard_packet_limit: int = XFRM_INF
    soft_add_expires_seconds: int = 0
    hard_add_expires_seconds: int = 0
    soft_use_expires_seconds: int = 0
    hard_use_expires_seconds: int = 0


@dataclass(frozen=True)
class Current:
    """``struct xfrm_lifetime_cur``: counters and timestamps (seconds since the epoch)."""

    bytes: int = 0
    packets: int = 0
    add_time: int = 0
    use_time: int = 0


@dataclass(frozen=True)
class Stats:
    """``struct xfrm_stats``."""

    replay_window: int = 0
    replay: int = 0
    integrity_failed: int = 0


@dataclass(frozen=True)
class Algorithm:
    """One transform: ``kind`` is "crypt", "auth", "aead" or "comp"; ``name`` the kernel's (e.g. "cbc(aes)")."""

    kind: str
    name: str
    key_bits: int
    trunc_bits: int | None = None  # auth: ICV length in bits
    icv_bits: int | None = None  # aead: ICV length in bits


@dataclass(frozen=True)
class Mark:
    """``struct xfrm_mark``."""

    value: int
    mask: int


@dataclass(frozen=True)
class Encap:
    """``struct xfrm_encap_tmpl``: UDP encapsulation (type 2 = ESP-in-UDP). Ports are host order."""

    type: int
    sport: int
    dport: int
    oa: IPAddress | None = None


@dataclass(frozen=True)
class Template:
    """``struct xfrm_user_tmpl``: one transform a policy requires."""

    family: int
    daddr: IPAddress
    saddr: IPAddress
    spi: int
    proto: int
    mode: int
    reqid: int = 0
    share: int = 0
    optional: bool = False
    aalgos: int = 0xFFFF_FFFF
    ealgos: int = 0xFFFF_FFFF
    calgos: int = 0xFFFF_FFFF

    @property
    def proto_name(self) -> str:
        return PROTO_NAMES.get(self.proto, str(self.proto))

    @property
    def mode_name(self) -> str:
        return MODE_NAMES.get(self.mode, str(self.mode))

    @property
    def level(self) -> str:
        """The setkey/``ip xfrm`` word: "use" for an optional template, else "required"."""
        return "use" if self.optional else "required"


@dataclass(frozen=True)
class XfrmState:
    """One SA of the kernel's SAD (``struct xfrm_usersa_info`` and its attributes). ``spi`` is host order."""

    sel: Selector
    daddr: IPAddress
    saddr: IPAddress
    spi: int
    proto: int
    family: int
    mode: int
    reqid: int
    seq: int = 0
    replay_window: int = 0
    flags: int = 0
    lifetime: Lifetime = Lifetime()
    current: Current = Current()
    stats: Stats = Stats()
    algorithms: tuple[Algorithm, ...] = ()
    encap: Encap | None = None
    mark: Mark | None = None
    if_id: int = 0
    direction: int = 0  # XFRMA_SA_DIR (newer kernels): 1 in, 2 out, 0 unset

    @property
    def proto_name(self) -> str:
        return PROTO_NAMES.get(self.proto, str(self.proto))

    @property
    def mode_name(self) -> str:
        return MODE_NAMES.get(self.mode, str(self.mode))

    def algorithm(self, kind: str) -> Algorithm | None:
        """The transform of ``kind`` ("crypt", "auth", "aead", "comp"), if present."""
        return next((a for a in self.algorithms if a.kind == kind), None)


@dataclass(frozen=True)
class XfrmPolicy:
    """One SPD entry (``struct xfrm_userpolicy_info`` and its attributes), global or per-socket."""

    sel: Selector
    dir: int  # raw kernel value: >= XFRM_POLICY_MAX for socket policies
    priority: int
    index: int
    action: int = 0
    flags: int = 0
    share: int = 0
    lifetime: Lifetime = Lifetime()
    current: Current = Current()
    templates: tuple[Template, ...] = ()
    mark: Mark | None = None
    if_id: int = 0
    type: int = 0  # XFRM_POLICY_TYPE_MAIN (0) or _SUB (1)

    @property
    def is_socket(self) -> bool:
        """True for a per-socket policy (``ip xfrm`` prints "socket in"/"socket out")."""
        return self.dir >= XFRM_POLICY_MAX

    @property
    def direction(self) -> str:
        """ "in", "out" or "fwd", the same for socket policies (see :attr:`is_socket`)."""
        d = self.dir - XFRM_POLICY_MAX if self.is_socket else self.dir
        return DIR_NAMES.get(d, str(d))

    @property
    def action_name(self) -> str:
        return ACTION_NAMES.get(self.action, str(self.action))


@dataclass(frozen=True)
class Acquire:
    """``struct xfrm_user_acquire``: the kernel asks the key manager for an SA."""

    daddr: IPAddress
    saddr: IPAddress
    spi: int
    proto: int
    sel: Selector
    policy: XfrmPolicy
    aalgos: int
    ealgos: int
    calgos: int
    seq: int
    templates: tuple[Template, ...] = ()


@dataclass(frozen=True)
class XfrmEvent:
    """One multicast notification. ``kind`` is one of :data:`EVENT_KINDS`' values."""

    kind: str
    state: XfrmState | None = None
    policy: XfrmPolicy | None = None
    acquire: Acquire | None = None
    hard: bool = False  # expire/polexpire: hard (True) or soft
    proto: int = 0  # flush-sa: the protocol flushed (0 = all)


#: XFRM_MSG_* types carried to listeners, and the event kind each becomes.
EVENT_KINDS = {
    16: "new-sa",
    17: "del-sa",
    19: "new-policy",
    20: "del-policy",
    23: "acquire",
    24: "expire",
    25: "update-policy",
    26: "update-sa",
    27: "polexpire",
    28: "flush-sa",
    29: "flush-policy",
}
