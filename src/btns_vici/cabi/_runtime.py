"""The Python side of libbtns-ipsec.so: the ``extern "Python"`` functions its C code calls.

Loaded by the library's embedding init code (see build.py) with the cffi
``ffi`` of the library. Every function reports through its ``err`` out-parameter:
0, or the errno of the exception (an :class:`OSError`'s errno; ``TypeError`` and
``ValueError`` -> EINVAL; ``MemoryError`` -> ENOMEM; anything else -> EIO).
Nothing is raised into C.

Tokens are handed to C as opaque handles: integers from :class:`HandleTable`,
never addresses. A handle is never reused, so a freed handle, or a pointer
that was never a handle, is reported as EBADF and never dereferenced.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import api, capi
from ..core.errors import BtnsError, TokenFreedError
from ..core.tokens import IToken, PToken
from ..msg import IP_PKTINFO, IPV6_PKTINFO, MsgHdr, check_send
from ..sockets import borrowed_socket, check_inet

if TYPE_CHECKING:  # the embedded library's ffi (cffi's FFI API), typed by stubs/cffi
    from cffi import FFI

    CData = FFI.CData

KIND_ITOKEN = 1
KIND_PTOKEN = 2
_KINDS: dict[int, type[IToken] | type[PToken]] = {KIND_ITOKEN: IToken, KIND_PTOKEN: PToken}

#: Handles live in a range no allocator hands out on 64-bit Linux (non-canonical
#: addresses): a program that dereferences one anyway faults at once.
HANDLE_BASE_64 = 0xB75C_0000_0000_0000
HANDLE_BASE_32 = 0xB75C_0000
HANDLE_STEP = 16


class HandleTable:
    """Token objects by handle; handles are unique for the life of the process."""

    def __init__(self, pointer_size: int = 8) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[int, IToken | PToken] = {}
        self._base = HANDLE_BASE_64 if pointer_size >= 8 else HANDLE_BASE_32
        self._limit = (1 << (8 * pointer_size)) - 1
        self._next = self._base

    def add(self, token: IToken | PToken) -> int:
        with self._lock:
            self._next += HANDLE_STEP
            if self._next > self._limit:
                raise BtnsError("token handles exhausted", errno.ENOMEM)
            handle = self._next
            self._tokens[handle] = token
            return handle

    def get(self, handle: int, kind: int | None = None) -> IToken | PToken:
        """The live token of ``handle`` (EBADF if none), checked to be of ``kind`` (EINVAL)."""
        with self._lock:
            token = self._tokens.get(handle)
        if token is None or token.freed:
            raise TokenFreedError(f"{handle:#x} is not a live token handle (freed or never created)")
        if kind is not None and not isinstance(token, _KINDS[kind]):
            want = _KINDS[kind].__name__
            raise BtnsError(f"handle {handle:#x} is a {type(token).__name__}, not a {want}", errno.EINVAL)
        return token

    def pop(self, handle: int) -> None:
        with self._lock:
            self._tokens.pop(handle, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._tokens)


handles = HandleTable()

#: Environment variables that choose the default backend's options for C programs
#: (a C caller cannot pass a backend): option name -> variable.
BACKEND_ENV = {"vici_socket": "BTNS_VICI_SOCKET", "netns": "BTNS_NETNS"}
_backend_lock = threading.Lock()
_backend_configured = False


def configure_backend() -> None:
    """Once per process, before the first socket or datagram call: the default backend
    from ``$BTNS_BACKEND`` and the options in :data:`BACKEND_ENV`, when any is set.
    Until it succeeds (the daemon may start later) it is tried again on the next call."""
    global _backend_configured
    with _backend_lock:
        if _backend_configured:
            return
        options = {opt: os.environ[var] for opt, var in BACKEND_ENV.items() if os.environ.get(var)}
        if options:
            api.set_default_backend(os.environ.get("BTNS_BACKEND"), options)
        _backend_configured = True


def errno_of(exc: BaseException) -> int:
    """The errno a C caller sees for ``exc``."""
    if isinstance(exc, OSError) and exc.errno:
        return int(exc.errno)
    if isinstance(exc, (TypeError, ValueError, OverflowError, UnicodeError)):
        return errno.EINVAL
    if isinstance(exc, MemoryError):
        return errno.ENOMEM
    return errno.EIO


def _ptoken(handle: int) -> PToken:
    token = handles.get(handle, KIND_PTOKEN)
    assert isinstance(token, PToken)
    return token


def _copy_out(ffi: FFI, data: bytes, length_ptr: CData, buf: CData) -> int:
    """Write ``data`` to a C buffer of *length_ptr bytes; ERANGE with the size needed if short."""
    need = len(data)
    have = int(length_ptr[0])
    length_ptr[0] = need
    if need > have:
        return errno.ERANGE
    if need:
        ffi.memmove(buf, data, need)
    return 0


def _address(ffi: FFI, family: int, raw: CData) -> str:
    data = bytes(ffi.buffer(raw, 16))
    if family == socket.AF_INET:
        return str(ipaddress.IPv4Address(data[:4]))
    if family == socket.AF_INET6:
        return str(ipaddress.IPv6Address(data))
    raise BtnsError(f"address family {family} is not IPv4 or IPv6", errno.EINVAL)


def install(ffi: FFI) -> None:
    """Attach the implementations to the library's ``extern "Python"`` declarations."""

    def extern(fn: Callable[..., None]) -> Callable[..., None]:
        def call(*args: Any) -> None:
            err = args[-1]
            try:
                fn(*args[:-1])
                err[0] = 0
            except Exception as exc:
                err[0] = errno_of(exc)

        call.__name__ = fn.__name__
        return ffi.def_extern(name=fn.__name__)(call)

    @extern
    def _btns_py_create(kind: int, out: CData) -> None:
        if kind == KIND_ITOKEN:
            out[0] = handles.add(capi.ipsec_create_iToken())
        elif kind == KIND_PTOKEN:
            out[0] = handles.add(capi.ipsec_create_pToken())
        else:
            raise BtnsError(f"unknown token kind {kind}", errno.EINVAL)

    @extern
    def _btns_py_free(kind: int, handle: int) -> None:
        token = handles.get(handle, kind)
        if isinstance(token, IToken):
            capi.ipsec_free_iToken(token)
        else:
            capi.ipsec_free_pToken(token)
        handles.pop(handle)

    @extern
    def _btns_py_check(kind: int, handle: int) -> None:
        handles.get(handle, kind)

    @extern
    def _btns_py_get_attr(handle: int, attr_type: int, length_ptr: CData, buf: CData) -> None:
        value = capi.ipsec_get_token_attr(handles.get(handle), attr_type)
        code = _copy_out(ffi, value, length_ptr, buf)
        if code:
            raise BtnsError(f"attr_len too small, {len(value)} bytes needed", code)

    @extern
    def _btns_py_set_attr(handle: int, attr_type: int, length: int, buf: CData) -> None:
        capi.ipsec_set_token_attr(handles.get(handle), attr_type, bytes(ffi.buffer(buf, length)))

    @extern
    def _btns_py_set_socket(fd: int, handle: int) -> None:
        configure_backend()
        capi.ipsec_set_socket_pToken(fd, _ptoken(handle))

    @extern
    def _btns_py_get_socket(fd: int, handle: int) -> None:
        configure_backend()
        capi.ipsec_get_socket_pToken(fd, _ptoken(handle))

    @extern
    def _btns_py_cmp(a: int, b: int, result: CData) -> None:
        result[0] = capi.ipsec_cmp_pToken(_ptoken(a), _ptoken(b))

    @extern
    def _btns_py_dup(handle: int, out: CData) -> None:
        out[0] = handles.add(capi.ipsec_dup_pToken(_ptoken(handle)))

    @extern
    def _btns_py_import(buf: CData, length: int, out: CData) -> None:
        out[0] = handles.add(IToken.from_bytes(bytes(ffi.buffer(buf, length))))

    @extern
    def _btns_py_export(handle: int, length_ptr: CData, buf: CData) -> None:
        token = handles.get(handle, KIND_ITOKEN)
        assert isinstance(token, IToken)
        data = token.to_bytes()
        code = _copy_out(ffi, data, length_ptr, buf)
        if code:
            raise BtnsError(f"buffer too small, {len(data)} bytes needed", code)

    @extern
    def _btns_py_fill_flow(
        handle: int,
        proto: int,
        lfamily: int,
        laddr: CData,
        lport: int,
        rfamily: int,
        raddr: CData,
        rport: int,
        ifindex: int,
        ns_dev: int,
        ns_ino: int,
        rcv_fd: int,
        rcv_dev: int,
        rcv_ino: int,
    ) -> None:
        configure_backend()
        msg = MsgHdr(
            name=(_address(ffi, rfamily, raddr), rport),
            local=(_address(ffi, lfamily, laddr), lport),
            proto=proto,
            ifindex=ifindex if ifindex >= 0 else None,
            netns=(ns_dev, ns_ino) if ns_ino else None,
            # ipsec_recvmsg's IPSEC_CMSG_RECEIVER: checked against the descriptor before btnsd is sent it
            _receiver=(rcv_fd, (rcv_dev, rcv_ino)) if rcv_fd >= 0 and rcv_ino else None,
        )
        capi.ipsec_get_msg_pToken(msg, _ptoken(handle))

    @extern
    def _btns_py_check_send(
        fd: int,
        handle: int,
        has_dest: int,
        family: int,
        addr: CData,
        port: int,
        oif: int,
        has_mark: int,
        mark: int,
        dontroute: int,
    ) -> None:
        demand = _ptoken(handle)
        with borrowed_socket(fd) as sock:
            check_inet(sock)
            dest = (_address(ffi, family, addr), port) if has_dest else sock.getpeername()
            control = []  # the message's routing keys, as send_view reads them
            if oif:
                control.append(
                    (socket.IPPROTO_IPV6, IPV6_PKTINFO, bytes(16) + struct.pack("=i", oif))
                    if sock.family == socket.AF_INET6
                    else (socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=i", oif) + bytes(8))
                )
            if has_mark:
                control.append((socket.SOL_SOCKET, socket.SO_MARK, struct.pack("=I", mark)))
            flags = socket.MSG_DONTROUTE if dontroute else 0
            configure_backend()
            check_send(sock, dest if has_dest else None, control, flags, demand, api.resolve_backend())
