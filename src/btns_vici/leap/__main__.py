"""``python -m btns_vici.leap``: the leap-of-faith learner alone (btnsd --leap-of-faith runs it too)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m btns_vici.leap", description=__doc__)
    ap.add_argument("--listen", default="[::]:5386", metavar="[HOST:]PORT")
    ap.add_argument("--vici-socket")
    ap.add_argument("--netns")
    ap.add_argument("--key-dir")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="btns-leap: %(levelname)s %(message)s",
    )
    from ..broker.server import leap_address
    from .responder import Responder

    opts = {k: v for k, v in (("vici_socket", args.vici_socket), ("netns", args.netns), ("key_dir", args.key_dir)) if v}
    host, port = leap_address(args.listen)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with Responder(opts, host=host, port=port):
        try:
            done.wait()
        except KeyboardInterrupt:
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
