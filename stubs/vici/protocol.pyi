# vici.protocol as btns_vici.strongswan uses it (strongSwan's vici package, 5.9 and 6.x).
from collections.abc import Mapping
from typing import Any

class Packet:
    CMD_REQUEST: int
    CMD_RESPONSE: int
    CMD_UNKNOWN: int
    EVENT_REGISTER: int
    EVENT_UNREGISTER: int
    EVENT_CONFIRM: int
    EVENT_UNKNOWN: int
    EVENT: int
    @classmethod
    def request(cls, command: str, message: bytes | None = None) -> bytes: ...
    @classmethod
    def register_event(cls, event_type: str) -> bytes: ...
    @classmethod
    def unregister_event(cls, event_type: str) -> bytes: ...

class Message:
    SECTION_START: int
    SECTION_END: int
    KEY_VALUE: int
    LIST_START: int
    LIST_ITEM: int
    LIST_END: int
    # Values are nested sections (mappings), lists and scalars (bytes, or anything str() encodes).
    @classmethod
    def serialize(cls, message: Mapping[str, Any]) -> bytes: ...
