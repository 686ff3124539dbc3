"""whack output is bounded in time and size, and its failures carry true errnos (issue 13).

A fake ``whack`` (a shell script) stands in for libreswan's: no pluto needed.
"""

from __future__ import annotations

import errno
import os
import time
import tracemalloc

import pytest

from btns_libreswan import whack
from btns_vici.core.errors import CommandFailedError, DaemonDownError, DaemonTimeoutError, ProtocolError


@pytest.fixture
def fake(tmp_path):
    ctl = tmp_path / "pluto.ctl"
    ctl.write_text("")

    def make(body: str) -> dict[str, str]:
        script = tmp_path / "whack"
        script.write_text("#!/bin/sh\n" + body + "\n")
        script.chmod(0o755)
        return {"whack": str(script), "pluto_ctl": str(ctl), "libreswan_root": str(tmp_path / "noroot")}

    return make


def test_trickling_whack_is_killed_at_the_deadline(fake):
    opts = fake("while true; do printf x; sleep 1; done")
    t0 = time.monotonic()
    with pytest.raises(DaemonTimeoutError) as exc:
        whack.run(opts, "--status", timeout=1.0)
    assert exc.value.errno == errno.ETIMEDOUT
    assert time.monotonic() - t0 < 1.5


def test_silent_whack_times_out_from_the_option(fake):
    opts = {**fake("exec sleep 30"), "whack_timeout": "0.5"}
    t0 = time.monotonic()
    with pytest.raises(DaemonTimeoutError):
        whack.run(opts, "--status")
    assert time.monotonic() - t0 < 1.0


def test_flood_of_output_is_refused_with_bounded_memory(fake):
    opts = fake("exec cat /dev/zero")
    tracemalloc.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(ProtocolError) as exc:
            whack.run(opts, "--status", timeout=10)
        took = time.monotonic() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert exc.value.errno == errno.EPROTO
    assert peak < 3 * whack.MAX_OUTPUT
    assert took < 5


def test_output_that_is_not_utf8_is_decoded_not_raised(fake):
    opts = fake(r"printf '000 \377\376 conn\n'")
    assert "conn" in whack.run(opts, "--status", timeout=5)


def test_not_running_and_failure_errnos(fake, tmp_path):
    opts = fake("echo 'connect(pluto_ctl) failed: Connection refused' >&2; exit 1")
    with pytest.raises(DaemonDownError) as down:
        whack.run(opts, "--status", timeout=5)
    assert down.value.errno == errno.ECONNREFUSED
    opts = fake("echo 'whack: no such connection' >&2; exit 3")
    with pytest.raises(CommandFailedError) as failed:
        whack.run(opts, "--status", timeout=5)
    assert failed.value.errno == errno.EIO
    os.unlink(opts["pluto_ctl"])
    with pytest.raises(DaemonDownError):
        whack.run(opts, "--status", timeout=5)
