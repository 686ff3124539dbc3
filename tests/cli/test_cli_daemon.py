"""`btns daemon` runs btnsd: the same options reach it."""

from __future__ import annotations

import argparse

import pytest

from btns_vici.cli import cmd_daemon
from btns_vici.cli.parser import build


def test_btns_daemon_forwards_its_options_to_btnsd(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    monkeypatch.setattr("btns_vici.broker.__main__.main", lambda argv: seen.append(argv) or 0)
    args = build().parse_args(
        [
            "daemon",
            "--socket",
            "/x.sock",
            "--config",
            "/c.toml",
            "--metrics",
            ":9464",
            "--workers",
            "3",
            "--keep-privileges",
            "-v",
            "--leap-of-faith",
        ]
    )
    assert isinstance(args, argparse.Namespace) and cmd_daemon.run(args) == 0
    assert seen == [
        [
            "--socket",
            "/x.sock",
            "--config",
            "/c.toml",
            "--metrics",
            ":9464",
            "--workers",
            "3",
            "--keep-privileges",
            "--leap-of-faith",
            "[::]:5386",
            "-v",
        ]
    ]
