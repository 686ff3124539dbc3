"""``btns completion bash|zsh``: a completion script generated from the parser (copies in docs/completion/)."""

from __future__ import annotations

import argparse
import sys

from . import exits
from .docgen import bash, zsh
from .parser import build


def run(args: argparse.Namespace) -> int:
    sys.stdout.write((bash if args.shell == "bash" else zsh)(build()))
    return exits.OK
