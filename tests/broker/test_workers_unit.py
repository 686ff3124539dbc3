"""btnsd's worker plumbing, pure parts: the channel's messages, the worker tally merged into
the main process's registry, ``[broker] workers`` in btnsd.toml."""

from __future__ import annotations

import errno
import os
import socket

import pytest

from btns_vici.broker import channel
from btns_vici.broker.metrics import Metrics, Tally
from btns_vici.broker.policy import parse
from btns_vici.broker.workers import default_count


def test_a_message_and_its_descriptor_cross_the_channel():
    main, worker = channel.pair()
    with main, worker, socket.socket() as s:
        channel.send(main, channel.message(channel.CLIENT, 7, channel.CRED.pack(123, 1000, 100)), s.fileno())
        kind, flags, ident, payload, fd = channel.receive(worker)
        try:
            assert (kind, flags, ident) == (channel.CLIENT, 0, 7)
            assert channel.CRED.unpack(payload) == (123, 1000, 100)
            assert os.fstat(fd).st_ino == os.fstat(s.fileno()).st_ino  # the same socket
        finally:
            os.close(fd)
        frame = b"BT\x01\x01" + bytes(8)
        channel.send(worker, channel.message(channel.FORWARD, 9, frame, channel.TRUNCATED))
        assert channel.receive(main) == (channel.FORWARD, channel.TRUNCATED, 9, frame, -1)
        with pytest.raises(BlockingIOError):
            channel.receive(main)  # nothing queued: never blocks


def test_a_malformed_message_is_kind_0_with_its_descriptor_closed_and_eof_is_none():
    main, worker = channel.pair()
    with socket.socket() as s:
        before = len(os.listdir("/proc/self/fd"))
        channel.send(worker, b"xy", s.fileno())  # shorter than the header
        assert channel.receive(main) == (0, 0, 0, b"", -1)
        assert len(os.listdir("/proc/self/fd")) == before
    worker.close()
    assert channel.receive(main) is None
    main.close()


def test_stats_round_trip_and_garbage():
    msg = channel.stats({"q": []}, [1, 2])
    assert channel.HEAD.unpack_from(msg)[0] == channel.STATS
    payload = msg[channel.HEAD.size :]
    assert channel.parse_stats(payload) == ({"q": []}, [1, 2])
    assert channel.parse_stats(b"{not json") == ({}, [])
    assert channel.parse_stats(b'{"active": ["x"]}') == ({}, [])


def _samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in m.registry.collect()
        for s in fam.samples
        if not s.name.endswith("_created")
    }


def test_a_merged_tally_equals_the_same_observations_made_in_the_main_process():
    pytest.importorskip("prometheus_client")
    observations = [("get_socket_ptoken", "ok", 0.00003), ("get_socket_ptoken", "ok", 0.0004)]
    observations += [("get_socket_ptoken", "ENOTCONN", 0.02), ("hello", "ok", 3.0)]
    direct, merged, tally = Metrics(True), Metrics(True), Tally(True)
    for op, answer, seconds in observations:
        direct.query(op, answer, seconds)
        tally.query(op, answer, seconds)
    direct.error("bad_request")
    tally.error("bad_request")
    snap = tally.snapshot()
    merged.merge(snap)
    assert _samples(merged) == _samples(direct)
    tally.clear()
    assert tally.snapshot() is None
    merged.merge({"q": [["x"]], "h": "nonsense"})  # malformed: ignored, never raised
    merged.merge(None)


def test_a_disabled_tally_counts_nothing():
    t = Tally(False)
    t.query("get_socket_ptoken", "ok", 0.001)
    t.error("bad_request")
    assert t.snapshot() is None


def test_workers_in_btnsd_toml():
    assert parse({}).workers is None
    assert parse({"broker": {"workers": 3}}).workers == 3
    for bad in (0, -1, 65, "2", True, 1.5):
        with pytest.raises(OSError) as e:
            parse({"broker": {"workers": bad}})
        assert e.value.errno == errno.EINVAL
    assert 1 <= default_count() <= 4


def test_a_worker_whose_channel_is_full_answers_eagain_and_never_blocks():
    """The main process does not read: the worker's forwards fill the channel, then each further
    request is answered EAGAIN at once; what was forwarded is intact, in order."""
    import time

    from btns_vici.broker import protocol
    from btns_vici.broker.policy import Config, Quota
    from btns_vici.broker.serving import Client
    from btns_vici.broker.workers import Worker

    main, theirs = channel.pair()
    worker = Worker(Config(backends=(), quota=Quota(requests_per_second=1e9, burst=10**9)), theirs, Tally(False))
    app, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    c = Client(ours, os.getpid(), os.getuid(), os.getgid(), frozenset(), 1, tokens=1e9)
    worker.clients[1] = c
    refused, t0 = [], time.monotonic()
    with main, theirs, app, ours:
        for i in range(1, 400):
            app.send(protocol.request("hello", i, pad="x" * 60_000))  # not the hot request: forwarded
            worker._readable(c)
            try:
                ident, payload = protocol.decode(app.recv(protocol.MAX_FRAME, socket.MSG_DONTWAIT), protocol.RESPONSE)
            except BlockingIOError:
                continue
            assert payload["errno"] == errno.EAGAIN and ident == i, payload
            refused.append(i)
        assert time.monotonic() - t0 < 10  # never waited for the main process
        assert refused and refused == list(range(refused[0], 400)), refused[:5]
        forwarded = []
        while True:
            try:
                kind, _flags, ident, frame, fd = channel.receive(main)
            except BlockingIOError:
                break
            assert kind == channel.FORWARD and ident == 1 and fd == -1
            forwarded.append(protocol.decode(frame, protocol.REQUEST)[0])
        assert forwarded == list(range(1, refused[0]))
