"""The C ABI (draft-ietf-btns-c-api-04 in C): libbtns-ipsec.so, ipsec_api.h, btns-ipsec.pc.

The wheel is pure Python and carries only the sources; ``btns-cabi build`` (:mod:`.build`,
cffi embedding) compiles the library for the running interpreter and installs it under the
environment's prefix: ``<prefix>/lib``, ``<prefix>/include``, ``<prefix>/lib/pkgconfig``
(``scripts/setup.sh`` does it for the dev venv). The library's Python side is
:mod:`._runtime`. See README "C ABI".
"""

from __future__ import annotations

import sys
from pathlib import Path

LIBRARY = "libbtns-ipsec.so"
HEADER = "ipsec_api.h"
PC_NAME = "btns-ipsec"


def header_path() -> Path:
    """ipsec_api.h as shipped inside the package (the same file as ``<prefix>/include/ipsec_api.h``)."""
    return Path(__file__).with_name(HEADER)


def installed_paths(prefix: str | None = None) -> dict[str, Path]:
    """Where installation puts the library, header and .pc file for ``prefix`` (default: sys.prefix)."""
    root = Path(prefix or sys.prefix)
    return {
        "library": root / "lib" / LIBRARY,
        "header": root / "include" / HEADER,
        "pkgconfig": root / "lib" / "pkgconfig" / f"{PC_NAME}.pc",
    }
