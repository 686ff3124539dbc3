"""The pure token core: deriving a socket's pToken, and the C and wire forms (no root, no daemon).

    .venv/bin/python benchmarks/bench_tokens.py [--rounds 20000]

Times, per call (p50 and p99 in µs):

* ``ptoken_for``: the pToken of a flow through a known SA (what ``get_socket_pToken`` builds
  after its lookup and proof: the per-SA template copied, the flow's text added);
* naive: the same with nothing cached (template and iTokens derived again for every query);
* floor: ``PToken.copy()`` of the template, the least any answer must do (an independent copy);
* the C form: ``ipsec_get_token_attr`` of a level and of ``iToken`` (a serialized iToken),
  ``ipsec_set_token_attr`` of a level, ``IToken.from_bytes``, ``ipsec_cmp_pToken``.

Prints a table; asserts nothing about timings. Run it with ``PYTHONPATH=<old checkout>/src`` to
compare another version of the core side by side.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import statistics
import struct
import time
from collections.abc import Callable

from btns_vici import capi
from btns_vici.core import derive
from btns_vici.core.constants import Attr, AuthMethod, Setting
from btns_vici.core.records import ChildSA, DataplaneProof, Identity, IkeSA, Protection
from btns_vici.core.selectors import Flow, TrafficSelector
from btns_vici.core.tokens import IToken, PToken

A, B = ipaddress.ip_address("10.99.0.1"), ipaddress.ip_address("10.99.0.2")


def protection() -> Protection:
    child = ChildSA(
        name="c",
        uniqueid="1",
        reqid=1,
        state="INSTALLED",
        mode="TRANSPORT",
        protocol="ESP",
        spi_in=0xC0000001,
        spi_out=0xC0000002,
        encr_alg="AES_GCM_16",
        encr_keysize=256,
        integ_alg=None,
        local_ts=(TrafficSelector.from_network("10.99.0.1/32"),),
        remote_ts=(TrafficSelector.from_network("10.99.0.2/32"),),
        install_time=5,
    )
    ike = IkeSA(
        backend="bench",
        name="conn",
        uniqueid="1",
        version=2,
        state="ESTABLISHED",
        local_host=A,
        remote_host=B,
        # Pre-shared keys: deriving them needs no known-peers store (a BTNS peer's would).
        local=Identity("a", AuthMethod.PRESHAREDKEY, auth_class="pre-shared key"),
        remote=Identity("b", AuthMethod.PRESHAREDKEY, auth_class="pre-shared key"),
        children=(child,),
    )
    proof = DataplaneProof("kernel-xfrm", "state spi c0000002", child.spi_out, child.reqid)
    return Protection(Flow(6, A, 40000, B, 80), ike, child, proof)


def timed(fn: Callable[[], object], rounds: int) -> tuple[float, float]:
    for _ in range(min(1000, rounds)):
        fn()
    samples = []
    gc.disable()
    try:
        for _ in range(rounds):
            t0 = time.perf_counter_ns()
            fn()
            samples.append(time.perf_counter_ns() - t0)
    finally:
        gc.enable()
    samples.sort()
    return statistics.median(samples) / 1000, samples[int(len(samples) * 0.99)] / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20000)
    rounds = parser.parse_args().rounds
    prot = protection()
    template = derive.ptoken_for(prot)
    u16 = struct.Struct("=H")
    level = u16.pack(int(Setting.LEVEL_HIGH))
    peer = template.itoken
    assert isinstance(peer, IToken)
    serialized = peer.to_bytes()
    demand = PToken()

    def naive() -> PToken:
        derive._TEMPLATES.clear()
        derive._itoken_memo.cache_clear()
        return derive.ptoken_for(prot)

    cases: list[tuple[str, Callable[[], object]]] = [
        ("ptoken_for (cached template)", lambda: derive.ptoken_for(prot)),
        ("naive: nothing cached", naive),
        ("floor: PToken.copy()", template.copy),
        ("ipsec_get_token_attr privacyProtected", lambda: capi.ipsec_get_token_attr(template, Attr.privacyProtected)),
        ("ipsec_get_token_attr iToken (serialize)", lambda: capi.ipsec_get_token_attr(template, Attr.iToken)),
        (
            "ipsec_set_token_attr privacyProtected",
            lambda: capi.ipsec_set_token_attr(demand, Attr.privacyProtected, level),
        ),
        ("IToken.from_bytes", lambda: IToken.from_bytes(serialized)),
        ("ipsec_cmp_pToken", lambda: capi.ipsec_cmp_pToken(template, template)),
    ]
    print(f"{'operation':<42} {'p50 µs':>8} {'p99 µs':>8}")
    for name, fn in cases:
        p50, p99 = timed(fn, rounds)
        print(f"{name:<42} {p50:8.2f} {p99:8.2f}")


if __name__ == "__main__":
    main()
