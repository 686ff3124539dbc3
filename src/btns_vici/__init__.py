"""btns-vici: the IPsec API of draft-ietf-btns-c-api-04 over strongSwan's VICI and the kernel.

Two faces over the same objects: :mod:`btns_vici.capi` has the draft's C
functions under their exact names; this package exports the pythonic API.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__ as __version__

# The public names load on first use (PEP 562): `import btns_vici` and the `btns` command's
# start-up do not pay for pyroute2, pluggy, cryptography and vici until something needs them.
if TYPE_CHECKING:
    from .api import (
        accept,
        attached_ptoken,
        connect,
        get_socket_ptoken,
        listen,
        ptoken_for_flow,
        set_default_backend,
        set_socket_ptoken,
    )
    from .backend import Backend, BackendInfo, Capabilities, Enforcement, SAEvent
    from .core.constants import Attr, AuthMethod, Level, Setting
    from .core.errors import (
        BackendError,
        BtnsError,
        CommandFailedError,
        DaemonAccessError,
        DaemonDownError,
        DaemonTimeoutError,
        NotSupportedError,
        NoValueError,
        ProtectionLostError,
        ProtocolError,
        ReadOnlyAttributeError,
        RequirementNotMetError,
        SerializationError,
        TokenAttributeError,
        TokenFreedError,
    )
    from .core.requirements import satisfies, unmet
    from .core.selectors import Flow, TrafficSelector
    from .core.tokens import IToken, PToken
    from .msg import MsgHdr, enable_pktinfo, recvmsg, sendmsg
    from .plugins import backends, get_backend

_LAZY = {
    "Attr": "core.constants",
    "AuthMethod": "core.constants",
    "Backend": "backend",
    "BackendError": "core.errors",
    "BackendInfo": "backend",
    "BtnsError": "core.errors",
    "Capabilities": "backend",
    "CommandFailedError": "core.errors",
    "DaemonAccessError": "core.errors",
    "DaemonDownError": "core.errors",
    "DaemonTimeoutError": "core.errors",
    "Enforcement": "backend",
    "Flow": "core.selectors",
    "IToken": "core.tokens",
    "Level": "core.constants",
    "MsgHdr": "msg",
    "NoValueError": "core.errors",
    "NotSupportedError": "core.errors",
    "PToken": "core.tokens",
    "ProtectionLostError": "core.errors",
    "ProtocolError": "core.errors",
    "ReadOnlyAttributeError": "core.errors",
    "RequirementNotMetError": "core.errors",
    "SAEvent": "backend",
    "SerializationError": "core.errors",
    "Setting": "core.constants",
    "TokenAttributeError": "core.errors",
    "TokenFreedError": "core.errors",
    "TrafficSelector": "core.selectors",
    "accept": "api",
    "attached_ptoken": "api",
    "backends": "plugins",
    "connect": "api",
    "enable_pktinfo": "msg",
    "get_backend": "plugins",
    "get_socket_ptoken": "api",
    "listen": "api",
    "ptoken_for_flow": "api",
    "recvmsg": "msg",
    "satisfies": "core.requirements",
    "sendmsg": "msg",
    "set_default_backend": "api",
    "set_socket_ptoken": "api",
    "unmet": "core.requirements",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "Attr",
    "AuthMethod",
    "Backend",
    "BackendError",
    "BackendInfo",
    "BtnsError",
    "Capabilities",
    "CommandFailedError",
    "DaemonAccessError",
    "DaemonDownError",
    "DaemonTimeoutError",
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
    "RequirementNotMetError",
    "SAEvent",
    "SerializationError",
    "Setting",
    "TokenAttributeError",
    "TokenFreedError",
    "TrafficSelector",
    "accept",
    "attached_ptoken",
    "backends",
    "connect",
    "enable_pktinfo",
    "get_backend",
    "get_socket_ptoken",
    "listen",
    "ptoken_for_flow",
    "recvmsg",
    "satisfies",
    "sendmsg",
    "set_default_backend",
    "set_socket_ptoken",
    "unmet",
]
