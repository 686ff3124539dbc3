"""``btns`` commands that other distributions provide (entry point group ``btns_vici.cli``).

An entry point ``NAME = module:OBJECT`` of group :data:`GROUP` adds the command ``btns NAME``;
OBJECT is a :class:`Command`. btns-lab (``lab/`` of the repository) provides ``testbed`` and
``demo`` this way, so that the library wheel carries no lab code. A command of
:data:`EXPECTED` whose distribution is not installed still parses (any arguments) and then
fails with a message naming what to install and exit :data:`exits.NOT_FOUND`; an entry point
that does not load (or is not a :class:`Command`) fails the same way with exit
:data:`exits.FAILED`, and never takes the other commands down.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points

from . import exits

GROUP = "btns_vici.cli"
#: command -> the distribution that provides it (and how to get it)
EXPECTED = {
    "testbed": "btns-lab (pip install -e lab/ in a checkout; scripts/setup.sh does)",
    "demo": "btns-lab (pip install -e lab/ in a checkout; scripts/setup.sh does)",
}


@dataclass(frozen=True)
class Command:
    """What an entry point of :data:`GROUP` names: one ``btns`` command."""

    summary: str  # one line, for ``btns --help``
    description: str  # the command's ``--help`` text (and its section of btns(1))
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    #: namespace name -> backend options it implies (e.g. a recorded testbed's VICI socket), or {}
    netns_options: Callable[[str], Mapping[str, str]] | None = None
    #: (variable, meaning) for the ENVIRONMENT section of btns(1)
    environment: tuple[tuple[str, str], ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Unavailable:
    """A command that parses but cannot run: why, and the exit code it ends with."""

    summary: str  # for ``btns --help``
    message: str  # after ``btns NAME: ``
    code: int


@functools.cache
def _load() -> tuple[dict[str, Command], dict[str, Unavailable]]:
    found: dict[str, Command] = {}
    broken: dict[str, Unavailable] = {}
    order = list(EXPECTED)
    for ep in sorted(
        entry_points(group=GROUP), key=lambda ep: (order.index(ep.name) if ep.name in order else len(order), ep.name)
    ):
        if ep.name in found:
            continue
        try:
            cmd = ep.load()
        except Exception as exc:  # a broken extension must not take the other commands down
            broken[ep.name] = Unavailable(
                "(broken: see btns NAME)", f"entry point {ep.value} does not load: {exc!r}", exits.FAILED
            )
            continue
        if not isinstance(cmd, Command):
            broken[ep.name] = Unavailable(
                "(broken: see btns NAME)", f"entry point {ep.value} is not a {__name__}.Command", exits.FAILED
            )
            continue
        found[ep.name] = cmd
        broken.pop(ep.name, None)
    for name, dist in EXPECTED.items():
        if name not in found and name not in broken:
            broken[name] = Unavailable(
                f"(not installed: needs {dist.split(' (')[0]})",
                f"not installed: this command comes from {dist}",
                exits.NOT_FOUND,
            )
    return found, broken


def commands() -> dict[str, Command]:
    """The installed extension commands by name (those of EXPECTED first; the built-in commands win a clash)."""
    return _load()[0]


def unavailable() -> dict[str, Unavailable]:
    """Commands that cannot run: expected ones not installed (exit 5), extensions that do not load (exit 6)."""
    return _load()[1]


def netns_options(netns_name: str) -> dict[str, str]:
    """The backend options the installed extensions know for ``netns_name`` (first answer wins)."""
    for cmd in commands().values():
        if cmd.netns_options is not None:
            opts = cmd.netns_options(netns_name)
            if opts:
                return dict(opts)
    return {}
