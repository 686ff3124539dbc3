"""Build and install libbtns-ipsec.so (cffi embedding), ipsec_api.h and btns-ipsec.pc.

The wheel of btns-vici is pure Python; the C ABI is compiled by this explicit step,
on the machine that uses it, against the interpreter that runs it:

    btns-cabi build [--prefix DIR]      # DIR (default: sys.prefix, e.g. the venv) gets
                                        #   DIR/lib/libbtns-ipsec.so
                                        #   DIR/include/ipsec_api.h
                                        #   DIR/lib/pkgconfig/btns-ipsec.pc
    btns-cabi paths [--prefix DIR]      # where they are (exit 1 if any is missing)
    btns-cabi uninstall [--prefix DIR]

Needs cffi (``pip install 'btns-vici[cabi]'``), a C compiler and Python's headers and
shared library (Debian: ``apt-get install gcc python3-dev``). The library links
libpythonX.Y by its soname: with no RUNPATH when that is in a directory the dynamic
linker searches anyway (Debian's /usr/bin/python3 and venvs made from it), with the
interpreter's LIBDIR as RUNPATH otherwise (pyenv, /opt builds).

Standalone on purpose (``python build.py ...`` works from a source tree): it imports
nothing from the package.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import cffi

HERE = Path(__file__).resolve().parent
LIBRARY = "libbtns-ipsec.so"
PC_FILE = "btns-ipsec.pc"
HEADER = "ipsec_api.h"
MODULE = "_btns_ipsec_cffi"

#: The extern "Python" functions libbtns_ipsec.c calls (implemented in _runtime.py).
CDEF = """
extern "Python" void _btns_py_create(int, uintptr_t *, int *);
extern "Python" void _btns_py_free(int, uintptr_t, int *);
extern "Python" void _btns_py_check(int, uintptr_t, int *);
extern "Python" void _btns_py_get_attr(uintptr_t, uint32_t, uint32_t *, void *, int *);
extern "Python" void _btns_py_set_attr(uintptr_t, uint32_t, uint32_t, const void *, int *);
extern "Python" void _btns_py_set_socket(int, uintptr_t, int *);
extern "Python" void _btns_py_get_socket(int, uintptr_t, int *);
extern "Python" void _btns_py_cmp(uintptr_t, uintptr_t, int *, int *);
extern "Python" void _btns_py_dup(uintptr_t, uintptr_t *, int *);
extern "Python" void _btns_py_import(const void *, uint32_t, uintptr_t *, int *);
extern "Python" void _btns_py_export(uintptr_t, uint32_t *, void *, int *);
extern "Python" void _btns_py_fill_flow(uintptr_t, int, int, const unsigned char *, int, int,
                                         const unsigned char *, int, int, uint64_t, uint64_t, int, uint64_t,
                                         uint64_t, int *);
extern "Python" void _btns_py_check_send(int, uintptr_t, int, int, const unsigned char *, int, int, int, uint32_t,
                                          int, int *);
"""

INIT_CODE = f"""
from {MODULE} import ffi
from btns_vici.cabi._runtime import install
install(ffi)
"""

_SYSTEM_LIBDIRS = {"/lib", "/usr/lib", "/lib64", "/usr/lib64", "/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu"}


def _python_libdir() -> str | None:
    """Where libpythonX.Y.so is, when it is not in a directory the dynamic linker searches anyway."""
    libdir = sysconfig.get_config_var("LIBDIR")
    if not libdir or os.path.realpath(libdir) in _SYSTEM_LIBDIRS:
        return None
    return str(libdir)


class BuildError(RuntimeError):
    """A missing prerequisite, said in a way an operator can act on."""


def version() -> str:
    """The package version, from btns_vici/_version.py beside this directory (no import of the package)."""
    text = (HERE.parent / "_version.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"', text, re.M)
    if match is None:
        raise BuildError(f"no __version__ in {HERE.parent / '_version.py'}")
    return match.group(1)


def check_prerequisites() -> None:
    """cffi, a C compiler, Python.h and a shared libpython: raise BuildError naming what to install."""
    ver = "{}.{}".format(*sys.version_info[:2])
    try:
        import cffi  # noqa: F401
    except ImportError:
        raise BuildError("cffi is missing: pip install 'btns-vici[cabi]' (or: pip install cffi)") from None
    cc = os.environ.get("CC", sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None and shutil.which("cc") is None:
        raise BuildError(f"no C compiler ({cc}): Debian: apt-get install gcc")
    include = sysconfig.get_paths()["include"]
    if not os.path.isfile(os.path.join(include, "Python.h")):
        raise BuildError(f"no Python.h in {include}: Debian: apt-get install python{ver}-dev (or python3-dev)")
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    ldlib = sysconfig.get_config_var("LDLIBRARY") or ""
    shared = f"libpython{ver}{getattr(sys, 'abiflags', '')}.so"
    if not any(os.path.exists(os.path.join(d, shared)) for d in {libdir, *_SYSTEM_LIBDIRS}):
        raise BuildError(
            f"no shared {shared} for this Python ({sys.executable}; LIBDIR={libdir}, LDLIBRARY={ldlib}): "
            f"Debian: apt-get install libpython{ver}-dev; other builds: configure --enable-shared"
        )


def make_ffibuilder() -> cffi.FFI:
    import cffi  # lazily: only this step needs it

    ffi = cffi.FFI()
    ffi.embedding_api("")
    ffi.cdef(CDEF)
    libdir = _python_libdir()
    ffi.set_source(
        MODULE,
        (HERE / "libbtns_ipsec.c").read_text(),
        include_dirs=[str(HERE)],
        library_dirs=[libdir] if libdir else [],
        runtime_library_dirs=[libdir] if libdir else [],
        extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
        # The interpreter this build is for: the library falls back to it when its prefix has none
        # (installed with --prefix outside the venv that holds btns_vici).
        define_macros=[("BTNS_BUILD_PYTHON", _c_string(sys.executable))],
    )
    ffi.embedding_init_code(INIT_CODE)
    return ffi


def _c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def pc_text(version: str) -> str:
    """btns-ipsec.pc: relative to its own directory, so it is right wherever it is installed."""
    return (HERE / "btns-ipsec.pc.in").read_text().replace("@VERSION@", version)


def build(
    out_dir: str | os.PathLike[str], tmp_dir: str | os.PathLike[str], version: str, verbose: bool = False
) -> Path:
    """Compile OUT_DIR/libbtns-ipsec.so and write OUT_DIR/btns-ipsec.pc; returns the library's path."""
    out, tmp = Path(out_dir), Path(tmp_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp.mkdir(parents=True, exist_ok=True)
    built = Path(make_ffibuilder().compile(tmpdir=str(tmp), target=LIBRARY, verbose=verbose))
    target = out / LIBRARY
    partial = out / (LIBRARY + ".tmp")
    partial.write_bytes(built.read_bytes())
    partial.chmod(0o755)
    partial.replace(target)
    (out / PC_FILE).write_text(pc_text(version))
    return target


def installed_paths(prefix: str | os.PathLike[str]) -> dict[str, Path]:
    """Where ``build`` installs the library, header and .pc file under ``prefix``."""
    root = Path(prefix)
    return {
        "library": root / "lib" / LIBRARY,
        "header": root / "include" / HEADER,
        "pkgconfig": root / "lib" / "pkgconfig" / PC_FILE,
    }


def install(prefix: str | os.PathLike[str], verbose: bool = False) -> dict[str, Path]:
    """Compile the library for this interpreter and install it with its header and .pc under ``prefix``."""
    check_prerequisites()
    paths = installed_paths(prefix)
    with tempfile.TemporaryDirectory(prefix="btns-cabi-") as tmp:
        built = build(Path(tmp) / "out", Path(tmp) / "build", version(), verbose=verbose)
        for what, src in (("library", built), ("header", HERE / HEADER), ("pkgconfig", Path(tmp) / "out" / PC_FILE)):
            dest = paths[what]
            dest.parent.mkdir(parents=True, exist_ok=True)
            partial = dest.with_name(dest.name + ".tmp")
            shutil.copyfile(src, partial)
            partial.chmod(0o755 if what == "library" else 0o644)
            partial.replace(dest)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="btns-cabi",
        description="Build and install the C ABI of btns-vici (libbtns-ipsec.so).",
        epilog="Then: PKG_CONFIG_PATH=PREFIX/lib/pkgconfig cc prog.c $(pkg-config --cflags --libs btns-ipsec)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (
        ("build", "compile for this Python and install under PREFIX"),
        ("paths", "print the installed files (exit 1 if one is missing)"),
        ("uninstall", "remove the installed files"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--prefix", default=sys.prefix, help="installation prefix (default: %(default)s)")
        if name == "build":
            p.add_argument("-v", "--verbose", action="store_true", help="show the compiler's commands")
    args = parser.parse_args(argv)
    paths = installed_paths(args.prefix)
    if args.action == "build":
        try:
            install(args.prefix, verbose=args.verbose)
        except BuildError as exc:
            print(f"btns-cabi: {exc}", file=sys.stderr)
            return 1
        except PermissionError as exc:
            print(f"btns-cabi: {exc.filename}: permission denied (choose --prefix)", file=sys.stderr)
            return 4
        for what, path in paths.items():
            print(f"{what}: {path}")
        return 0
    if args.action == "paths":
        missing = 0
        for what, path in paths.items():
            print(f"{what}: {path}{'' if path.is_file() else '  (missing)'}")
            missing += not path.is_file()
        return 1 if missing else 0
    for path in paths.values():
        path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
