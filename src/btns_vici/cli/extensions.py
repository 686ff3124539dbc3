"""``btns`` commands that other distributions provide (entry point group ``btns_vici.cli``).

An entry point ``NAME = module:OBJECT`` of group :data:`GROUP` adds the command ``btns NAME``;
OBJECT is a :class:`Command`. btns-lab (``lab/`` of the repository) provides ``testbed`` and
``demo`` this way, so that the library wheel carries no lab code. A command of
:data:`EXPECTED` whose distribution is not installed still parses (any arguments) and then
fails with a message naming what to install and exit :data:`exits.NOT_FOUND`.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points

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


@functools.cache
def commands() -> dict[str, Command]:
    """The installed extension commands by name (those of EXPECTED first; the built-in commands win a clash)."""
    found: dict[str, Command] = {}
    order = list(EXPECTED)
    for ep in sorted(
        entry_points(group=GROUP), key=lambda ep: (order.index(ep.name) if ep.name in order else len(order), ep.name)
    ):
        cmd = ep.load()
        if not isinstance(cmd, Command):
            raise TypeError(f"entry point {GROUP}:{ep.name} = {ep.value} is not a btns_vici.cli.extensions.Command")
        found.setdefault(ep.name, cmd)
    return found


def missing() -> dict[str, str]:
    """Expected commands that no installed distribution provides: name -> what to install."""
    have = commands()
    return {name: dist for name, dist in EXPECTED.items() if name not in have}


def netns_options(netns_name: str) -> dict[str, str]:
    """The backend options the installed extensions know for ``netns_name`` (first answer wins)."""
    for cmd in commands().values():
        if cmd.netns_options is not None:
            opts = cmd.netns_options(netns_name)
            if opts:
                return dict(opts)
    return {}
