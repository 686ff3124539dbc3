"""``btns man``: btns(1) in roff, generated from the parser (docs/btns.1 is a copy)."""

from __future__ import annotations

import argparse
import sys

from . import exits
from .docgen import manpage
from .parser import build


def run(args: argparse.Namespace) -> int:
    sys.stdout.write(manpage(build()))
    return exits.OK
