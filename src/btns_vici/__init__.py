"""btns-vici: the IPsec API of draft-ietf-btns-c-api-04 over strongSwan's VICI and the kernel.

Two faces over the same objects: :mod:`btns_vici.capi` has the draft's C
functions under their exact names; this package exports the pythonic API.
"""

from __future__ import annotations

from ._version import __version__ as __version__
from .api import attached_ptoken, get_socket_ptoken, ptoken_for_flow, set_default_backend, set_socket_ptoken
from .backend import Backend, BackendInfo, Capabilities, Enforcement, SAEvent
from .constants import Attr, AuthMethod, Level, Setting
from .errors import (
    BackendError,
    BtnsError,
    NotSupportedError,
    NoValueError,
    ProtectionLostError,
    ProtocolError,
    ReadOnlyAttributeError,
    SerializationError,
    TokenAttributeError,
    TokenFreedError,
)
from .msg import MsgHdr, recvmsg, sendmsg
from .plugins import backends, get_backend
from .requirements import satisfies, unmet
from .selectors import Flow, TrafficSelector
from .tokens import IToken, PToken

__all__ = [
    "Attr",
    "AuthMethod",
    "Backend",
    "BackendError",
    "BackendInfo",
    "BtnsError",
    "Capabilities",
    "Enforcement",
    "Flow",
    "IToken",
    "Level",
    "MsgHdr",
    "NoValueError",
    "NotSupportedError",
    "PToken",
    "ProtectionLostError",
    "ProtocolError",
    "ReadOnlyAttributeError",
    "SAEvent",
    "SerializationError",
    "Setting",
    "TokenAttributeError",
    "TokenFreedError",
    "TrafficSelector",
    "attached_ptoken",
    "backends",
    "get_backend",
    "get_socket_ptoken",
    "ptoken_for_flow",
    "recvmsg",
    "satisfies",
    "sendmsg",
    "set_default_backend",
    "set_socket_ptoken",
    "unmet",
]
