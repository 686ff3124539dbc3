"""``btns demo``: the two-peer demo (:func:`btns_vici.demo.run`)."""

from __future__ import annotations

import argparse
import io

from .. import demo
from .output import emit_json


def run(args: argparse.Namespace) -> int:
    family = 6 if args.ipv6 else 4
    if not args.json:
        return demo.run(family=family)
    transcript = io.StringIO()
    code = demo.run(out=transcript, family=family)
    emit_json({"exit_code": code, "ok": code == 0, "lines": transcript.getvalue().splitlines()})
    return code
