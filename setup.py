"""Build step for the C ABI (issue 9); all metadata is in pyproject.toml.

``pip install .`` and ``pip install -e .`` compile libbtns-ipsec.so (cffi
embedding, src/btns_vici/cabi/build.py) and install it with its header and
pkg-config file under the environment's prefix:

    <prefix>/lib/libbtns-ipsec.so
    <prefix>/include/ipsec_api.h
    <prefix>/lib/pkgconfig/btns-ipsec.pc
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

from setuptools import Distribution, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
CABI = "src/btns_vici/cabi"
OUT = "build/btns-cabi"


def _cabi_build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_btns_cabi_build", os.path.join(HERE, CABI, "build.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildExtWithCabi(build_ext):
    """build_ext that also compiles libbtns-ipsec.so and btns-ipsec.pc into build/btns-cabi."""

    def run(self) -> None:
        super().run()
        _cabi_build().build(
            os.path.join(HERE, OUT),
            os.path.join(HERE, self.build_temp, "btns-cabi"),
            self.distribution.get_version(),
            verbose=bool(self.verbose),
        )


class BinaryDistribution(Distribution):
    """The wheel carries a native library: platform-specific, and build_ext always runs."""

    def has_ext_modules(self) -> bool:
        return True

    def has_data(self) -> bool:
        # setuptools' editable_wheel installs data files only if the distribution has
        # ``has_data`` (distutils calls it ``has_data_files``): without this,
        # ``pip install -e .`` would leave out the library, header and .pc file.
        return self.has_data_files()


setup(
    distclass=BinaryDistribution,
    cmdclass={"build_ext": BuildExtWithCabi},
    package_data={"btns_vici.cabi": ["ipsec_api.h", "libbtns_ipsec.c", "btns-ipsec.pc.in"]},
    data_files=[
        ("lib", [f"{OUT}/libbtns-ipsec.so"]),
        ("lib/pkgconfig", [f"{OUT}/btns-ipsec.pc"]),
        ("include", [f"{CABI}/ipsec_api.h"]),
    ],
)
