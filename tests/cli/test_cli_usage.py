"""Exit codes for misuse and missing daemons, and --help for every command."""

from __future__ import annotations

import shutil

import pytest

from btns_vici.cli.parser import COMMANDS

from .conftest import btns

pytestmark = pytest.mark.testbed


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_of_every_command(command):
    res = btns(command, "--help")
    assert res.returncode == 0
    assert f"usage: btns {command}" in res.stdout and "exit codes:" in res.stdout and "--json" in res.stdout


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["nosuchcommand"],
        ["token", "--pid", "x", "--fd", "1"],
        ["token", "--fd", "1"],
        ["watch", "--count", "0"],
        ["testbed", "sideways"],
    ],
)
def test_usage_errors_are_exit_2(args):
    res = btns(*args)
    assert res.returncode == 2 and "usage: btns" in res.stderr


@pytest.mark.parametrize("command", ["sas", "sockets", "watch"])
def test_no_daemon_is_exit_3(tmp_path, command):
    res = btns("--backend", "strongswan", "--vici-socket", str(tmp_path / "none.vici"), command)
    assert res.returncode == 3, res.stderr
    assert "does not answer" in res.stderr


def test_unknown_backend_is_exit_3():
    res = btns("--backend", "no-such-backend", "sas")
    assert res.returncode == 3 and "no backend named 'no-such-backend'" in res.stderr


def test_unknown_namespace_is_exit_5():
    res = btns("sockets", "--netns", "btns-no-such-namespace")
    assert res.returncode == 5 and "no network namespace" in res.stderr


def test_entering_a_namespace_unprivileged_is_exit_4(tb):
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed to run btns as another user"
    res = btns("sockets", "--netns", tb.a.netns, prefix=[setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"])
    assert res.returncode == 4 and "needs CAP_SYS_ADMIN" in res.stderr, res.stderr


def test_global_options_work_before_and_after_the_command(tb):
    before = btns("--json", "--netns", tb.a.netns, "--vici-socket", tb.a.vici_path, "sas")
    after = btns("sas", "--json", "--netns", tb.a.netns, "--vici-socket", tb.a.vici_path)
    assert before.returncode == after.returncode == 0
    assert before.stdout.startswith("[") and after.stdout.startswith("[")
