"""The distributions: a pure ``py3-none-any`` wheel, an sdist that carries and passes the tests,
metadata that ``twine check`` would accept (checked here without twine: the same README render
is done by PyPI; scripts/check-dist.sh runs twine itself)."""

from __future__ import annotations

import email.parser
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from btns_vici import __version__

from .conftest import ROOT, Dists

pytestmark = pytest.mark.packaging


def _metadata(dists: Dists) -> email.message.Message:
    with zipfile.ZipFile(dists.wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(z.read(name).decode())


def test_wheel_is_pure_python(dists: Dists) -> None:
    assert dists.wheel.name == f"btns_vici-{__version__}-py3-none-any.whl"
    with zipfile.ZipFile(dists.wheel) as z:
        names = z.namelist()
        wheel_file = z.read(next(n for n in names if n.endswith(".dist-info/WHEEL"))).decode()
    assert "Root-Is-Purelib: true" in wheel_file and "Tag: py3-none-any" in wheel_file
    compiled = [n for n in names if n.endswith((".so", ".pyd", ".dylib", ".a", ".o"))]
    assert not compiled, compiled
    assert not [n for n in names if ".data/" in n], "nothing outside the package (the C ABI is built later)"
    # The C ABI's sources are in the package, once each: `btns-cabi build` compiles them.
    for src in ("ipsec_api.h", "libbtns_ipsec.c", "btns-ipsec.pc.in", "build.py"):
        assert [n for n in names if n.endswith("/" + src)] == [f"btns_vici/cabi/{src}"]
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    # PEP 561: the annotations are for users' type checkers too; the stubs are for ours only.
    assert "btns_vici/py.typed" in names
    assert not [n for n in names if n.endswith(".pyi") or n.startswith("stubs/")]


#: The lab's modules (btns-lab, lab/): never in a library distribution, under any package.
LAB_MODULE = re.compile(r"(^|/)(btns_lab/|(testbed|demo|compose\w*|tbstate|cmd_testbed|cmd_demo|lab|runner)(\.py|/))")


def _lab_modules(names: list[str], package_roots: tuple[str, ...]) -> list[str]:
    """The names under ``package_roots`` that are lab modules or packages."""
    return [n for n in names if n.startswith(package_roots) and LAB_MODULE.search(n)]


def test_wheel_has_no_lab_module(dists: Dists) -> None:
    with zipfile.ZipFile(dists.wheel) as z:
        names = z.namelist()
        py = [n for n in names if n.endswith(".py")]
        lines = sum(len(z.read(n).splitlines()) for n in py)
        eps = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    print(f"library wheel: {len(py)} .py files, {lines} lines")
    assert "btns_vici/__init__.py" in names
    assert not _lab_modules(names, ("btns_vici/", "btns_lab/")), _lab_modules(names, ("btns_vici/", "btns_lab/"))
    assert "btns_lab" not in eps and "pytest11" not in eps


def test_sdist_has_no_lab_module(dists: Dists) -> None:
    with tarfile.open(dists.sdist) as t:
        names = [n.split("/", 1)[1] for n in t.getnames() if "/" in n]
    assert "src/btns_vici/__init__.py" in names
    roots = ("src/", "plugins/btns-libreswan/src/")
    assert not _lab_modules(names, roots), _lab_modules(names, roots)
    assert not [n for n in names if n.startswith("lab/")], "btns-lab is its own distribution"


def test_libreswan_wheel_has_no_lab_module(tmp_path: Path) -> None:
    """The libreswan backend's wheel: its lab (two plutos in namespaces) moved to btns-lab too."""
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path), str(ROOT / "plugins" / "btns-libreswan")],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    assert "btns_libreswan/plugin.py" in names
    assert not _lab_modules(names, ("btns_libreswan/",)), _lab_modules(names, ("btns_libreswan/",))


def test_wheel_metadata(dists: Dists) -> None:
    meta = _metadata(dists)
    assert meta["Version"] == __version__
    assert meta["License-Expression"] == "MIT"
    assert meta["Author"] and meta.get_all("Project-URL") and len(meta.get_all("Classifier")) >= 5
    assert meta["Description-Content-Type"] == "text/markdown"
    requires = meta.get_all("Requires-Dist")
    assert not [r for r in requires if r.startswith("pyroute2") and "extra" not in r], "pyroute2: tests only"
    assert any(r.startswith("pyroute2>=0.7.12") and 'extra == "test"' in r for r in requires)
    assert not [r for r in requires if r.startswith("cffi") and "extra" not in r], "cffi only in the cabi extra"
    assert not [r for r in requires if r.startswith("ruff") and 'extra == "test"' in r], "ruff is a dev tool"
    assert any(r.startswith("ruff") and 'extra == "dev"' in r for r in requires)


def test_entry_points(dists: Dists) -> None:
    with zipfile.ZipFile(dists.wheel) as z:
        eps = z.read(next(n for n in z.namelist() if n.endswith("entry_points.txt"))).decode()
    assert "btns = btns_vici.cli:main" in eps and "btns-cabi = btns_vici.cabi.build:main" in eps
    assert "strongswan = btns_vici.strongswan.plugin:plugin" in eps


def test_one_version_source() -> None:
    """The version is written once, in src/btns_vici/_version.py."""
    hits = []
    for path in [ROOT / "pyproject.toml", *sorted((ROOT / "src").rglob("*.py"))]:
        for line in path.read_text().splitlines():
            if line.replace(" ", "").startswith(('version="', '__version__="')):
                hits.append(str(path.relative_to(ROOT)))
    assert hits == ["src/btns_vici/_version.py"]


def test_sdist_contents(dists: Dists) -> None:
    with tarfile.open(dists.sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for needed in (
        "LICENSE",
        "README.md",
        "pyproject.toml",
        "tests/unit/test_tokens.py",
        "tests/cabi/conftest.py",
        "src/btns_vici/cabi/ipsec_api.h",
        "examples/c/README.md",
        "stubs/cffi/__init__.pyi",
        "stubs/vici/protocol.pyi",
        "plugins/btns-libreswan/src/btns_libreswan/py.typed",
    ):
        assert needed in names, needed
    assert not [n for n in names if "__pycache__" in n or n.endswith(".so")]


def test_sdist_passes_its_unit_tests(dists: Dists, tmp_path: Path) -> None:
    """Unpacked, the sdist's own tests pass against the sdist's own source."""
    with tarfile.open(dists.sdist) as t:
        t.extractall(tmp_path, filter="data")
    (tree,) = tmp_path.iterdir()
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/unit"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout.splitlines()[-1]
    import btns_vici

    assert str(tree) not in btns_vici.__file__


def test_readme_renders_as_pypi_would(dists: Dists) -> None:
    """twine check's test: the long description is Markdown, declared as such, and not empty."""
    meta = _metadata(dists)
    body = meta.get_payload()
    assert body.startswith("# btns-vici") and len(body) > 1000
