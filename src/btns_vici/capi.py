"""The draft's C bindings under their exact names, mirrored the way ``socket`` mirrors C.

Same names and value encodings as draft-ietf-btns-c-api-04 (figures 2-12):
2-octet integers in host byte order, NUL-terminated strings, binary pubKeyID,
serialized iTokens for the object-valued pToken attributes. Where C returns 0
these return 0; where C returns -1 and sets errno these raise OSError with
that errno (see README "Errors"). Out-parameters become return values
(``ipsec_dup_pToken``) or are filled in place (``ipsec_get_*_pToken``), as the
draft says.
"""

from __future__ import annotations

import errno

from . import api, msg
from .broker.client import BrokerClient
from .core.attributes import capi_constants
from .core.derive import unprotected_ptoken
from .core.errors import BtnsError
from .core.tokens import IToken, PToken, fill
from .msg import MsgHdr
from .protection import ptoken_of
from .sockets import FileDescriptorLike, resolve_fd

__all__ = [
    "ipsec_cmp_pToken",
    "ipsec_create_iToken",
    "ipsec_create_pToken",
    "ipsec_dup_pToken",
    "ipsec_free_iToken",
    "ipsec_free_pToken",
    "ipsec_get_msg_pToken",
    "ipsec_get_socket_pToken",
    "ipsec_get_token_attr",
    "ipsec_set_msg_pToken",
    "ipsec_set_socket_pToken",
    "ipsec_set_token_attr",
]

# -- constants (figures 4 and 8) -------------------------------------------------------
#: Every ``IPSEC_API_ATTR_*`` name with its value, derived from the attribute table
#: (core/attributes.py; README "Constant values"), the same as ``ipsec_api.h``; each is
#: also a module attribute, e.g. ``capi.IPSEC_API_ATTR_pubKeyID``.
CONSTANTS: dict[str, int] = capi_constants()
globals().update(CONSTANTS)
__all__ += list(CONSTANTS)


def __getattr__(name: str) -> int:
    """Only reached for a name that does not exist; its type tells checkers the constants are ints."""
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _token(token: object) -> IToken | PToken:
    if not isinstance(token, (IToken, PToken)):
        raise TypeError(f"token must be an iToken or a pToken, not {type(token).__name__}")
    return token


def _ptoken(p: object, what: str = "pToken") -> PToken:
    if not isinstance(p, PToken):
        raise TypeError(f"{what} must be a pToken, not {type(p).__name__}")
    p.check_live()
    return p


# -- figure 3 / figure 7: constructors and destructors -----------------------------
def ipsec_create_iToken() -> IToken:
    """Figure 3: a new iToken, every authentication-method switch ANY."""
    return IToken()


def ipsec_free_iToken(p: IToken) -> int:
    """Figure 3: free an iToken; EBADF if it was already freed."""
    if not isinstance(p, IToken):
        raise TypeError(f"expected an iToken, not {type(p).__name__}")
    p.free()
    return 0


def ipsec_create_pToken() -> PToken:
    """Figure 7: a new pToken, every switch and level ANY, no strings, no iTokens."""
    return PToken()


def ipsec_free_pToken(p: PToken) -> int:
    """Figure 7: free a pToken; EBADF if it was already freed."""
    if not isinstance(p, PToken):
        raise TypeError(f"expected a pToken, not {type(p).__name__}")
    p.free()
    return 0


# -- figure 5: attributes -------------------------------------------------------------
def ipsec_get_token_attr(token: IToken | PToken, attr_type: int, attr_len: int | None = None) -> bytes:
    """Figure 5: the attribute's value in the C encoding.

    ``attr_len``, like getsockopt's buflen, is the caller's buffer size: if the
    value needs more, OSError(ERANGE) is raised (the C library reports the size needed).
    """
    value = _token(token).get_attr_bytes(attr_type)
    if attr_len is not None and len(value) > attr_len:
        raise BtnsError(f"attr_len {attr_len} too small, {len(value)} bytes needed", errno.ERANGE)
    return value


def ipsec_set_token_attr(token: IToken | PToken, attr_type: int, attr_val: bytes) -> int:
    """Figure 5: set an attribute from its C encoding (attr_len is len(attr_val))."""
    if attr_val is None:
        raise BtnsError("attr_val must not be NULL", errno.EINVAL)
    _token(token).set_attr_bytes(attr_type, attr_val)
    return 0


# -- figure 9: sockets ----------------------------------------------------------------
def ipsec_set_socket_pToken(fd: FileDescriptorLike, pToken: PToken) -> int:
    """Figure 9: attach a pToken to a socket; its requirements are enforced (see README)."""
    resolve_fd(fd)
    api.set_socket_ptoken(fd, _ptoken(pToken))
    return 0


def ipsec_get_socket_pToken(fd: FileDescriptorLike, pToken: PToken) -> int:
    """Figure 9: fill the caller's pToken with the socket's verified protection."""
    resolve_fd(fd)
    target = _ptoken(pToken)
    fill(target, api.get_socket_ptoken(fd))
    return 0


# -- figure 10: datagrams -------------------------------------------------------------
def ipsec_set_msg_pToken(msg_: MsgHdr, pToken: PToken) -> int:
    """Figure 10: put the pToken into msg's ancillary data for btns_vici.sendmsg()."""
    msg.attach(msg_, _ptoken(pToken))
    return 0


def ipsec_get_msg_pToken(msg_: MsgHdr, pToken: PToken) -> int:
    """Figure 10: fill the caller's pToken with the protection of a datagram from btns_vici.recvmsg()."""
    target = _ptoken(pToken)
    view = msg.view_of_msg(msg_)
    be = api.resolve_backend()
    if isinstance(be, BrokerClient):  # btnsd answers only with the receiving socket in hand
        fd = msg.receiver_of(msg_)
        if fd is None:
            fill(
                target,
                unprotected_ptoken(
                    view.flow,
                    "the receiving socket is unknown or closed: btnsd "
                    "answers only for a socket it receives (use btns_vici.recvmsg)",
                ),
            )
        else:
            fill(target, be.get_msg_ptoken(fd, msg_.name, msg_.local, msg_.ifindex, msg_.proto))  # type: ignore[arg-type]
        return 0
    fill(target, ptoken_of(view, be))
    return 0


# -- figures 11 and 12: comparison and duplication -----------------------------------
def ipsec_cmp_pToken(p1: PToken, p2: PToken) -> int:
    """Figure 11: 0 when equivalent per section 2.3.5 (README: "Equivalence"), else 1."""
    return 0 if _ptoken(p1, "p1").equivalent(_ptoken(p2, "p2")) else 1


def ipsec_dup_pToken(p: PToken) -> PToken:
    """Figure 12: a new, independent copy of ``p`` (the C out-parameter p_dup is the return value)."""
    return _ptoken(p).copy()
