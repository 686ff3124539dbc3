#!/usr/bin/env python3
"""Capture real pluto output for the parser tests: tests/data/libreswan-<version>/.

Needs root. Builds the lab of btns_lab.libreswan.lab (two plutos in btns-lsw-cap* namespaces),
brings every conn up, stores --status/--showstates/--trafficstatus/--listpubkeys of both
sides plus their ipsec.conf, then stops both plutos and removes the namespaces.
Usage: capture-whack-output.py [OUTDIR]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from btns_lab.libreswan.lab import bring_up, build

COMMANDS = ("--status", "--showstates", "--trafficstatus", "--listpubkeys")


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="btns-lsw-cap-"))
    lab = build("cap", work)
    try:
        up = bring_up(lab)
        print("established:", ", ".join(up), file=sys.stderr)
        _, status = lab.a.whack("--status")
        version = next(
            (w.split("=", 1)[1].rstrip(",") for w in status.split() if w.startswith("pluto_version=")), "unknown"
        )
        default = Path(__file__).resolve().parents[1] / "tests" / "data" / f"libreswan-{version}"
        out = Path(sys.argv[1]) if len(sys.argv) > 1 else default
        out.mkdir(parents=True, exist_ok=True)
        for side, pluto in (("a", lab.a), ("b", lab.b)):
            for cmd in COMMANDS:
                _, text = pluto.whack(cmd)
                (out / f"{side}{cmd.replace('--', '-')}.txt").write_text(text)
            (out / f"{side}-ipsec.conf").write_text(pluto.conf.read_text())
        print(out)
    finally:
        lab.pair.teardown()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
