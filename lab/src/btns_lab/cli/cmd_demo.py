"""``btns demo``: the two-peer demo (:func:`btns_lab.demo.run`)."""

from __future__ import annotations

import argparse
import io

from btns_vici.cli.extensions import Command
from btns_vici.cli.output import emit_json


def run(args: argparse.Namespace) -> int:
    from .. import demo  # on use: the parser of every `btns` command loads this module

    family = 6 if args.ipv6 else 4
    if not args.json:
        return demo.run(family=family)
    transcript = io.StringIO()
    code = demo.run(out=transcript, family=family)
    emit_json({"exit_code": code, "ok": code == 0, "lines": transcript.getvalue().splitlines()})
    return code


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ipv6", action="store_true", help="connect over IPv6")


#: ``btns demo`` (entry point btns_vici.cli: demo)
COMMAND = Command(
    summary="the two-peer demo",
    description="Run the two-peer demo (btns_lab.demo): a temporary testbed, a TCP connection whose\n"
    "ends demand encryption and BTNS with set_socket_pToken, and both ends' tokens compared.\n"
    "It builds its own testbed: --backend, --vici-socket and --netns do not apply. (From btns-lab.)",
    add_arguments=add_arguments,
    run=run,
)
