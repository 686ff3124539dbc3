"""Just enough of ipsec.conf(5) to find each connection's configured raw public keys. Pure.

pluto's whack output names a connection and its identities but never prints a
peer's raw key, so the key comes from the configuration pluto loaded: ``conn``
sections with ``also=`` and ``conn %default`` resolved, ``include`` followed.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from dataclasses import dataclass

from .rsakey import KeyFormatError, spki_from_pubkey, spki_from_rsasigkey

Sections = dict[str, dict[str, str]]


@dataclass(frozen=True)
class ConnKeys:
    """The raw public keys of one conn, by side as written (left/right), as SPKI DER."""

    left_host: str
    right_host: str
    left_id: str
    right_id: str
    left_key: bytes | None
    right_key: bytes | None
    left_ckaid: str = ""  # a key in pluto's NSS database, by CKAID (resolved by the backend)
    right_ckaid: str = ""


def parse_sections(text: str, include: Callable[[str], str] | None = None) -> Sections:
    """``conn`` sections of an ipsec.conf text: {name: {key: value}} (``also`` kept as is)."""
    sections: Sections = {}
    current: dict[str, str] | None = None
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].rstrip()  # base64 and hex keys never contain '#'
        if not line.strip():
            continue
        if not line[0].isspace():
            words = line.split()
            current = None
            if words[0] == "conn" and len(words) == 2:
                current = sections.setdefault(words[1], {})
            elif words[0] == "include" and len(words) == 2 and include is not None:
                for name, body in parse_sections(include(words[1]), include).items():
                    sections.setdefault(name, {}).update(body)
            continue
        if current is not None and "=" in line:
            key, _, value = line.strip().partition("=")
            current[key.strip()] = value.strip().strip('"')
    return sections


def resolve(sections: Sections, name: str, _seen: frozenset[str] = frozenset()) -> dict[str, str]:
    """One conn's settings with ``conn %default`` and its ``also=`` chain applied."""
    if name in _seen:
        return {}
    own = sections.get(name, {})
    merged: dict[str, str] = {} if name == "%default" else dict(resolve(sections, "%default", _seen | {name}))
    for other in own.get("also", "").split():
        merged.update(resolve(sections, other, _seen | {name}))
    merged.update({k: v for k, v in own.items() if k != "also"})
    return merged


def _key(settings: dict[str, str], side: str) -> bytes | None:
    try:
        if settings.get(f"{side}pubkey"):
            return spki_from_pubkey(settings[f"{side}pubkey"])
        value = settings.get(f"{side}rsasigkey", "")
        if value.lower().startswith(("0s", "0x")):
            return spki_from_rsasigkey(value)
    except KeyFormatError:
        return None  # a key we cannot read is no key: fail closed
    return None


def conn_keys(sections: Sections) -> dict[str, ConnKeys]:
    """Every real conn (not %default) with its hosts, ids and raw keys."""
    out = {}
    for name in sections:
        if name.startswith("%"):
            continue
        s = resolve(sections, name)
        out[name] = ConnKeys(
            s.get("left", ""),
            s.get("right", ""),
            s.get("leftid", ""),
            s.get("rightid", ""),
            _key(s, "left"),
            _key(s, "right"),
            s.get("leftckaid", ""),
            s.get("rightckaid", ""),
        )
    return out


def load(path: str) -> dict[str, ConnKeys]:
    """conn_keys of the ipsec.conf file at ``path`` (includes relative to it, globs allowed)."""
    base = os.path.dirname(path)

    def include(pattern: str) -> str:
        pattern = pattern if os.path.isabs(pattern) else os.path.join(base, pattern)
        parts = []
        for fname in sorted(glob.glob(pattern)):
            with open(fname, encoding="utf-8", errors="replace") as f:
                parts.append(f.read())
        return "\n".join(parts)

    with open(path, encoding="utf-8", errors="replace") as f:
        return conn_keys(parse_sections(f.read(), include))
