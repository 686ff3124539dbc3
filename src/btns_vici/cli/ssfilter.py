"""``ss``-style socket selection for ``btns sockets``: state filters and filter expressions.

The grammar is the one ``ss(8)`` accepts (iproute2's ``ss [options] [STATE-FILTER] [EXPRESSION]``)::

    state-filter := { state | exclude } STATE ...
    STATE        := established | syn-sent | syn-recv | fin-wait-1 | fin-wait-2 | time-wait | closed
                  | close-wait | last-ack | listening | closing
                  | all | connected | synchronized | bucket | big        (the groups ss defines)
    expression   := term { (or | '||' | ',') term }
    term         := factor { [and | '&&'] factor }                           (juxtaposition is and)
    factor       := (not | '!') factor | '(' expression ')' | primitive
    primitive    := (dst | src) HOST | (dport | sport) [OP] PORT
    HOST         := ADDR[/LEN][:PORT] | [ADDR6][/LEN][:PORT] | *:PORT | :PORT
    OP           := = | == | eq | != | ne | neq | < | lt | > | gt | <= | le | leq | >= | ge | geq
    PORT         := N | :N | a service name (/etc/services)

Words may come as separate arguments or inside one quoted argument, as with ``ss``:
``btns sockets state established '( dport = :443 or sport = :443 )'``.
A syntax error raises :class:`FilterError` (the CLI's exit 2).
"""

from __future__ import annotations

import ipaddress
import operator
import re
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .sockdiag import SocketEntry

#: ss's state names -> the names sock_diag entries carry (sockdiag.STATES); ``closed`` is UDP's UNCONN.
STATE_NAMES = {
    "established": "ESTAB",
    "syn-sent": "SYN-SENT",
    "syn-recv": "SYN-RECV",
    "fin-wait-1": "FIN-WAIT-1",
    "fin-wait-2": "FIN-WAIT-2",
    "time-wait": "TIME-WAIT",
    "closed": "UNCONN",
    "close-wait": "CLOSE-WAIT",
    "last-ack": "LAST-ACK",
    "listening": "LISTEN",
    "closing": "CLOSING",
}
ALL_STATES = frozenset(STATE_NAMES.values()) | {"NEW-SYN-RECV"}
_CONNECTED = ALL_STATES - {"LISTEN", "UNCONN"}
#: ss's state groups (ss(8) "STATE-FILTER").
STATE_GROUPS = {
    "all": ALL_STATES,
    "connected": _CONNECTED,
    "synchronized": _CONNECTED - {"SYN-SENT"},
    "bucket": frozenset({"SYN-RECV", "NEW-SYN-RECV", "TIME-WAIT"}),
    "big": ALL_STATES - {"SYN-RECV", "NEW-SYN-RECV", "TIME-WAIT"},
}
#: What ``-l`` selects (ss: listening TCP sockets and unconnected UDP ones).
LISTENING = frozenset({"LISTEN", "UNCONN"})

_OPS: dict[str, Callable[[int, int], bool]] = {}
for _names, _fn in (
    (("=", "==", "eq"), operator.eq),
    (("!=", "ne", "neq"), operator.ne),
    (("<", "lt"), operator.lt),
    ((">", "gt"), operator.gt),
    (("<=", "le", "leq"), operator.le),
    ((">=", "ge", "geq"), operator.ge),
):
    for _n in _names:
        _OPS[_n] = _fn

_TOKEN = re.compile(r"\s*(\(|\)|&&|\|\||!=|==|<=|>=|=|<|>|!|,|[^\s()!=<>&|,]+)")

Predicate = Callable[["SocketEntry"], bool]


class FilterError(ValueError):
    """A filter that does not parse; the message says where."""


@dataclass(frozen=True)
class Selection:
    """What ``btns sockets`` lists: states (None: every state) and an expression (None: every socket)."""

    states: frozenset[str] | None
    predicate: Predicate | None
    text: str

    def __call__(self, entry: SocketEntry) -> bool:
        if self.states is not None and entry.state not in self.states:
            return False
        return self.predicate is None or self.predicate(entry)


def tokenize(words: Iterable[str]) -> list[str]:
    out: list[str] = []
    for word in words:
        pos = 0
        while pos < len(word):
            m = _TOKEN.match(word, pos)
            if m is None:
                if word[pos:].strip():
                    raise FilterError(f"cannot read {word[pos:]!r}")
                break
            out.append(m.group(1))
            pos = m.end()
    return out


def parse(words: Sequence[str], default_states: frozenset[str] | None = None) -> Selection:
    """``state``/``exclude`` words and an expression -> a Selection.

    ``default_states`` applies when no ``state`` word is given (``exclude`` words remove from it,
    or from all states).
    """
    tokens = tokenize(words)
    include: set[str] = set()
    exclude: set[str] = set()
    rest: list[str] = []
    depth = 0
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        depth += tok == "("
        depth -= tok == ")"
        if depth == 0 and tok in ("state", "exclude"):
            if i + 1 >= len(tokens):
                raise FilterError(f"{tok}: which state? ({', '.join([*STATE_NAMES, *STATE_GROUPS])})")
            (include if tok == "state" else exclude).update(_states(tokens[i + 1]))
            i += 2
            continue
        rest.append(tok)
        i += 1
    if include:
        states: frozenset[str] | None = frozenset(include)
    elif exclude:
        states = default_states if default_states is not None else ALL_STATES
    else:
        states = default_states
    if exclude and states is not None:
        states = states - exclude
    predicate = _Parser(rest).parse() if rest else None
    return Selection(states, predicate, " ".join(tokens))


def _states(word: str) -> frozenset[str]:
    name = word.lower()
    if name in STATE_GROUPS:
        return STATE_GROUPS[name]
    if name == "syn-recv":
        return frozenset({"SYN-RECV", "NEW-SYN-RECV"})
    if name in STATE_NAMES:
        return frozenset({STATE_NAMES[name]})
    raise FilterError(f"unknown state {word!r} (one of: {', '.join([*STATE_NAMES, *STATE_GROUPS])})")


def _port(word: str) -> int:
    text = word[1:] if word.startswith(":") else word
    if text.isdigit():
        n = int(text)
        if n > 65535:
            raise FilterError(f"port {word!r} out of range")
        return n
    try:
        return socket.getservbyname(text)
    except OSError:
        raise FilterError(f"unknown port or service {word!r}") from None


def _net(text: str, word: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise FilterError(f"not an address or prefix: {text!r} in {word!r}") from None


def _host(word: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network | None, int | None]:
    """``ADDR[/LEN][:PORT]``, ``[V6][/LEN][:PORT]``, ``*:PORT``, ``:PORT``, or a bare IPv6 address/prefix."""
    if word.startswith("["):
        addr, sep, tail = word[1:].partition("]")
        if not sep:
            raise FilterError(f"missing ']' in {word!r}")
        length, port = "", None
        if tail.startswith("/"):
            length, _, tail = tail[1:].partition(":")
            tail = ":" + tail if tail else ""
        if tail:
            if not tail.startswith(":"):
                raise FilterError(f"cannot read host {word!r}")
            port = _port(tail[1:])
        return _net(addr + (f"/{length}" if length else ""), word), port
    try:  # IPv4 (prefix) or a bare IPv6 address/prefix, whose colons are no port separator
        return ipaddress.ip_network(word, strict=False), None
    except ValueError:
        pass
    addr, sep, port_text = word.rpartition(":")
    if not sep:
        raise FilterError(f"not an address or prefix: {word!r}")
    port = _port(port_text)
    if addr in ("", "*"):
        return None, port
    return _net(addr, word), port


class _Parser:
    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.pos = 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        tok = self.peek()
        if tok is None:
            raise FilterError("expression ends too early")
        self.pos += 1
        return tok

    def parse(self) -> Predicate:
        pred = self.expr()
        if self.peek() is not None:
            raise FilterError(f"unexpected {self.peek()!r}")
        return pred

    def expr(self) -> Predicate:
        terms = [self.term()]
        while self.peek() in ("or", "||", ","):
            self.take()
            terms.append(self.term())
        return terms[0] if len(terms) == 1 else (lambda e: any(t(e) for t in terms))

    def term(self) -> Predicate:
        factors = [self.factor()]
        while self.peek() is not None and self.peek() not in ("or", "||", ",", ")"):
            if self.peek() in ("and", "&&"):
                self.take()
            factors.append(self.factor())
        return factors[0] if len(factors) == 1 else (lambda e: all(f(e) for f in factors))

    def factor(self) -> Predicate:
        tok = self.take()
        if tok in ("not", "!"):
            inner = self.factor()
            return lambda e: not inner(e)
        if tok == "(":
            inner = self.expr()
            if self.take() != ")":
                raise FilterError("missing ')'")
            return inner
        if tok in ("dst", "src"):
            return self.host(tok == "dst")
        if tok in ("dport", "sport"):
            op = _OPS[self.take()] if self.peek() in _OPS else operator.eq
            port = _port(self.take())
            if tok == "dport":
                return lambda e: op(e.remote_port, port)
            return lambda e: op(e.local_port, port)
        raise FilterError(f"unexpected {tok!r} (expected dst, src, dport, sport, not, '(' or a state filter)")

    def host(self, remote: bool) -> Predicate:
        if self.peek() in ("=", "=="):  # ss accepts `dst = ADDR` too
            self.take()
        net, port = _host(self.take())

        def match(e: SocketEntry) -> bool:
            addr, p = (e.remote_addr, e.remote_port) if remote else (e.local_addr, e.local_port)
            if port is not None and p != port:
                return False
            if net is None:
                return True
            if addr.version != net.version:
                mapped = getattr(addr, "ipv4_mapped", None)
                return mapped is not None and net.version == 4 and mapped in net
            return addr in net

        return match
