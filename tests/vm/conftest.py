"""The VM tier: tests marked ``vm`` in this directory run inside a full Debian kernel under qemu.

On the host, each selected ``vm`` test is replaced by a :class:`VMItem` proxy. The first proxy
that runs boots the VM once (``scripts/vm/run.sh``), which runs ``pytest -m vm`` on exactly the
selected tests with ``--junitxml`` on a share the host reads back; every proxy then passes,
fails (with the guest's failure text) or skips as its test did in the guest. A VM that does not
boot or report fails every proxy: it is never a skip.

In the guest (``BTNS_VM_GUEST=1``, set by the VM's init) the tests run normally.
Environment: ``BTNS_VM_TIMEOUT`` (seconds for the whole guest run, default 540),
``BTNS_VM_KEEP`` (keep the output directory with junit.xml and console.log).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .vmtier import VMFailure, junit_key, run_in_vm

HERE = Path(__file__).resolve().parent
IN_GUEST = os.environ.get("BTNS_VM_GUEST") == "1"
_RESULTS = pytest.StashKey["VMRun"]()


class VMItem(pytest.Item):
    """Host-side stand-in for one ``vm`` test: reports what the test did inside the VM."""

    def __init__(self, *, original: pytest.Item, **kwargs) -> None:
        super().__init__(**kwargs)
        self.own_markers = list(original.own_markers)
        self.keywords.update(original.keywords)
        self._original = original

    def runtest(self) -> None:
        run = self.config.stash.get(_RESULTS, None)
        if run is None:
            selected = [i.nodeid for i in self.session.items if isinstance(i, VMItem)]
            run = run_in_vm(self.config.rootpath, selected)
            self.config.stash[_RESULTS] = run
        outcome = run.outcomes.get(junit_key(self.nodeid))
        if outcome is None:
            raise VMFailure(f"{self.nodeid} did not report from the VM. {run.problem}".strip())
        if outcome.status == "skipped":
            pytest.skip(f"(in the VM) {outcome.text}")
        if outcome.status == "failed":
            raise VMFailure(f"failed in the VM:\n{outcome.text}")

    def repr_failure(self, excinfo, style=None):  # type: ignore[override]
        if isinstance(excinfo.value, VMFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):  # type: ignore[override]
        return self.path, None, f"[vm] {self.name}"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On the host, swap the selected vm tests of this directory for VM proxies."""
    if IN_GUEST:
        return
    for n, item in enumerate(items):
        if item.get_closest_marker("vm") and HERE in Path(item.path).resolve().parents:
            items[n] = VMItem.from_parent(item.parent, name=item.name, original=item)


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    run = config.stash.get(_RESULTS, None)
    if run is None:
        return
    all_passed = not run.problem and all(o.status != "failed" for o in run.outcomes.values())
    keep = not all_passed or bool(os.environ.get("BTNS_VM_KEEP"))
    terminalreporter.write_line(
        f"VM tier: {len(run.outcomes)} tests reported from the VM in {run.seconds:.1f} s"
        + (f"; junit.xml and console.log kept in {run.out_dir}" if keep else "")
    )
    if not keep:
        shutil.rmtree(run.out_dir, ignore_errors=True)


# ---- fixtures for the tests that run in the guest ----

KERNEL_MODULES = (
    "xfrm_user",
    "esp4",
    "esp6",
    "ah4",
    "ah6",
    "xfrm_ipcomp",
    "ipcomp",
    "ipcomp6",
    "xfrm4_tunnel",
    "xfrm6_tunnel",
    "tunnel4",
    "tunnel6",
    "veth",
)


@pytest.fixture(scope="session")
def ipsec_kernel() -> None:
    """Load the kernel's IPsec modules (only possible in the VM)."""
    if not IN_GUEST:
        pytest.fail("this fixture only works inside the VM (BTNS_VM_GUEST=1)")
    subprocess.run(["modprobe", "-a", *KERNEL_MODULES], check=True)
