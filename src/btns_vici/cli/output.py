"""Output of the ``btns`` command: aligned tables for people, JSON for programs."""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from ..core.selectors import TrafficSelector

#: a record class -> its field names (dataclasses.fields is slow: a listing of 1,000 CHILD_SAs asks
#: for the same few classes 1,000 times)
_FIELDS: dict[type, tuple[str, ...]] = {}
_PLAIN = frozenset({str, int, float, bool, type(None)})


def jsonable(obj: Any) -> Any:
    """Plain JSON values from records: dataclasses, enums (by name), addresses, bytes (hex)."""
    cls = obj.__class__
    if cls in _PLAIN:  # (exactly these: an IntEnum is an int but prints by name)
        return obj
    names = _FIELDS.get(cls)
    if names is not None:
        return {n: jsonable(getattr(obj, n)) for n in names}
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, enum.Enum):
        return obj.name
    if isinstance(obj, int | float):
        return obj
    if isinstance(obj, bytes):
        return obj.hex()
    if isinstance(obj, ipaddress.IPv4Address | ipaddress.IPv6Address | TrafficSelector):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        names = _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(obj))
        return {n: jsonable(getattr(obj, n)) for n in names}
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, Sequence | set | frozenset):
        return [jsonable(v) for v in obj]
    return str(obj)


def emit_json(obj: Any, out: TextIO | None = None, *, line: bool = False) -> None:
    """One JSON document (indented), or one JSON line (``line``), flushed."""
    import json  # (on use: a table needs no JSON)

    out = out or sys.stdout
    text = json.dumps(jsonable(obj), separators=(",", ":")) if line else json.dumps(jsonable(obj), indent=2)
    out.write(text + "\n")
    out.flush()


def printable(text: str) -> str:
    """``text`` with every character ``str.isprintable`` refuses (newline, ESC, ...) escaped as in a
    Python literal: a cell's text (a process name, a peer's identity) can neither start a forged
    row nor drive the terminal (hide the rest of its row)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], out: TextIO | None = None, *, cells_ready: bool = False
) -> None:
    """An aligned table; the last cell of a row is not padded (but counts for its column's width).
    ``None`` and empty cells print as ``-``.

    Rows may be shorter than the header (``btns sockets``: a listening socket has no protection
    cells). ``cells_ready``: every cell is a non-empty str already (nothing to convert).
    Assembled once and written in one piece (10,000 rows: a few ms, not 10,000 writes).
    """
    out = out or sys.stdout
    cells: Sequence[Sequence[Any]]
    if cells_ready:  # the caller made every cell a non-empty str already (btns sockets: 10,000 rows)
        cells = rows
    else:
        cells = [[c if c.__class__ is str and c else "-" if c is None or c == "" else str(c) for c in r] for r in rows]
    widths = [len(h) for h in headers]
    by_length: dict[int, list[Sequence[Any]]] = {}
    for row in cells:
        by_length.setdefault(len(row), []).append(row)
    for group in by_length.values():  # rows of one length: their columns by zip, measured in C
        for i, column in enumerate(zip(*group, strict=True)):
            widths[i] = max(widths[i], max(map(len, column)))
    formats: dict[int, str] = {}
    lines = []
    for row in [list(headers), *cells]:
        n = len(row)
        fmt = formats.get(n)
        if fmt is None:
            fmt = formats[n] = "".join(f"{{:<{w}}}  " for w in widths[: n - 1]) + "{}"
        line = fmt.format(*row).rstrip()
        lines.append(line if line.isprintable() else printable(line))
    out.write("\n".join(lines) + "\n")
    out.flush()
