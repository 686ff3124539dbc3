"""btns(1) and the bash/zsh completion scripts, generated from the argparse parser (parser.build).

No extra dependency (shtab, argparse-manpage): the parser is small and regular (global options,
one level of subcommands), so walking it directly is short and keeps the output stable.
``btns man`` and ``btns completion bash|zsh`` print these; docs/ holds copies that a test
keeps equal to the generated text.
"""

from __future__ import annotations

import argparse
import re
import textwrap

from .._version import __version__
from . import exits, extensions

ENVIRONMENT = (
    ("BTNS_BACKEND", "backend plugin to use when --backend is not given (strongswan, libreswan, ...)"),
    ("BTNS_VICI_SOCKET", "charon's VICI socket when --vici-socket is not given (default /var/run/charon.vici)"),
)
SEE_ALSO = "ss(8), swanctl(8), ip-xfrm(8), charon(8), strongswan.conf(5)"
#: option dest -> how a shell completes its value
_VALUE_KIND = {"netns": "netns", "vici_socket": "file", "state": "file", "backend": "backend"}
BACKENDS = ("strongswan", "libreswan")


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def commands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, subparser) in definition order."""
    sub = _subparsers(parser)
    helps = {a.dest: a.help or "" for a in sub._choices_actions}
    return [(name, helps.get(name, ""), p) for name, p in sub.choices.items()]


def _options(parser: argparse.ArgumentParser, skip_globals: bool = False) -> list[argparse.Action]:
    out = []
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction | argparse._HelpAction):
            continue
        if skip_globals and a.default is argparse.SUPPRESS and a.dest in ("backend", "vici_socket", "netns", "json"):
            continue
        out.append(a)
    return out


# ---- roff ------------------------------------------------------------------------------------


def _roff(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    lines = []
    for line in text.splitlines():
        lines.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(lines)


def _para(text: str) -> str:
    """A description: lines indented by two or more spaces are examples (no fill)."""
    out: list[str] = []
    block: list[str] = []
    example: list[str] = []

    def flush() -> None:
        if block:
            out.append(_roff(" ".join(line.strip() for line in block)))
            block.clear()
        if example:
            out.append(".PP\n.RS\n.nf\n" + _roff("\n".join(line.strip() for line in example)) + "\n.fi\n.RE")
            example.clear()

    for line in text.splitlines():
        if not line.strip():
            flush()
            out.append(".PP")
        elif line.startswith("  "):
            if block:
                flush()
            example.append(line)
        else:
            if example:
                flush()
                out.append(".PP")
            block.append(line)
    flush()
    return "\n".join(out)


def _metavar(a: argparse.Action) -> str | None:
    """The action's metavar; a tuple of them (one per value) space-separated, as argparse shows them."""
    return " ".join(a.metavar) if isinstance(a.metavar, tuple) else a.metavar


def _invocation(a: argparse.Action) -> str:
    if not a.option_strings:
        return _metavar(a) or a.dest
    metavar = "" if a.nargs == 0 else " " + (_metavar(a) or a.dest.upper())
    return ", ".join(f"{o}{metavar}" for o in a.option_strings)


def _option_items(actions: list[argparse.Action]) -> str:
    out = []
    for a in actions:
        helptext = (a.help or "").replace("%(default)s", str(a.default))
        if a.choices and not a.option_strings:
            helptext += f" (one of: {', '.join(map(str, a.choices))})"
        out.append(f".TP\n.B {_roff(_invocation(a))}\n{_roff(helptext)}")
    return "\n".join(out)


def manpage(parser: argparse.ArgumentParser) -> str:
    """btns(1) as roff (man -l -)."""
    usage = re.sub(r"\s+", " ", parser.format_usage().removeprefix("usage: ").strip())
    parts = [
        f'.TH BTNS 1 "" "btns-vici {__version__}" "User Commands"',
        ".SH NAME",
        "btns \\- the ss of IPsec: sockets, SAs, events and tokens (draft\\-ietf\\-btns\\-c\\-api\\-04)",
        ".SH SYNOPSIS",
        f".B {_roff(usage)}",
    ]
    for _name, _short, sub in commands(parser):
        sub_usage = re.sub(r"\s+", " ", sub.format_usage().removeprefix("usage: ").strip())
        parts.append(f".br\n.B {_roff(sub_usage)}")
    parts += [
        ".SH DESCRIPTION",
        _para(parser.description or ""),
        ".SH GLOBAL OPTIONS",
        "Accepted before or after the command.",
        _option_items(_options(parser)),
        ".TP\n.B \\-h, \\-\\-help\nshow the help of btns or of a command and exit",
        ".SH COMMANDS",
    ]
    for name, short, sub in commands(parser):
        parts.append(f".SS {name}\n{_roff(short)}\n.PP\n{_para(sub.description or '')}")
        opts = _options(sub, skip_globals=True)
        if opts:
            parts.append(_option_items(opts))
    parts.append(".SH EXIT STATUS")
    for code, what in exits.EXIT_CODES:
        parts.append(f".TP\n.B {code}\n{_roff(what)}")
    parts.append(".SH ENVIRONMENT")
    for var, what in ENVIRONMENT + tuple(e for cmd in extensions.commands().values() for e in cmd.environment):
        parts.append(f".TP\n.B {var}\n{_roff(what)}")
    parts += [".SH SEE ALSO", _roff(SEE_ALSO), ""]
    return "\n".join(parts)


# ---- bash ------------------------------------------------------------------------------------


def _words(actions: list[argparse.Action]) -> list[str]:
    return [o for a in actions for o in a.option_strings]


def _value_options(actions: list[argparse.Action]) -> dict[str, str]:
    """option string -> completion kind for options that take a value."""
    out = {}
    for a in actions:
        if a.nargs == 0 or not a.option_strings:
            continue
        kind = _VALUE_KIND.get(a.dest, "none")
        if a.choices:
            kind = "words:" + " ".join(map(str, a.choices))
        for o in a.option_strings:
            out[o] = kind
    return out


def bash(parser: argparse.ArgumentParser) -> str:
    cmds = commands(parser)
    lines = [
        "# bash completion for btns (generated by `btns completion bash` from its parser)",
        "_btns_netns() { ip netns list 2>/dev/null | cut -d' ' -f1; }",
        "_btns() {",
        "    local cur prev cmd i",
        '    cur="${COMP_WORDS[COMP_CWORD]}"',
        '    prev="${COMP_WORDS[COMP_CWORD-1]}"',
        "    cmd=",
        "    for ((i = 1; i < COMP_CWORD; i++)); do",
        '        case "${COMP_WORDS[i]}" in',
        f"            {'|'.join(name for name, _, _ in cmds)}) cmd=${{COMP_WORDS[i]}}; break ;;",
        "        esac",
        "    done",
    ]
    values: dict[str, str] = dict(_value_options(_options(parser)))
    for _, _, sub in cmds:
        values.update(_value_options(_options(sub)))
    lines.append('    case "$prev" in')
    by_kind: dict[str, list[str]] = {}
    for opt, kind in sorted(values.items()):
        by_kind.setdefault(kind, []).append(opt)
    for kind, opts in sorted(by_kind.items()):
        if kind == "netns":
            action = 'COMPREPLY=($(compgen -W "$(_btns_netns)" -- "$cur"))'
        elif kind == "file":
            action = 'COMPREPLY=($(compgen -f -- "$cur"))'
        elif kind == "backend":
            action = f'COMPREPLY=($(compgen -W "{" ".join(BACKENDS)}" -- "$cur"))'
        elif kind.startswith("words:"):
            action = f'COMPREPLY=($(compgen -W "{kind[6:]}" -- "$cur"))'
        else:
            action = "COMPREPLY=()"
        lines.append(f"        {'|'.join(opts)}) {action}; return ;;")
    lines.append("    esac")
    globals_ = " ".join(["-h", "--help", *_words(_options(parser))])
    lines += [
        '    case "$cmd" in',
        f'        "") COMPREPLY=($(compgen -W "{" ".join(n for n, _, _ in cmds)} {globals_}" -- "$cur")) ;;',
    ]
    for name, _, sub in cmds:
        sub_opts = " ".join(["-h", "--help", *_words(_options(sub))])
        positional = [a for a in _options(sub) if not a.option_strings]
        extra = " ".join(str(c) for a in positional if a.choices for c in a.choices)
        if name == "sockets":
            extra = "state exclude dst src dport sport and or not " + " ".join(
                [
                    "established",
                    "syn-sent",
                    "syn-recv",
                    "fin-wait-1",
                    "fin-wait-2",
                    "time-wait",
                    "closed",
                    "close-wait",
                    "last-ack",
                    "listening",
                    "closing",
                    "all",
                    "connected",
                    "synchronized",
                    "bucket",
                    "big",
                ]
            )
        words = f"{sub_opts} {extra}".strip()
        lines.append(f'        {name}) COMPREPLY=($(compgen -W "{words}" -- "$cur")) ;;')
    lines += ["    esac", "}", "complete -F _btns btns", ""]
    return "\n".join(lines)


# ---- zsh -------------------------------------------------------------------------------------


def _zsh_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "'\\''").replace("[", "\\[").replace("]", "\\]").replace(":", "\\:")


def _zsh_specs(actions: list[argparse.Action]) -> list[str]:
    specs = []
    for a in actions:
        helptext = _zsh_escape(textwrap.shorten(a.help or "", 70, placeholder="..."))
        if not a.option_strings:
            if a.choices:
                specs.append(f"'1:{a.dest}:({' '.join(map(str, a.choices))})'")
            elif a.nargs == "*":
                specs.append(f"'*:{a.dest}:_default'")
            continue
        if a.nargs == 0:
            value = ""
        else:
            kind = _VALUE_KIND.get(a.dest, "none")
            action = {"netns": "_btns_netns", "file": "_files", "backend": f"({' '.join(BACKENDS)})"}.get(kind, " ")
            if a.choices:
                action = f"({' '.join(map(str, a.choices))})"
            value = f":{(_metavar(a) or a.dest).lower()}:{action}"
        if len(a.option_strings) == 1:
            specs.append(f"'{a.option_strings[0]}[{helptext}]{value}'")
        else:
            names = ",".join(a.option_strings)
            specs.append(f"'({' '.join(a.option_strings)})'{{{names}}}'[{helptext}]{value}'")
    return specs


def zsh(parser: argparse.ArgumentParser) -> str:
    cmds = commands(parser)
    lines = [
        "#compdef btns",
        "# zsh completion for btns (generated by `btns completion zsh` from its parser)",
        "",
        "_btns_netns() { local -a ns; ns=(${(f)\"$(ip netns list 2>/dev/null | cut -d' ' -f1)\"}); "
        "_describe 'network namespace' ns; }",
        "",
        "_btns() {",
        "    local curcontext=$curcontext state line ret=1",
        "    typeset -A opt_args",
        "    _arguments -C \\",
        "        '(- *)'{-h,--help}'[show help]' \\",
    ]
    lines += [f"        {spec} \\" for spec in _zsh_specs(_options(parser))]
    lines += [
        "        '1:command:->command' \\",
        "        '*::arg:->args' && ret=0",
        "    case $state in",
        "        command)",
        "            local -a cmds",
        "            cmds=(",
    ]
    lines += [f"                '{name}:{_zsh_escape(short)}'" for name, short, _ in cmds]
    lines += [
        "            )",
        "            _describe command cmds && ret=0 ;;",
        "        args)",
        "            case $line[1] in",
    ]
    for name, _, sub in cmds:
        specs = " ".join(_zsh_specs(_options(sub)))
        lines.append(f"                {name}) _arguments '(- *)'{{-h,--help}}'[show help]' {specs} && ret=0 ;;")
    lines += ["            esac ;;", "    esac", "    return ret", "}", "", '_btns "$@"', ""]
    return "\n".join(lines)
