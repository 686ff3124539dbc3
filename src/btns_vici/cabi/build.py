"""Build libbtns-ipsec.so (cffi embedding) and btns-ipsec.pc; used by setup.py.

Standalone on purpose: setup.py loads this file by path, before btns_vici and
its dependencies are installed, so it imports nothing from the package.

    python src/btns_vici/cabi/build.py OUT_DIR      # builds OUT_DIR/libbtns-ipsec.so and btns-ipsec.pc
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

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
                                         const unsigned char *, int, int, uint64_t, uint64_t, int *);
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
    return libdir


def make_ffibuilder():  # -> cffi.FFI (cffi is a build requirement, imported lazily)
    import cffi

    if not sysconfig.get_config_var("Py_ENABLE_SHARED") and not sysconfig.get_config_var("LDLIBRARY"):
        raise RuntimeError("libbtns-ipsec needs a Python built with a shared libpython (--enable-shared)")
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
    )
    ffi.embedding_init_code(INIT_CODE)
    return ffi


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


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    dest = Path(sys.argv[1])
    print(build(dest, dest / "tmp", "0.1.0", verbose=True))
