"""`btns testbed up|status|down` leaves nothing behind; `btns demo` runs the demo."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from .conftest import btns, btns_json

pytestmark = pytest.mark.testbed


def _netns() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def test_testbed_up_status_down_leaves_nothing_behind(tmp_path):
    state = tmp_path / "testbed.json"
    env = {"BTNS_TESTBED_STATE": str(state)}
    try:
        up = btns_json("testbed", "up", env=env, timeout=120)
        names = [p["netns"] for p in up["peers"]]
        pids = [p["pid"] for p in up["peers"]]
        workdir = Path(up["workdir"])
        assert state.exists() and up["state_file"] == str(state) and up["connection"] == "btns"
        assert all(n.startswith("btns-tb-") and n in _netns() for n in names)
        assert [_comm(pid) for pid in pids] == ["charon", "charon"]
        assert workdir.is_dir() and workdir.name.startswith(f"btns-tb-{up['tag']}-")

        status = btns_json("testbed", "status", env=env)
        assert status["healthy"] is True
        assert [(p["running"], p["vici_answers"], p["ike_sas"]) for p in status["peers"]] == [(True, True, 1)] * 2

        # a recorded namespace brings its VICI socket along: no --vici-socket needed
        sas = btns_json("sas", "--netns", names[0], env=env)
        assert [(sa["name"], sa["state"], sa["remote"]["auth_method"]) for sa in sas] == [
            ("btns", "ESTABLISHED", "BTNS")
        ]
        sockets = btns_json("sockets", "--netns", names[0], env=env)
        assert {(s["local_port"], s["status"]) for s in sockets if s["proto"] == "udp"} >= {
            (500, "unconnected"),
            (4500, "unconnected"),
        }
        assert all(p["pid"] == pids[0] for s in sockets for p in s["processes"])  # charon A's sockets

        again = btns("testbed", "up", env=env)
        assert again.returncode == 6 and "already recorded" in again.stderr

        down = btns_json("testbed", "down", env=env, timeout=60)
        assert sorted(down["stopped_pids"]) == sorted(pids)
        assert sorted(down["deleted_namespaces"]) == sorted(names)
        assert down["removed_workdir"] == str(workdir)
    finally:
        if state.exists():
            btns("testbed", "down", env=env, timeout=60)
    assert not any(n in _netns() for n in names)
    assert all(_comm(pid) != "charon" for pid in pids)
    assert not workdir.exists() and not state.exists()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert f"btns-{up['tag']}" not in links

    gone = btns("testbed", "status", env=env)
    assert gone.returncode == 5 and "no testbed recorded" in gone.stderr
    assert btns("testbed", "down", env=env).returncode == 5


def test_testbed_status_of_a_dead_testbed_is_exit_1(tmp_path):
    state = tmp_path / "testbed.json"
    env = {"BTNS_TESTBED_STATE": str(state)}
    up = btns_json("testbed", "up", env=env, timeout=120)
    try:
        victim = up["peers"][1]["pid"]
        os.kill(victim, 9)  # a charon we started (via `btns testbed up`), by its recorded pid
        status = btns_json("testbed", "status", env=env, code=1)
        assert status["healthy"] is False
        assert [p["running"] for p in status["peers"]] == [True, False]
    finally:
        down = btns_json("testbed", "down", env=env, timeout=60)
    assert down["stopped_pids"] == [up["peers"][0]["pid"]]  # the dead one is not signalled again
    assert not any(p["netns"] in _netns() for p in up["peers"])


def test_demo_runs_and_all_checks_pass():
    out = btns_json("demo", timeout=180)
    assert out["ok"] is True and out["exit_code"] == 0
    checks = [line for line in out["lines"] if line.startswith("  [")]
    assert len(checks) >= 5 and all(line.startswith("  [ok]") for line in checks), out["lines"]
