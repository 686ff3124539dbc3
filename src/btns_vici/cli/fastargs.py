"""The hot command lines (``btns sockets ...``, ``btns sas ...``) read without argparse.

argparse and building the full parser cost more than a ``btns sas`` of one SA does (the
interpreter's start-up aside). :func:`parse_fast` reads the plain forms of the two hot
commands into the very namespace :func:`.parser.build` would give, and answers None for
everything else (``-h``, ``--version``, an abbreviation, a word it does not know, an option
after a FILTER word, ``--``, a missing value): the full parser then reads the line, with its
help and its error messages. tests/unit/test_cli_fastargs.py holds the two equal.
"""

from __future__ import annotations

from types import SimpleNamespace

#: global options with a value, and the flag, accepted before or after the command
_GLOBAL_VALUES = {"--backend": "backend", "--vici-socket": "vici_socket", "--netns": "netns"}
_GLOBAL_FLAGS = {"--json": "json"}

#: per command: (long flags, short flag letters, options with a value, takes FILTER words)
_SOCKETS_FLAGS = {
    "--connected": "connected",
    "--tcp": "tcp",
    "--udp": "udp",
    "--ipv4": "ipv4",
    "--ipv6": "ipv6",
    "--listening": "listening",
    "--all": "all",
    "--numeric": "numeric",
    "--processes": "processes",
}
_SOCKETS_SHORT = {
    "t": "tcp",
    "u": "udp",
    "4": "ipv4",
    "6": "ipv6",
    "l": "listening",
    "a": "all",
    "n": "numeric",
    "p": "processes",
}
_SAS_VALUES = {"--ike": "ike", "--ike-id": "ike_id", "--child": "child", "--child-id": "child_id"}

_COMMANDS: dict[str, tuple[dict[str, str], dict[str, str], dict[str, str], bool]] = {
    "sockets": (_SOCKETS_FLAGS, _SOCKETS_SHORT, {}, True),
    "sas": ({}, {}, _SAS_VALUES, False),
}


def parse_fast(argv: list[str]) -> SimpleNamespace | None:
    """The namespace of a plain ``sockets``/``sas`` command line, else None (use the full parser)."""
    ns: dict[str, object] = {"backend": None, "vici_socket": None, "netns": None, "json": False}
    i, n = 0, len(argv)
    command = None
    flags: dict[str, str] = {}
    shorts: dict[str, str] = {}
    values: dict[str, str] = _GLOBAL_VALUES
    takes_filter = False
    words: list[str] = []
    while i < n:
        word = argv[i]
        i += 1
        if not word.startswith("-") or word == "-":
            if command is None:
                spec = _COMMANDS.get(word)
                if spec is None:
                    return None
                command = word
                flags, shorts, own_values, takes_filter = spec
                values = {**_GLOBAL_VALUES, **own_values}
                ns.update(dict.fromkeys(flags.values(), False))
                ns.update(dict.fromkeys(own_values.values()))
                continue
            if not takes_filter:
                return None
            words.append(word)
            continue
        if words:  # an option after FILTER words: argparse's own (odd) rules apply
            return None
        name, eq, value = word.partition("=")
        if name in values:
            if not eq:
                if i >= n or argv[i].startswith("-"):
                    return None
                value = argv[i]
                i += 1
            ns[values[name]] = value
        elif eq:
            return None
        elif word in _GLOBAL_FLAGS:
            ns[_GLOBAL_FLAGS[word]] = True
        elif word in flags:
            ns[flags[word]] = True
        elif shorts and not word.startswith("--") and all(c in shorts for c in word[1:]):
            for c in word[1:]:
                ns[shorts[c]] = True
        else:
            return None
    if command is None:
        return None
    if takes_filter:
        ns["filter"] = words
    ns["command"] = command
    return SimpleNamespace(**ns)
