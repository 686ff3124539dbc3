"""btns_vici.aio on the host testbed: every entry point inside a running loop, negotiating
streams, latch breaks on the loop and on the stream, and the loop's responsiveness while an
IKE negotiation is in flight."""

from __future__ import annotations

import asyncio
import errno
import socket
import threading
import time
from pathlib import Path

import pytest

import btns_vici
from btns_lab.testbed import Testbed
from btns_vici import ProtectionLostError, aio, capi
from btns_vici.core.selectors import Flow
from btns_vici.hostkey import load_or_create
from btns_vici.latch import LatchBroken
from btns_vici.sockets import source_address

from .test_enforce import Side, _cleanup, btns_demand

pytestmark = pytest.mark.testbed


@pytest.fixture
def sides(tb: Testbed, tmp_path: Path):
    a, b = Side(tb, tb.a, tmp_path), Side(tb, tb.b, tmp_path)
    a.trust(b)
    b.trust(a)
    yield a, b
    _cleanup(tb)


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Ticker:
    """A 1 ms timer on the loop; records the longest gap between two firings."""

    def __init__(self) -> None:
        self.gaps: list[float] = []
        self._stop = False
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        last = time.perf_counter()
        while not self._stop:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            self.gaps.append(now - last)
            last = now

    def __enter__(self) -> Ticker:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True

    @property
    def worst_ms(self) -> float:
        return max(self.gaps) * 1000 if self.gaps else float("inf")

    def kept_ticking(self, floor_ms: float = 10.0) -> bool:
        """The loop ran on while the awaited work went on: many ticks, and no single gap holding
        half the time (a blocking call would be one gap as long as the work itself). A property of
        the code, not of the machine's speed: a loaded CI host stretches gaps, not their share."""
        total = sum(self.gaps) * 1000
        return len(self.gaps) >= 5 and self.worst_ms < max(floor_ms, total / 2)


async def echo_server(b: Side, port: int, demand, **kw):
    lsock = b.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((str(b.peer.v4), port))
    seen: list = []

    async def handler(reader: asyncio.StreamReader, writer: aio.BtnsStreamWriter) -> None:
        seen.append(writer)
        try:
            while data := await reader.read(1024):
                writer.write(data.upper())
                await writer.drain()
        except ProtectionLostError as exc:
            seen.append(exc)
        finally:
            writer.close()

    srv = await aio.start_server(handler, sock=lsock, ptoken=demand, backend=b.backend, **kw)
    return srv, seen


def test_sync_entry_points_work_inside_a_running_loop(sa_exact, pair_factory, backend_a):
    """The blocking API called straight from a coroutine: no 'event loop is already running'."""
    tb = sa_exact
    cli, _srv = pair_factory(socket.IPPROTO_TCP, 4)
    plain, _ = pair_factory(socket.IPPROTO_TCP, 4, plain=True)

    async def main() -> None:
        tok = btns_vici.get_socket_ptoken(cli, backend_a)
        assert tok.protected, tok.information_string
        assert not btns_vici.get_socket_ptoken(plain, backend_a).protected
        flow = Flow(socket.IPPROTO_TCP, tb.a.v4, 0, tb.b.v4, 80)
        assert btns_vici.ptoken_for_flow(flow, backend_a).protected
        assert source_address(plain, tb.b.v4_plain) == tb.a.v4_plain  # thread + join: brief, not a loop
        assert backend_a.list_sas()
        tmpl = capi.ipsec_create_pToken()
        assert capi.ipsec_free_pToken(tmpl) == 0

    run(main())


def test_sync_negotiating_wrappers_work_inside_a_running_loop(tb, sides):
    """api.listen/accept/connect from a coroutine: they block (an IKE exchange) but work."""
    from btns_vici.api import connect

    from .test_enforce import serve, wait_accept

    a, b = sides

    async def main() -> None:
        srv, got = serve(b, btns_demand(), 26107)  # set_socket_ptoken + listen here, accept in a thread
        cli = a.socket()
        btns_vici.set_socket_ptoken(cli, btns_demand(), a.backend)
        connect(cli, (str(b.peer.v4), 26107), a.backend)
        conn, _ = wait_accept(got)
        assert btns_vici.get_socket_ptoken(cli, a.backend).protected
        for s in (cli, conn, srv):
            s.close()

    run(main())


@pytest.fixture
def sa_exact(tb: Testbed) -> Testbed:
    tb.up("aio", "rawkey", 4)
    return tb


def test_aio_queries_inside_a_running_loop(sa_exact, pair_factory, backend_a):
    tb = sa_exact
    cli, _ = pair_factory(socket.IPPROTO_TCP, 4)
    plain, _ = pair_factory(socket.IPPROTO_TCP, 4, plain=True)

    async def main() -> None:
        loop_thread = threading.get_ident()
        with Ticker() as t:
            tok = await aio.get_socket_ptoken(cli, backend_a)
            fast = await aio.get_socket_ptoken(cli, backend_a, inline=True)
            clear = await aio.get_socket_ptoken(plain, backend_a)
            flow = await aio.ptoken_for_flow(Flow(socket.IPPROTO_TCP, tb.a.v4, 0, tb.b.v4, 80), backend_a)
            many = await asyncio.gather(*(aio.get_socket_ptoken(cli, backend_a) for _ in range(200)))
        assert threading.get_ident() == loop_thread
        assert tok.protected and fast.protected and flow.protected and all(m.protected for m in many)
        assert tok.itoken.pub_key_id == tb.b.key.public_der
        assert not clear.protected
        # 200 lookups in flight keep 4 pool threads busy in Python: the loop then waits for the GIL
        # (5 ms switch interval) now and then. Bounded, but looser than during a negotiation.
        assert t.kept_ticking(floor_ms=50), t.gaps

    run(main())


def test_aio_set_socket_ptoken_and_errnos(tb, sides):
    a, _b = sides

    async def main() -> None:
        with a.socket() as s:
            await aio.set_socket_ptoken(s, btns_demand(), a.backend)
            assert btns_vici.attached_ptoken(s) is not None
        with a.socket() as s:
            s.setblocking(False)
            with pytest.raises(OSError) as e:
                await aio.get_socket_ptoken(s, a.backend)
            assert e.value.errno == errno.ENOTCONN
        with pytest.raises(OSError) as e:
            await aio.get_socket_ptoken(object(), a.backend)
        assert e.value.errno == errno.ENOTSOCK

    run(main())


def test_open_connection_and_start_server_negotiate_verify_and_expose_the_ptoken(tb, sides):
    a, b = sides

    async def main() -> None:
        srv, seen = await echo_server(b, 26101, btns_demand())
        async with srv:
            with Ticker() as t:  # the IKE exchange runs while the loop keeps ticking
                reader, writer = await aio.open_connection(
                    str(b.peer.v4), 26101, sock=a.socket(), ptoken=btns_demand(), backend=a.backend
                )
            assert t.kept_ticking(), f"loop stalled {t.worst_ms:.1f} ms during negotiation ({len(t.gaps)} ticks)"
            writer.write(b"hello")
            await writer.drain()
            assert await reader.readexactly(5) == b"HELLO"
            mine = writer.get_extra_info(aio.EXTRA_PTOKEN)
            assert mine is writer.transport.get_extra_info("btns_ptoken")  # the transport answers too
            assert mine.protected and mine.itoken.pub_key_id == b.host.public_der
            assert writer.get_extra_info(aio.EXTRA_LATCH) is not None
            theirs = seen[0].get_extra_info("btns_ptoken")
            assert theirs.protected and theirs.itoken.pub_key_id == a.host.public_der
            now = await aio.get_socket_ptoken(writer, a.backend)  # a stream is accepted as the socket
            assert now.protected
            writer.close()
            await writer.wait_closed()

    run(main())


def test_open_connection_pinned_to_the_wrong_key_is_refused(tb, sides, tmp_path):
    a, b = sides
    stranger = load_or_create(tmp_path / "stranger")
    wrong = btns_demand()
    wrong.itoken = stranger.itoken()

    async def main() -> None:
        srv, seen = await echo_server(b, 26102, btns_demand())
        async with srv:
            with Ticker() as t, pytest.raises(OSError) as e:
                await aio.open_connection(str(b.peer.v4), 26102, sock=a.socket(), ptoken=wrong, backend=a.backend)
            assert e.value.errno == errno.EHOSTUNREACH
            assert t.kept_ticking(), t.gaps
            assert not [s for s in seen if isinstance(s, aio.BtnsStreamWriter)]

    run(main())


def test_server_refuses_a_connection_that_does_not_meet_its_ptoken(tb, sides):
    """A client over an SA the operator made with another key: start_server never calls the handler."""
    a, b = sides

    async def main() -> None:
        pin = btns_demand()
        pin.itoken = load_or_create(Path(a.key_dir).parent / "nobody").itoken()  # only this key is served
        srv, seen = await echo_server(b, 26103, btns_demand())
        async with srv:
            # Accept policy of the listener vs a connection it cannot verify: a clear socket's flow.
            state = srv.btns_state  # type: ignore[attr-defined]
            state.demand = pin
            with pytest.raises((OSError, asyncio.IncompleteReadError)):
                reader, writer = await aio.open_connection(
                    str(b.peer.v4), 26103, sock=a.socket(), ptoken=btns_demand(), backend=a.backend
                )
                writer.write(b"x")
                await writer.drain()
                await reader.readexactly(1)
            await asyncio.sleep(0.1)
            assert not [s for s in seen if isinstance(s, aio.BtnsStreamWriter)]
            assert state.refused == 1

    run(main())


def test_latch_break_runs_the_callback_on_the_loop_and_fails_the_stream(tb, sides):
    a, b = sides

    async def main() -> None:
        loop = asyncio.get_running_loop()
        srv, _seen = await echo_server(b, 26104, btns_demand())
        broke: list[tuple[LatchBroken, bool]] = []
        event = asyncio.Event()

        def on_break(info: LatchBroken) -> None:
            broke.append((info, threading.get_ident() == loop_thread))
            event.set()

        loop_thread = threading.get_ident()
        async with srv:
            reader, writer = await aio.open_connection(
                str(b.peer.v4), 26104, sock=a.socket(), ptoken=btns_demand(), backend=a.backend, on_break=on_break
            )
            writer.write(b"ok")
            assert await reader.readexactly(2) == b"OK"
            pending = loop.create_task(reader.read(10))  # a read waiting when the SA goes
            names = [n for e in list(a.peer.ctl.list_conns()) for n in e if n.startswith("btns-init-")]

            def terminate() -> None:
                for name in names:
                    for _ in a.peer.ctl.terminate({"ike": name, "timeout": "3000", "force": "yes"}):
                        pass

            await asyncio.to_thread(terminate)
            await asyncio.wait_for(event.wait(), 10)
            assert broke and broke[0][1], "on_break must run on the loop's thread"
            assert broke[0][0].reasons
            with pytest.raises(ProtectionLostError) as e:
                await pending
            assert e.value.errno == errno.ECONNABORTED
            with pytest.raises(ProtectionLostError):
                writer.write(b"more")
                await writer.drain()
            writer.close()

    run(main())


def test_start_server_without_a_demand_reports_the_clear_peer(tb, sides):
    """No pToken: every connection is served, its (unprotected) pToken exposed, nothing guessed."""
    a, b = sides

    async def main() -> None:
        with tb.in_netns(tb.b):
            lsock = socket.socket()
        lsock.bind((str(tb.b.v4_plain), 26105))
        got: list = []

        async def handler(reader, writer) -> None:
            got.append(writer.get_extra_info("btns_ptoken"))
            writer.close()

        srv = await aio.start_server(handler, sock=lsock, backend=b.backend)
        async with srv:
            with tb.in_netns(tb.a):
                c = socket.socket()
            c.bind((str(tb.a.v4_plain), 0))
            reader, writer = await aio.open_connection(str(tb.b.v4_plain), 26105, sock=c, backend=a.backend)
            assert not writer.get_extra_info("btns_ptoken").protected
            assert await reader.read() == b""
            writer.close()
        assert got and not got[0].protected and "NOT protected" in got[0].information_string

    run(main())


def test_aio_connect_and_listen_on_plain_sockets(tb, sides):
    """aio.listen/aio.connect: the socket-level calls of api, off the loop."""
    a, b = sides

    async def main() -> None:
        loop = asyncio.get_running_loop()
        srv = b.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await aio.set_socket_ptoken(srv, btns_demand(), b.backend)
        srv.bind((str(b.peer.v4), 26106))
        await aio.listen(srv, 4, b.backend)
        srv.setblocking(False)
        cli = a.socket()
        await aio.set_socket_ptoken(cli, btns_demand(), a.backend)
        with Ticker() as t:
            accepting = loop.create_task(loop.sock_accept(srv))
            tok = await aio.connect(cli, (str(b.peer.v4), 26106), a.backend)
            conn, _ = await accepting
        assert t.kept_ticking(), t.gaps
        assert tok.protected and tok.itoken.pub_key_id == b.host.public_der
        assert (await aio.get_socket_ptoken(conn, b.backend)).protected
        for s in (cli, conn, srv):
            s.close()

    run(main())


def test_open_connection_on_an_already_connected_socket(sa_exact, pair_factory, backend_a):
    """asyncio's form (sock= connected, no host/port): verified against the demand, not re-armed."""
    tb = sa_exact
    cli, srv = pair_factory(socket.IPPROTO_TCP, 4)
    plain, _ = pair_factory(socket.IPPROTO_TCP, 4, plain=True)
    want = aio.demand(aio.pin_key(tb.b.key.public_pem))

    async def main() -> None:
        _reader, writer = await aio.open_connection(sock=cli, ptoken=want, backend=backend_a)
        assert writer.get_extra_info("btns_ptoken").itoken.pub_key_id == tb.b.key.public_der
        writer.write(b"abc")
        await writer.drain()
        assert srv.recv(3) == b"abc"
        with pytest.raises(OSError) as e:
            await aio.open_connection(sock=plain, ptoken=want, backend=backend_a)
        assert e.value.errno == errno.EACCES
        writer.close()

    run(main())
