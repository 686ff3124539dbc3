"""pluto (libreswan 4.10) <-> charon (strongSwan 5.9) at IKE level: raw RSA keys and PSK.

pluto runs in btns-lsw-<tag>a, charon (btns_lab.testbed.Peer) in btns-lsw-<tag>b. charon
initiates: pluto, as responder, fails to install the CHILD SA (no ESP in this kernel) and
answers IKE_AUTH without it, so the IKE SA stays up (as initiator pluto would delete it).
Both backends then describe the same IKE SA from both ends: the libreswan backend must
report charon's key as pluto's peer key, and the two channel bindings must agree.
"""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import vici
import vici.exception

from btns_lab.libreswan.lab import established
from btns_lab.libreswan.runner import Pluto, PlutoPair, RsaKey, missing_prerequisites, wait_for
from btns_lab.testbed import Peer
from btns_libreswan.rsakey import numbers_from_spki, rfc3110_from_numbers
from btns_vici import plugins
from btns_vici.core.constants import AuthMethod
from btns_vici.core.derive import channel_binding

pytestmark = [pytest.mark.libreswan, pytest.mark.testbed]

PSK = "btns-lsw-interop-psk-0123456789"
IKE_PLUTO = "chacha20_poly1305-sha2_256-dh31"  # the testbed charon's crypto plugins (chapoly, x25519)
IKE_CHARON = "chacha20poly1305-prfsha256-x25519"


def pem(der: bytes, label: str) -> str:
    body = base64.encodebytes(der).decode().replace("\n", "")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return f"-----BEGIN {label}-----\n" + "\n".join(lines) + f"\n-----END {label}-----\n"


@dataclass
class Interop:
    pluto: Pluto
    charon: Peer
    pluto_key: RsaKey
    charon_spki: bytes


def pluto_conns(charon_spki: bytes) -> str:
    rsasigkey = "0s" + base64.b64encode(rfc3110_from_numbers(*numbers_from_spki(charon_spki))).decode()
    return f"""
conn %default
\tikev2=insist
\tauto=add
\tkeyingtries=1
\tike={IKE_PLUTO}
\tesp=chacha20_poly1305

conn rsa-charon
\tleft=10.231.0.1
\tright=10.231.0.2
\tauthby=rsasig
\tleftid=@pluto.btns.test
\trightid=@charon.btns.test
\tleftckaid=%s
\trightrsasigkey={rsasigkey}

conn psk-charon
\tleft=10.231.1.1
\tright=10.231.1.2
\tauthby=secret
\tleftid=@pluto-psk.btns.test
\trightid=@charon-psk.btns.test
"""


def charon_conns(pluto_pem: str, charon_pem: str) -> dict[str, dict[str, object]]:
    def conn(local: str, remote: str, l1: dict[str, object], r1: dict[str, object]) -> dict[str, object]:
        return {
            "version": "2",
            "local_addrs": [local],
            "remote_addrs": [remote],
            "proposals": [IKE_CHARON],
            "local-1": l1,
            "remote-1": r1,
            "unique": "never",
            "children": {
                "host": {
                    "local_ts": [f"{local}/32"],
                    "remote_ts": [f"{remote}/32"],
                    "mode": "tunnel",
                    "esp_proposals": ["chacha20poly1305"],
                    "start_action": "none",
                }
            },
        }

    return {
        "rsa-charon": conn(
            "10.231.0.2",
            "10.231.0.1",
            {"auth": "pubkey", "id": "charon.btns.test", "pubkeys": [charon_pem]},
            {"auth": "pubkey", "id": "pluto.btns.test", "pubkeys": [pluto_pem]},
        ),
        "psk-charon": conn(
            "10.231.1.2",
            "10.231.1.1",
            {"auth": "psk", "id": "charon-psk.btns.test"},
            {"auth": "psk", "id": "pluto-psk.btns.test"},
        ),
    }


def charon_peer(netns: str, link: str, workdir: Path) -> Peer:
    """A testbed Peer for our namespace; address fields (v4, v6, v4_plain, ...) get pair-0 addresses.

    Only ``start_charon``/``stop_charon``/``ctl`` are used, which need netns and workdir.
    """
    values: dict[str, object] = {"name": "b", "netns": netns, "link": link, "workdir": workdir}
    for f in dataclasses.fields(Peer):
        if f.name.startswith("v4"):
            values[f.name] = ipaddress.IPv4Address("10.231.0.2")
        elif f.name.startswith("v6"):
            values[f.name] = ipaddress.IPv6Address("fd00:b75::2")
    return Peer(**values)  # type: ignore[arg-type]


def initiate(charon: Peer, name: str) -> None:
    """charon initiates ``name``; the CHILD SA is refused by pluto, which is expected here."""
    try:
        for _ in charon.session().initiate({"ike": name, "child": "host", "timeout": "10000"}):
            pass
    except vici.exception.CommandException:
        pass  # "CHILD_SA failed": the IKE SA is established all the same


@pytest.fixture(scope="module")
def interop() -> Iterator[Interop]:
    problems = missing_prerequisites()
    problems += [f"missing tool {t!r}" for t in ("openssl", "swanctl") if shutil.which(t) is None]
    if problems:
        pytest.fail("interop prerequisites missing: " + "; ".join(problems), pytrace=False)
    work = Path(tempfile.mkdtemp(prefix="btns-lsw-interop-"))
    pair = PlutoPair(secrets.token_hex(2), work, pairs=2)
    try:
        pluto, _ = pair.setup()
        ns_b = pair.namespaces[1]
        charon = charon_peer(ns_b, f"btns-lsw-{pair.tag}b", work / "charon")
        charon.workdir.mkdir()
        key_pem = subprocess.run(
            ["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:3072"],
            capture_output=True,
            check=True,
        ).stdout
        spki = subprocess.run(
            ["openssl", "pkey", "-pubout", "-outform", "DER"], input=key_pem, capture_output=True, check=True
        ).stdout
        pkey = pluto.new_rsa_key()
        conns = pluto_conns(spki).replace("%s", pkey.ckaid, 1)
        pluto.write_config(conns, f'@pluto-psk.btns.test @charon-psk.btns.test : PSK "{PSK}"\n')
        pluto.start()
        charon.start_charon()
        charon.ctl.load_key({"type": "rsa", "data": key_pem.decode()})
        charon.ctl.load_shared({"type": "IKE", "data": PSK, "owners": ["pluto-psk.btns.test", "charon-psk.btns.test"]})
        pluto_pem = pem(base64.b64decode(pkey.pubkey), "PUBLIC KEY")
        for name, body in charon_conns(pluto_pem, pem(spki, "PUBLIC KEY")).items():
            charon.ctl.load_conn({name: body})
        for name in ("rsa-charon", "psk-charon"):
            initiate(charon, name)
        for name in ("rsa-charon", "psk-charon"):
            if not wait_for(lambda n=name: established(pluto, n), 15):
                pytest.fail(
                    f"{name}: no IKE SA with charon\n{pluto.tail()}\n"
                    f"{charon.log_path.read_text()[-3000:] if charon.log_path.exists() else ''}",
                    pytrace=False,
                )
        yield Interop(pluto, charon, pkey, spki)
    finally:
        if "charon" in locals():
            charon.stop_charon()
        pair.teardown()
        shutil.rmtree(work, ignore_errors=True)


def test_pluto_sees_charons_raw_key(interop: Interop) -> None:
    sas = {sa.name: sa for sa in plugins.get_backend("libreswan", {"pluto_ctl": str(interop.pluto.ctl)}).list_sas()}
    rsa = sas["rsa-charon"]
    assert rsa.is_established and rsa.remote.ike_id == "@charon.btns.test"
    assert rsa.remote.auth_method is AuthMethod.BTNS
    assert rsa.remote.public_key == interop.charon_spki
    assert rsa.local.public_key == base64.b64decode(interop.pluto_key.pubkey)
    assert rsa.encr_alg == "CHACHA20_POLY1305" and rsa.dh_group == "DH31"
    psk = sas["psk-charon"]
    assert psk.remote.auth_method is AuthMethod.PRESHAREDKEY and psk.remote.ike_id == "@charon-psk.btns.test"


def test_both_backends_agree_on_the_keys(interop: Interop) -> None:
    lsw = {sa.name: sa for sa in plugins.get_backend("libreswan", {"pluto_ctl": str(interop.pluto.ctl)}).list_sas()}
    ssw = {sa.name: sa for sa in plugins.get_backend("strongswan", interop.charon.options).list_sas()}
    assert ssw["rsa-charon"].is_established
    assert ssw["rsa-charon"].remote.public_key == lsw["rsa-charon"].local.public_key
    assert channel_binding(ssw["rsa-charon"].remote) == channel_binding(lsw["rsa-charon"].local) is not None
    assert channel_binding(ssw["rsa-charon"].local) == channel_binding(lsw["rsa-charon"].remote) is not None
    assert ssw["psk-charon"].remote.auth_method is lsw["psk-charon"].local.auth_method is AuthMethod.PRESHAREDKEY
