"""whack's text output -> plain data. Pure: no I/O, one function per whack command.

Handles libreswan 4.x (every line prefixed with a 3-digit code, ``000 ``,
state names ``STATE_V2_...``, id types ``ID_FQDN``, selectors ``net:tcp/80``)
and 5.x (no prefix, ``ESTABLISHED_IKE_SA``, ``FQDN``, ``{net}/TCP/80``,
``host: oriented; local: A; remote: B;``). Lines not understood are skipped,
but output without the structure a command always prints raises ProtocolError.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from btns_vici.core.errors import ProtocolError
from btns_vici.core.selectors import IPAddress, TrafficSelector

_CODE = re.compile(r"^\d{3} ")
# "name"[1][2] ...peer (5.x) or "name"[1] peer (4.x): the peer part only on template instances
_REF = r'"(?P<name>[^"]*)"(?P<inst>(?:\[\d+\])*)(?: (?:\.\.\.)?[0-9a-fA-F:.%]+?)?'
_CONN_LINE = re.compile(_REF + r"(?::\s+(?P<rest>.*))?$")
_STATE_LINE = re.compile(
    r"^#(?P<serial>\d+): " + _REF + r"(?::(?P<port>\d+))?(?:\(tcp\))? (?P<state>[A-Z][A-Z0-9_]+) \((?P<story>[^)]*)\);"
    r"(?P<rest>.*)$"
)
_DETAIL_LINE = re.compile(r"^#(?P<serial>\d+): " + _REF + r" (?P<rest>.*\bTraffic:.*)$")
_TRAFFIC_LINE = re.compile(r"^#(?P<serial>\d+): " + _REF + r", (?P<rest>.*)$")
_SAID = re.compile(r"\b(?P<proto>esp|ah|comp|tun)[.:](?P<spi>[0-9a-fA-F]+)@(?P<addr>[0-9a-fA-F:.]+)")
_PROTOS = {
    "all": 0,
    "any": 0,
    "icmp": 1,
    "tcp": 6,
    "udp": 17,
    "gre": 47,
    "esp": 50,
    "ah": 51,
    "ipv6-icmp": 58,
    "icmpv6": 58,
    "sctp": 132,
}


def _lines(text: str) -> list[str]:
    return [_CODE.sub("", line, count=1).rstrip() for line in text.splitlines()]


def conn_key(name: str, inst: str) -> str:
    """How every command refers to one connection instance: ``name`` plus ``[n]`` suffixes."""
    return name + inst


@dataclass
class Conn:
    """One connection from ``--status``: ends, identities, auth, algorithms."""

    name: str
    key: str
    local_host: str = ""
    remote_host: str = ""
    local_client: str = ""
    remote_client: str = ""
    local_id: str = ""
    remote_id: str = ""
    local_idtype: str = ""
    remote_idtype: str = ""
    our_auth: str = ""
    their_auth: str = ""
    policy: str = ""
    ike_alg: str = ""
    ike_version: int | None = None
    esp_alg: str = ""
    ah_alg: str = ""


@dataclass
class State:
    """One IKE or IPsec SA from ``--showstates``/``--status``."""

    serial: int
    conn_key: str
    name: str
    state: str
    story: str
    parent: int | None = None  # the IKE/ISAKMP SA of an IPsec SA
    saids: list[tuple[str, int, str]] = field(default_factory=list)  # (proto, spi, address)
    traffic: dict[str, str] = field(default_factory=dict)  # ESPin=84B ... as printed
    rest: str = ""


@dataclass
class Traffic:
    """One line of ``--trafficstatus``."""

    serial: int
    conn_key: str
    fields: dict[str, str]

    @property
    def peer_id(self) -> str | None:
        return self.fields.get("id")

    def count(self, key: str) -> int:
        try:
            return int(self.fields.get(key, "0"))
        except ValueError:
            return 0


@dataclass
class Status:
    """What ``--status`` says: connections, states, and the config file pluto loaded."""

    conns: dict[str, Conn]
    states: dict[int, State]
    configfile: str | None = None
    version: str | None = None
    nssdir: str | None = None


# --- the conn line: [client===]host[id]---hop...hop---host[id][===client] -------------------


def _split_outside_brackets(text: str, sep: str) -> list[str]:
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        ch = text[i]
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth = max(0, depth - 1)
        elif depth == 0 and text.startswith(sep, i):
            parts.append(text[start:i])
            i += len(sep)
            start = i
            continue
        i += 1
    parts.append(text[start:])
    return parts


def _strip_ids(text: str) -> str:
    return re.sub(r"\[[^\]]*\]", "", text)


def _host(token: str) -> str:
    token = re.sub(r"<[^>]*>", "", token).strip()
    try:
        return str(ipaddress.ip_address(token))
    except ValueError:
        host, _, port = token.rpartition(":")
        if port.isdigit() and host:
            try:
                return str(ipaddress.ip_address(host))
            except ValueError:
                pass
    return token  # %any, %null, %defaultroute: not an address


def _parse_ends(conn: Conn, body: str) -> None:
    ends = _split_outside_brackets(body, "...")
    if len(ends) != 2:
        return
    left, right = (_strip_ids(e) for e in ends)
    lparts, rparts = left.split("==="), right.split("===")
    conn.local_client = lparts[0] if len(lparts) > 1 else ""
    conn.remote_client = rparts[1] if len(rparts) > 1 else ""
    conn.local_host = conn.local_host or _host(lparts[-1].split("---")[0])
    conn.remote_host = conn.remote_host or _host(rparts[0].split("---")[-1])


def _parse_conn_detail(conn: Conn, rest: str) -> None:
    if m := re.match(r"host: \w+; local: ([^;]+); remote: ([^;]+);", rest):
        conn.local_host, conn.remote_host = _host(m.group(1)), _host(m.group(2))
    elif m := re.match(r"our auth:([^,]*), their auth:([^,]*),", rest):
        conn.our_auth, conn.their_auth = m.group(1).strip(), m.group(2).strip()
    elif m := re.match(r"our idtype: ([^;]*); our id=(.*?); their idtype: ([^;]*); their id=(.*)$", rest):
        conn.local_idtype, conn.local_id, conn.remote_idtype, conn.remote_id = (g.strip() for g in m.groups())
    elif rest.startswith("policy: "):
        conn.policy = rest[len("policy: ") :].rstrip(";")
        if "IKEv2" in conn.policy.split("+"):
            conn.ike_version = 2
        elif "IKEv1" in conn.policy.split("+"):
            conn.ike_version = 1
    elif m := re.match(r"(IKEv2|IKE) algorithm newest: ([^;\s]+)", rest):
        conn.ike_alg = m.group(2)
        conn.ike_version = conn.ike_version or (2 if m.group(1) == "IKEv2" else 1)
    elif m := re.match(r"(ESP|AH) algorithm newest: ([^;\s]+)", rest):
        setattr(conn, f"{m.group(1).lower()}_alg", m.group(2))


def _parse_conns(lines: list[str]) -> dict[str, Conn]:
    conns: dict[str, Conn] = {}
    for line in lines:
        if not line.startswith('"'):
            continue
        m = _CONN_LINE.match(line)
        if not m or m.group("rest") is None:
            continue
        key = conn_key(m.group("name"), m.group("inst"))
        rest = m.group("rest").strip()
        conn = conns.get(key)
        if conn is None:
            if "..." not in rest:
                continue  # not a first conn line (e.g. a log line quoting a name)
            conn = conns[key] = Conn(m.group("name"), key)
            _parse_ends(conn, rest.split("; ", 1)[0])
        else:
            _parse_conn_detail(conn, rest)
    return conns


# --- states -----------------------------------------------------------------------------------


def _parse_states(lines: list[str]) -> dict[int, State]:
    states: dict[int, State] = {}
    for line in lines:
        if m := _STATE_LINE.match(line):
            serial = int(m.group("serial"))
            parent = re.search(r"\b(?:IKE|ISAKMP|Parent) SA #(\d+)", m.group("rest"))
            states[serial] = State(
                serial,
                conn_key(m.group("name"), m.group("inst")),
                m.group("name"),
                m.group("state"),
                m.group("story"),
                int(parent.group(1)) if parent else None,
                rest=m.group("rest").strip(),
            )
        elif (m := _DETAIL_LINE.match(line)) and int(m.group("serial")) in states:
            st = states[int(m.group("serial"))]
            saids_text, _, traffic_text = m.group("rest").partition("Traffic:")
            st.saids = [
                (s.group("proto"), int(s.group("spi"), 16), s.group("addr")) for s in _SAID.finditer(saids_text)
            ]
            st.traffic = dict(kv.split("=", 1) for kv in traffic_text.split() if "=" in kv)
    return states


def parse_showstates(text: str) -> dict[int, State]:
    """``whack --showstates``: every state by serial number."""
    lines = [line for line in _lines(text) if line.strip()]
    bad = [line for line in lines if not line.startswith("#")]
    if bad:
        raise ProtocolError(f"whack --showstates: unexpected line {bad[0][:120]!r}")
    return _parse_states(lines)


def parse_trafficstatus(text: str) -> dict[int, Traffic]:
    """``whack --trafficstatus``: byte counters and peer id of each established IPsec SA."""
    out: dict[int, Traffic] = {}
    for line in _lines(text):
        if not line.strip():
            continue
        m = _TRAFFIC_LINE.match(line)
        if not m:
            raise ProtocolError(f"whack --trafficstatus: unexpected line {line[:120]!r}")
        fields = {}
        for part in re.finditer(r"(\w+)=('(?:[^']*)'|[^,]*)", m.group("rest")):
            fields[part.group(1)] = part.group(2).strip("'")
        out[int(m.group("serial"))] = Traffic(
            int(m.group("serial")), conn_key(m.group("name"), m.group("inst")), fields
        )
    return out


def parse_status(text: str) -> Status:
    """``whack --status``: connections, states and the config file."""
    lines = _lines(text)
    if not any(line.strip() == "Connection list:" for line in lines):
        raise ProtocolError("whack --status: no 'Connection list:' in the output; not pluto's status")
    cfg = next((m.group(1) for line in lines if (m := re.search(r"\bconfigfile=([^,\s]+)", line))), None)
    ver = next((m.group(1) for line in lines if (m := re.search(r"\bpluto_version=([^,\s]+)", line))), None)
    nss = next((m.group(1) for line in lines if (m := re.search(r"\bnssdir=([^,\s]+)", line))), None)
    return Status(_parse_conns(lines), _parse_states(lines), cfg, ver, nss)


def parse_listpubkeys(text: str) -> dict[str, set[str]]:
    """``whack --listpubkeys``: {identity: {key ids}} (ids without their type, e.g. ``@east``)."""
    lines = _lines(text)
    if text.strip() and not any(line.strip() == "List of Public Keys:" for line in lines):
        raise ProtocolError("whack --listpubkeys: no 'List of Public Keys:' header")
    keys: dict[str, set[str]] = {}
    current: str | None = None
    for line in lines:
        if m := re.search(r" Key (\S+) \(", line):
            current = m.group(1)
        elif current and (m := re.match(r"\s+\S+ '(.*)'$", line)):
            keys.setdefault(m.group(1), set()).add(current)
            current = None
    return keys


# --- selectors and algorithms --------------------------------------------------------------------

_SEL = re.compile(
    r"^(?P<lo>[0-9a-fA-F:.]+)(?:-(?P<hi>[0-9a-fA-F:.]+))?(?:/(?P<len>\d+))?"
    r"(?:[:/](?P<proto>[A-Za-z][\w-]*|\d+)(?:/(?P<port>\d+)(?:-(?P<port_hi>\d+))?)?)?$"
)


def parse_selectors(text: str, host: str) -> tuple[TrafficSelector, ...]:
    """Selectors as printed on a conn line (4.x ``net:tcp/80``, 5.x ``{net}/TCP/80``); none = the host."""
    text = text.strip().strip("{}")
    if not text:
        try:
            return (TrafficSelector.from_network(host),)
        except ValueError:
            return ()
    out = []
    for part in text.replace("{", "").replace("}", "").split(","):
        m = _SEL.match(part.strip())
        if not m:
            raise ProtocolError(f"unparseable selector {part!r}")
        try:
            lo: IPAddress = ipaddress.ip_address(m.group("lo"))
            if m.group("hi"):
                hi: IPAddress = ipaddress.ip_address(m.group("hi"))
            else:
                net = ipaddress.ip_network(f"{lo}/{m.group('len') or lo.max_prefixlen}", strict=False)
                lo, hi = net.network_address, net.broadcast_address
            proto_text = (m.group("proto") or "0").lower()
            proto = int(proto_text) if proto_text.isdigit() else _PROTOS[proto_text]
            port_lo = int(m.group("port") or 0)
            port_hi = int(m.group("port_hi") or (port_lo if port_lo else 65535))
            out.append(TrafficSelector(lo, hi, proto, port_lo, port_hi))
        except (KeyError, ValueError) as exc:
            raise ProtocolError(f"bad selector {part!r}: {exc}") from None
    return tuple(out)


def split_encr(name: str) -> tuple[str | None, int | None]:
    """``AES_GCM_16_256`` -> (``AES_GCM_16``, 256); ``3DES_CBC`` -> (``3DES_CBC``, None)."""
    if not name or name.upper() == "NONE":
        return None, None
    base, _, bits = name.rpartition("_")
    if base and bits in ("128", "192", "256"):
        return base, int(bits)
    if name.upper().startswith("CHACHA20_POLY1305"):
        return name, 256
    return name, None


def split_alg(text: str) -> list[str]:
    """``AES_GCM_16_256-NONE`` -> [``AES_GCM_16_256``, ``NONE``]."""
    return [p for p in text.split("-") if p]
