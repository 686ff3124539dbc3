"""The ``btns`` command: sockets, SAs, events and tokens from the shell (the ``ss`` of IPsec).

Console script ``btns = btns_vici.cli:main``; also ``python -m btns_vici.cli``.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence
from importlib import import_module

from . import exits, extensions
from .parser import build

#: command -> module with ``run(args) -> int`` (imported on use: `btns sas` loads no sock_diag);
#: other distributions add commands through the entry point group btns_vici.cli (extensions)
_COMMANDS = {
    name: f"{__name__}.cmd_{name}"
    for name in ("sockets", "sas", "watch", "token", "man", "completion", "daemon", "peers")
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``btns`` command; returns the exit code (see ``btns --help``)."""
    parser = build()
    args, extra = parser.parse_known_args(argv)
    why = getattr(args, "unavailable", None)
    if why is not None:
        print(f"btns {args.command}: {why.message}", file=sys.stderr)
        code: int = why.code
        return code
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    module = _COMMANDS.get(args.command)
    run: Callable[[argparse.Namespace], int] = (
        import_module(module).run if module else extensions.commands()[args.command].run
    )
    try:
        return run(args)
    except KeyboardInterrupt:
        return exits.INTERRUPTED
    except Exception as exc:  # every failure becomes one line on stderr and a documented exit code
        if isinstance(exc, exits.CliError):
            message = exc.message
        elif isinstance(exc, OSError):
            message = exc.strerror or str(exc)
        else:  # a bug: keep the traceback, but never exit 1 (which means "not protected")
            traceback.print_exc()
            message = f"internal error: {exc!r}"
        code = exits.code_for(exc)
        if code == exits.BACKEND:  # not answering because we may not ask? That is exit 4.
            from .permission import diagnose

            denied = diagnose(args)
            if denied is not None:
                message, code = denied, exits.PERMISSION
        print(f"btns {args.command}: {message}", file=sys.stderr)
        return code
