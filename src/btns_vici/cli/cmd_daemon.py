"""``btns daemon``: run btnsd (the same as the ``btnsd`` command)."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from ..broker.__main__ import main

    argv = []
    for flag in ("socket", "config", "metrics"):
        value = getattr(args, flag, None)
        if value:
            argv += [f"--{flag}", value]
    if getattr(args, "workers", None) is not None:
        argv += ["--workers", str(args.workers)]
    if args.keep_privileges:
        argv.append("--keep-privileges")
    if args.leap_of_faith:
        argv += ["--leap-of-faith", args.leap_of_faith]
    if args.verbose:
        argv.append("-v")
    return main(argv)
