"""``btns`` commands from other distributions (entry point group btns_vici.cli), with real entry points.

Each test writes a real distribution (a ``*.dist-info`` with ``entry_points.txt`` and a module) into
a directory on PYTHONPATH and runs ``python -m btns_vici.cli`` there: importlib.metadata finds it as
it finds btns-lab. (That `btns testbed|demo` without btns-lab exit 5 naming it is checked on the
bare wheel, in tests/packaging/test_install.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HELLO = """
from btns_vici.cli.extensions import Command

def _args(p):
    p.add_argument("--who", default="world")

def _run(args):
    print(f"hello {args.who}")
    return 0

COMMAND = Command(summary="say hello", description="Say hello to --who.", add_arguments=_args, run=_run)
"""


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A directory holding one distribution with a good, a broken and a wrong entry point."""
    info = tmp_path / "btns_ext_test-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: btns-ext-test\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[btns_vici.cli]\nhello = btns_ext_hello:COMMAND\nbroken = btns_ext_no_such_module:COMMAND\n"
        "notacommand = json:dumps\nsas = btns_ext_hello:COMMAND\n"
    )
    (tmp_path / "btns_ext_hello.py").write_text(HELLO)
    return tmp_path


def btns(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *sys.path[1:]]), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "btns_vici.cli", *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def test_an_extension_command_parses_and_runs(site: Path) -> None:
    res = btns(site, "hello", "--who", "lab")
    assert (res.returncode, res.stdout, res.stderr) == (0, "hello lab\n", "")
    listed = btns(site, "--help")
    assert listed.returncode == 0 and "say hello" in listed.stdout


def test_a_broken_extension_fails_alone_with_exit_6(site: Path) -> None:
    res = btns(site, "broken", "up", "--anything")
    assert res.returncode == 6 and res.stdout == ""
    assert res.stderr.startswith("btns broken: entry point btns_ext_no_such_module:COMMAND does not load: ")
    assert "ModuleNotFoundError" in res.stderr
    wrong = btns(site, "notacommand")
    assert wrong.returncode == 6
    assert wrong.stderr == "btns notacommand: entry point json:dumps is not a btns_vici.cli.extensions.Command\n"
    assert btns(site, "hello").returncode == 0  # the others still work


def test_built_in_commands_win_a_clash(site: Path) -> None:
    res = btns(site, "sas", "--who", "x")  # the extension's `sas` is ignored: --who is not an option of btns sas
    assert res.returncode == 2 and "unrecognized arguments: --who x" in res.stderr


def test_unknown_arguments_of_a_working_command_are_a_usage_error(site: Path) -> None:
    res = btns(site, "hello", "--nope")
    assert res.returncode == 2 and "unrecognized arguments: --nope" in res.stderr
