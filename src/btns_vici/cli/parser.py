"""The argument parser of ``btns``: commands, options and their help (the README repeats it)."""

from __future__ import annotations

import argparse

from . import exits
from .tbstate import DEFAULT_STATE, STATE_ENV

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
        "unconnected sockets have no flow and are shown as `listening` / `unconnected`.",
    ),
    "sas": (
        "the backend's IKE and CHILD SAs",
        "List the active backend's IKE_SAs and CHILD_SAs, normalized (one row per CHILD_SA).",
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
    "testbed": (
        "a persistent two-namespace strongSwan testbed",
        "up: create two network namespaces joined by a veth pair, start one charon in each\n"
        "(kernel-libipsec) and establish the BTNS raw-key connection `btns` between\n"
        "10.231.0.1 and 10.231.0.2 (fd00:b75::1/::2); 10.231.0.11/.12 are plain addresses no SA\n"
        "covers. The testbed stays up; what `down` must remove is recorded in the state file.\n"
        "status: show the recorded testbed and whether its charons run and answer (exit 1 when\n"
        "not). down: stop exactly the recorded charons, delete the recorded namespaces and workdir.\n"
        "Other commands given --netns of a recorded namespace use that peer's VICI socket.",
    ),
    "demo": (
        "the two-peer demo",
        "Run the two-peer demo (btns_vici.demo): a temporary testbed, a TCP connection whose\n"
        "ends demand encryption and BTNS with set_socket_pToken, and both ends' tokens compared.\n"
        "It builds its own testbed: --backend, --vici-socket and --netns do not apply.",
    ),
    "peers": (
        "the known-peers store (leap of faith)",
        "list: every peer whose key was learned at first contact (leap of faith) or pinned, with its\n"
        "fingerprint, when and how it was learned, when last seen, and other keys seen from its address.\n"
        "forget ADDR: drop it (the next contact is a first contact again). pin ADDR [--key FILE]: pin the\n"
        "stored key or FILE's (PEM/DER); a pinned peer's changed key is always refused. The store is\n"
        "known_peers.json in --key-dir (default $BTNS_KEY_DIR, else /var/lib/btns-vici).",
    ),
}


def _globals(suppress: bool) -> argparse.ArgumentParser:
    """The global options; on subcommands they default to SUPPRESS so either position works."""
    p = argparse.ArgumentParser(add_help=False)
    d = {"default": argparse.SUPPRESS} if suppress else {}
    g = p.add_argument_group("global options")
    g.add_argument("--backend", metavar="NAME", help="backend plugin (default: $BTNS_BACKEND, else the first "
                   "whose daemon answers)", **({"default": None} | d))
    g.add_argument("--vici-socket", metavar="PATH", help="charon's VICI socket (backend option vici_socket)",
                   **({"default": None} | d))
    g.add_argument("--netns", metavar="NAME", help="network namespace of the sockets and the data plane "
                   "(backend option netns)", **({"default": None} | d))
    g.add_argument("--json", action="store_true", help="machine-readable JSON output",
                   **({"default": False} | d))
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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _globals(True)
    cmds = {}
    for name, (short, long) in COMMANDS.items():
        cmds[name] = sub.add_parser(name, help=short, description=long, epilog=exits.epilog(),
                                    formatter_class=fmt, parents=[common])
    cmds["sockets"].add_argument("--connected", action="store_true", help="only sockets with a peer (a flow)")
    w = cmds["watch"]
    w.add_argument("--count", type=_positive, metavar="N", help="stop after N events")
    w.add_argument("--timeout", type=_seconds, metavar="S", help="stop after S seconds")
    w.add_argument("--sa-only", action="store_true", help="SA events only, no socket latching")
    t = cmds["token"]
    t.add_argument("--pid", type=int, required=True, metavar="P", help="the process holding the socket")
    t.add_argument("--fd", type=int, required=True, metavar="N", help="its file descriptor number")
    tb = cmds["testbed"]
    tb.add_argument("action", choices=("up", "down", "status"), metavar="ACTION", help="up, status or down")
    tb.add_argument("--state", metavar="PATH", help=f"state file (default: ${STATE_ENV}, else {DEFAULT_STATE})")
    pe = cmds["peers"]
    pe.add_argument("action", choices=("list", "forget", "pin"), metavar="ACTION", help="list, forget or pin")
    pe.add_argument("address", nargs="?", metavar="ADDR", help="the peer's IP address (forget, pin)")
    pe.add_argument("--key", metavar="FILE", help="pin: the peer's public key (PEM or DER)")
    pe.add_argument("--key-dir", metavar="DIR", help="the host-key directory holding known_peers.json")
    cmds["demo"].add_argument("--ipv6", action="store_true", help="connect over IPv6")
    return parser
