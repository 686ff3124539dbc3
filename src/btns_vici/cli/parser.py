"""The argument parser of ``btns``: commands, options and their help (the README repeats it)."""

from __future__ import annotations

import argparse
from typing import Any

from .._version import __version__
from . import exits, extensions

DESCRIPTION = """\
btns: the `ss` of IPsec. Shows which sockets IPsec protects, by which SA, with which
algorithms and which authenticated peer (draft-ietf-btns-c-api-04 pTokens and iTokens),
from the IKE daemon's view (strongSwan over VICI) verified against the data plane."""

COMMANDS = {
    "sockets": (
        "every TCP and UDP socket and its protection",
        "List every TCP and UDP socket (IPv4 and IPv6) of this host, or of the network namespace\n"
        "--netns, with the processes holding it and its protection: the SA (conn/child), SPIs,\n"
        "mode, algorithms, peer identity and authentication method, or `clear` when no CHILD_SA\n"
        "verified in both the IKE daemon and the data plane covers its flow. Listening and\n"
        "unconnected sockets have no flow and are shown as `listening` / `unconnected`.\n"
        "\n"
        "Selection as in ss(8): -t/-u (TCP/UDP), -4/-6 (IPv4/IPv6), -l (listening TCP and\n"
        "unconnected UDP sockets only), -a (all states: the default here, unlike ss), then an\n"
        "optional FILTER: `state STATE` / `exclude STATE` (established, syn-sent, syn-recv,\n"
        "fin-wait-1, fin-wait-2, time-wait, closed, close-wait, last-ack, listening, closing, or\n"
        "the groups all, connected, synchronized, bucket, big) followed by an expression of\n"
        "`dst ADDR[/LEN][:PORT]`, `src ...`, `dport OP PORT`, `sport OP PORT` (OP: = != < > <= >=\n"
        "or eq ne lt gt le ge), joined by and/or/not and parentheses, e.g.\n"
        "  btns sockets -t state established '( dport = :443 or sport = :443 )'\n"
        "  btns sockets -4 dst 10.231.0.0/24 and not dport = 22\n"
        "-n and -p are accepted for ss habits (addresses are always numeric, processes always\n"
        'shown: PROCESS is ss -p\'s users:(("name",pid=P,fd=N),...)).',
    ),
    "sas": (
        "the backend's IKE and CHILD SAs",
        "List the active backend's IKE_SAs and CHILD_SAs, normalized (one row per CHILD_SA).\n"
        "--ike, --ike-id, --child and --child-id select as swanctl --list-sas does: an IKE_SA\n"
        "whose name (unique id) matches, with only its CHILD_SAs of that name (unique id).",
    ),
    "watch": (
        "SA and latching events as they happen",
        "Print SA events (ike-up, ike-down, child-up, child-down, ike-rekey, child-rekey, reset)\n"
        "and latching events, one line each (JSON lines with --json). Latching is the rule of\n"
        "btns_vici.latch applied to every connected socket of the namespace: a protected\n"
        "connection is latched when it appears (`latched`; those protected before watch started\n"
        "are latched silently); when its protection weakens, changes peer or goes away the\n"
        "latch breaks once (`latch-broken`, with reasons). Stops on SIGINT/SIGTERM (exit 0),\n"
        "after --count events (exit 0) or after --timeout seconds (exit 0, or 1 when --count\n"
        "events did not arrive). Exit 3 when the daemon goes away. A line on stderr says when\n"
        "the watch is registered.",
    ),
    "token": (
        "another process's socket pToken and iToken",
        "Show the pToken and the peer's iToken of socket --fd of process --pid, taken with\n"
        "pidfd_open + pidfd_getfd (needs ptrace access: root, or the owner). The socket's network\n"
        "namespace is found from the socket unless --netns is given. Exit 0 when the socket is\n"
        "protected, 1 when it is clear or not connected, 4 when pidfd_getfd is not permitted,\n"
        "5 when there is no such process or fd, or the fd is not an IPv4/IPv6 socket.",
    ),
    "daemon": (
        "run btnsd, the broker for unprivileged applications",
        "Run the btns-vici broker (also installed as btnsd): it answers and enforces pTokens for\n"
        "sockets any local application hands it over a unix socket (SCM_RIGHTS), so that\n"
        "applications need no privileges (README: btnsd). Runs until SIGTERM.",
    ),
    "man": (
        "print the manual page (roff), generated from this parser",
        "Print btns(1) in roff, generated from this command's parser (docs/btns.1 is a copy):\n  btns man | man -l -",
    ),
    "completion": (
        "print a bash or zsh completion script",
        "Print a completion script generated from this command's parser, e.g.\n"
        "  btns completion bash > /etc/bash_completion.d/btns\n"
        "  btns completion zsh > /usr/local/share/zsh/site-functions/_btns",
    ),
    "peers": (
        "the known-peers store (leap of faith)",
        "list: every peer whose key was learned at first contact (leap of faith) or pinned, with its\n"
        "fingerprint, when and how it was learned, when last seen, and other keys seen from its address;\n"
        "then NULL-authenticated peers (libreswan: no key) as NULL <identity>, their IKE SAs as contacts.\n"
        "forget ADDR: drop it (the next contact is a first contact again). pin ADDR [--key FILE]: pin the\n"
        "stored key or FILE's (PEM/DER); a pinned peer's changed key is always refused. The store is\n"
        "known_peers.json in --key-dir (default $BTNS_KEY_DIR, else /var/lib/btns-vici).",
    ),
}


def _globals(suppress: bool) -> argparse.ArgumentParser:
    """The global options; on subcommands they default to SUPPRESS so either position works."""
    p = argparse.ArgumentParser(add_help=False)

    def default(value: object) -> dict[str, Any]:
        return {"default": argparse.SUPPRESS if suppress else value}

    g = p.add_argument_group("global options")
    g.add_argument(
        "--backend",
        metavar="NAME",
        help="backend plugin (default: $BTNS_BACKEND, else the first whose daemon answers)",
        **default(None),
    )
    g.add_argument(
        "--vici-socket",
        metavar="PATH",
        help="charon's VICI socket (backend option vici_socket)",
        **default(None),
    )
    g.add_argument(
        "--netns",
        metavar="NAME",
        help="network namespace of the sockets and the data plane (backend option netns)",
        **default(None),
    )
    g.add_argument("--json", action="store_true", help="machine-readable JSON output", **default(False))
    return p


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def _seconds(text: str) -> float:
    s = float(text)
    if s <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return s


def build() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="btns", description=DESCRIPTION, epilog=exits.epilog(), formatter_class=fmt, parents=[_globals(False)]
    )
    parser.add_argument(
        "-V", "--version", action="version", version=f"%(prog)s {__version__}", help="print the version and exit"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _globals(True)
    cmds = {}
    for name, (short, long) in COMMANDS.items():
        cmds[name] = sub.add_parser(
            name, help=short, description=long, epilog=exits.epilog(), formatter_class=fmt, parents=[common]
        )
    so = cmds["sockets"]
    so.add_argument("--connected", action="store_true", help="only sockets with a peer (a flow)")
    sel = so.add_argument_group("selection (as ss)")
    sel.add_argument("-t", "--tcp", action="store_true", help="TCP sockets")
    sel.add_argument("-u", "--udp", action="store_true", help="UDP sockets")
    sel.add_argument("-4", "--ipv4", action="store_true", help="IPv4 sockets")
    sel.add_argument("-6", "--ipv6", action="store_true", help="IPv6 sockets")
    sel.add_argument("-l", "--listening", action="store_true", help="only listening TCP and unconnected UDP sockets")
    sel.add_argument("-a", "--all", action="store_true", help="sockets in every state (the default)")
    sel.add_argument("-n", "--numeric", action="store_true", help="accepted for ss habits (always numeric)")
    sel.add_argument("-p", "--processes", action="store_true", help="accepted for ss habits (always shown)")
    so.add_argument("filter", nargs="*", metavar="FILTER", help="ss(8) state filter and expression (see above)")
    sa = cmds["sas"]
    sa.add_argument("--ike", metavar="NAME", help="only IKE_SAs of this connection name")
    sa.add_argument("--ike-id", metavar="ID", help="only the IKE_SA of this unique id")
    sa.add_argument("--child", metavar="NAME", help="only CHILD_SAs of this name (and their IKE_SAs)")
    sa.add_argument("--child-id", metavar="ID", help="only the CHILD_SA of this unique id")
    w = cmds["watch"]
    w.add_argument("--count", type=_positive, metavar="N", help="stop after N events")
    w.add_argument("--timeout", type=_seconds, metavar="S", help="stop after S seconds")
    w.add_argument("--sa-only", action="store_true", help="SA events only, no socket latching")
    t = cmds["token"]
    t.add_argument("--pid", type=int, required=True, metavar="P", help="the process holding the socket")
    t.add_argument("--fd", type=int, required=True, metavar="N", help="its file descriptor number")
    pe = cmds["peers"]
    pe.add_argument("action", choices=("list", "forget", "pin"), metavar="ACTION", help="list, forget or pin")
    pe.add_argument("address", nargs="?", metavar="ADDR", help="the peer's IP address (forget, pin)")
    pe.add_argument("--key", metavar="FILE", help="pin: the peer's public key (PEM or DER)")
    pe.add_argument("--key-dir", metavar="DIR", help="the host-key directory holding known_peers.json")
    d = cmds["daemon"]
    d.add_argument(
        "--socket",
        metavar="PATH",
        help="listening socket (default: the config's, else /run/btns-vici/btnsd.sock; systemd's LISTEN_FDS wins)",
    )
    d.add_argument("--config", metavar="PATH", help="btnsd.toml: backends, [[allow]] rules, [quota]")
    d.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics (prometheus_client)")
    d.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes reading the clients (default: the config's, else CPUs up to 4; 1: none)",
    )
    d.add_argument("--keep-privileges", action="store_true", help="do not drop capabilities after start")
    d.add_argument(
        "--leap-of-faith",
        nargs="?",
        const="[::]:5386",
        metavar="[HOST:]PORT",
        help="answer the leap-of-faith key exchange on udp HOST:PORT (default [::]:5386)",
    )
    d.add_argument("-v", "--verbose", action="store_true", help="log requests and connections")
    cmds["completion"].add_argument("shell", choices=("bash", "zsh"), metavar="SHELL", help="bash or zsh")
    for name, ext in extensions.commands().items():
        if name in cmds:
            continue
        p = sub.add_parser(
            name,
            help=ext.summary,
            description=ext.description,
            epilog=exits.epilog(),
            formatter_class=fmt,
            parents=[common],
        )
        ext.add_arguments(p)
    for name, why in extensions.unavailable().items():
        if name in cmds:
            continue
        p = sub.add_parser(
            name,
            help=why.summary.replace("NAME", name),
            description=f"`btns {name}` cannot run here: {why.message}.",
            epilog=exits.epilog(),
            formatter_class=fmt,
            parents=[common],
        )
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        p.set_defaults(unavailable=why)
    return parser
