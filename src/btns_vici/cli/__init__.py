"""The ``btns`` command: sockets, SAs, events and tokens from the shell (the ``ss`` of IPsec).

Console script ``btns = btns_vici.cli:main``; also ``python -m btns_vici.cli``.

Start-up is what an operator waits for, so this module imports nothing but :mod:`sys` (and
:mod:`gc`, built in):
the hot commands (``sockets``, ``sas``) are read by :mod:`.fastargs` (a few µs, no argparse),
anything else (``--help``, ``--version``, the other commands, any word it does not know) by
the full parser of :mod:`.parser`, which also makes the man page and the completions.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable, Sequence
from typing import Any

#: command -> module with ``run(args) -> int`` (imported on use: `btns sas` loads no sock_diag);
#: other distributions add commands through the entry point group btns_vici.cli (extensions)
_COMMANDS = {
    name: f"{__name__}.cmd_{name}"
    for name in ("sockets", "sas", "watch", "token", "man", "completion", "daemon", "peers")
}
#: one-shot listings that run without the cyclic garbage collector (see main)
_LISTINGS = frozenset({"sockets", "sas"})


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``btns`` command; returns the exit code (see ``btns --help``)."""
    from importlib import import_module

    from .fastargs import parse_fast

    words = list(sys.argv[1:] if argv is None else argv)
    if words in (["--version"], ["-V"]):  # what argparse's version action prints, without argparse
        from .._version import __version__

        print(f"btns {__version__}")
        return 0
    args: Any = parse_fast(words)
    run: Callable[[Any], int]
    if args is None:
        from . import extensions
        from .parser import build

        parser = build()
        args, extra = parser.parse_known_args(words)
        why = getattr(args, "unavailable", None)
        if why is not None:  # an extension's command whose distribution is not installed
            print(f"btns {args.command}: {why.message}", file=sys.stderr)
            code: int = why.code
            return code
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        module = _COMMANDS.get(args.command)
        run = import_module(module).run if module else extensions.commands()[args.command].run
    else:
        run = import_module(_COMMANDS[args.command]).run
    # A listing allocates an object or ten per socket and per SA and frees them all by reference
    # counting; the cyclic collector would walk them again and again (a third of a 10,000-socket
    # `btns sockets`). Off for the one-shot listings only, and back on afterwards (main() may run
    # inside a longer-lived process, e.g. the tests).
    collecting = args.command in _LISTINGS and gc.isenabled()
    if collecting:
        gc.disable()
    try:
        return run(args)
    except KeyboardInterrupt:
        from . import exits

        return exits.INTERRUPTED
    except Exception as exc:  # every failure becomes one line on stderr and a documented exit code
        return _failed(args, exc)
    finally:
        if collecting:
            gc.enable()


def _failed(args: object, exc: Exception) -> int:
    """One line on stderr for ``exc`` and its exit code (see ``exits``)."""
    from . import exits

    if isinstance(exc, exits.CliError):
        message = exc.message
    elif isinstance(exc, OSError):
        message = exc.strerror or str(exc)
    else:  # a bug: keep the traceback, but never exit 1 (which means "not protected")
        import traceback

        traceback.print_exc()
        message = f"internal error: {exc!r}"
    code = exits.code_for(exc)
    if code == exits.BACKEND:  # not answering because we may not ask? That is exit 4.
        from .permission import diagnose

        denied = diagnose(args)  # type: ignore[arg-type]
        if denied is not None:
            message, code = denied, exits.PERMISSION
    print(f"btns {args.command}: {message}", file=sys.stderr)  # type: ignore[attr-defined]
    return code
