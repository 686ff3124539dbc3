"""``btnsd`` (also ``btns daemon``, ``python -m btns_vici.broker``): run the broker."""

from __future__ import annotations

import argparse
import logging
import sys

from .policy import DEFAULT_SOCKET, load


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="btnsd",
        description="The btns-vici broker: answers and enforces IPsec pTokens for sockets that any local "
        "application hands it (SCM_RIGHTS), so applications need no privileges.",
    )
    ap.add_argument(
        "--socket",
        help=f"listening socket (default: the config's, else {DEFAULT_SOCKET}; "
        "ignored when systemd passes one, LISTEN_FDS)",
    )
    ap.add_argument("--config", help="btnsd.toml (backends, [[allow]] rules, [quota])")
    ap.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics (needs prometheus_client)")
    ap.add_argument(
        "--leap-of-faith",
        nargs="?",
        const="[::]:5386",
        metavar="[HOST:]PORT",
        help='answer the leap-of-faith key exchange (README "Leap of faith") on udp HOST:PORT '
        "(default [::]:5386) for every strongSwan backend, and learn the keys of peers nobody "
        "configured when connecting (backend option leap_of_faith)",
    )
    ap.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes reading the clients (default: the config's [broker] workers, else the "
        "number of CPUs up to 4; 1: none, one process does everything)",
    )
    ap.add_argument("--keep-privileges", action="store_true", help="do not drop capabilities after start")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="btnsd: %(levelname)s %(message)s",
    )
    from .server import run

    try:
        config = load(args.config)
        run(
            config,
            args.socket,
            args.metrics,
            drop=not args.keep_privileges,
            leap=args.leap_of_faith,
            workers=args.workers,
        )
    except OSError as exc:
        print(f"btnsd: {exc.strerror or exc}", file=sys.stderr)
        return 4 if exc.errno in (1, 13) else 3
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
