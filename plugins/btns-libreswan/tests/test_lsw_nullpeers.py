"""NULL-authenticated peers in the known-peers store, against two real plutos (issue 17, item 3).

RFC 7619 NULL auth gives no key: each NULL IKE SA gets a per-address record (claimed identity,
sessions seen), and the SA says whether it is the session seen before, a new session (maybe
another peer), or another claimed identity. IKE level only (no ESP in this kernel).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from btns_lab.libreswan.lab import Lab, established
from btns_lab.libreswan.runner import wait_for
from btns_libreswan import nullpeers
from btns_libreswan.enforce import load_conn
from btns_vici import knownpeers, plugins
from btns_vici.core.records import IkeSA
from btns_vici.knownpeers import KnownPeers

pytestmark = pytest.mark.libreswan


def sas_of(ctl: Path, key_dir: Path) -> dict[str, IkeSA]:
    b = plugins.get_backend("libreswan", {"pluto_ctl": str(ctl), "key_dir": str(key_dir)})
    return {sa.name: sa for sa in b.list_sas()}


def test_null_sa_first_contact_then_same_session_then_new_session(lab: Lab, tmp_path: Path) -> None:
    sas = sas_of(lab.a.ctl, tmp_path)
    null, anyc = sas["nullc"], sas["anyc"]
    assert null.extra["null_peer"] == knownpeers.FIRST_CONTACT == anyc.extra["null_peer"]
    assert "null_peer" not in sas["rsac"].extra and "null_peer" not in sas["pskc"].extra  # keyed / PSK
    assert null.extra["null_session"].endswith(f"#{null.uniqueid}")
    assert "peer_record" in null.extra and "ID_NULL" in null.extra["peer_record"]
    store = KnownPeers(tmp_path)
    rec = store.get_null("10.231.0.2")
    assert rec is not None and (rec.ike_id, rec.sessions, rec.how) == ("ID_NULL", 1, "null-auth")
    assert store.get("10.231.0.2") is None, "NULL auth: no key entry, nothing to pin"
    # The same IKE SA again: the same session peer.
    assert sas_of(lab.a.ctl, tmp_path)["nullc"].extra["null_peer"] == knownpeers.SAME_SESSION
    # A new IKE SA from the same address claiming the same ID_NULL: NOT provably the same peer.
    lab.a.whack("--terminate", "--name", "nullc")
    assert wait_for(lambda: not established(lab.a, "nullc"), 10)
    lab.a.whack("--initiate", "--name", "nullc", "--asynchronous")
    assert wait_for(lambda: established(lab.a, "nullc") and established(lab.b, "nullc"), 15)
    again = sas_of(lab.a.ctl, tmp_path)["nullc"]
    assert again.uniqueid != null.uniqueid
    assert again.extra["null_peer"] == knownpeers.NEW_SESSION, again.extra
    rec = KnownPeers(tmp_path).get_null("10.231.0.2")
    assert rec.sessions == 2 and rec.first_seen <= rec.last_seen and rec.session == again.extra["null_session"]
    # The responder's side keeps its own record of the initiator.
    b_side = sas_of(lab.b.ctl, tmp_path / "b")["nullc"]
    assert b_side.extra["null_peer"] == knownpeers.FIRST_CONTACT
    assert KnownPeers(tmp_path / "b").get_null("10.231.0.1").ike_id == "ID_NULL"


def _claimer(name: str, claim: str) -> str:
    """B's conn on address pair 4: NULL auth, claiming ``claim`` as its identity."""
    return (
        f"conn {name}\n\tleft=10.231.4.2\n\tright=10.231.4.1\n\tikev2=insist\n\tauthby=null\n"
        f"\tleftid={claim}\n\trightid=%null\n\tkeyingtries=1\n\tauto=add\n"
    )


def _nullid_sa(lab: Lab, key_dir: Path) -> IkeSA:
    return next(sa for n, sa in sas_of(lab.a.ctl, key_dir).items() if n.startswith("btns-nullid"))


def _nullid(rightid: str) -> str:
    """A's conn on address pair 4: NULL auth from 10.231.4.2, whose identity pluto reports as configured."""
    return (
        "conn btns-nullid\n\tleft=10.231.4.1\n\tright=10.231.4.2\n\tikev2=insist\n\tauthby=null\n"
        f"\tleftid=%null\n\trightid={rightid}\n\tkeyingtries=1\n\tauto=add\n"
    )


def test_another_reported_identity_is_reported_and_logged(
    lab: Lab, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The SAs from 10.231.4.2 are first reported as ID_NULL, later by another identity: OTHER_IDENTITY.

    What pluto reports for a NULL peer is not what the peer sent (measured, 4.10): it is the
    identity of the conn the peer landed in (a NULL peer is not held to ``rightid=``: one claiming
    @claims-one was accepted under a conn naming @claims-two and reported as @claims-two), or, with
    ``rightid=%any``, the peer's address (ID_IPV4_ADDR), whatever it claimed. So the record holds the
    identity pluto reported; here the second SA lands in a conn that reports the address.
    """
    a_opts, b_opts = {"pluto_ctl": str(lab.a.ctl)}, {"pluto_ctl": str(lab.b.ctl)}
    load_conn(a_opts, "btns-nullid", _nullid("%null"))
    load_conn(b_opts, "btns-claim1", _claimer("btns-claim1", "%null"))
    load_conn(b_opts, "btns-claim2", _claimer("btns-claim2", "@claims-two"))
    try:
        lab.b.whack("--initiate", "--name", "btns-claim1", "--asynchronous")
        assert wait_for(lambda: established(lab.a, "btns-nullid"), 15), lab.a.tail()
        first = _nullid_sa(lab, tmp_path)
        assert first.remote.ike_id == "ID_NULL" and first.extra["null_peer"] == knownpeers.FIRST_CONTACT
        lab.b.whack("--delete", "--name", "btns-claim1")
        lab.a.whack("--delete", "--name", "btns-nullid")
        load_conn(a_opts, "btns-nullid", _nullid("%any"))
        caplog.set_level(logging.WARNING, logger="btns_vici.knownpeers")
        lab.b.whack("--initiate", "--name", "btns-claim2", "--asynchronous")
        assert wait_for(lambda: established(lab.a, "btns-nullid"), 15), lab.a.tail()
        second = _nullid_sa(lab, tmp_path)
        assert second.remote.ike_id == "10.231.4.2", "pluto reports the address, not the claimed @claims-two"
        assert second.extra["null_peer"] == knownpeers.OTHER_IDENTITY, second.extra
        assert "now claims IKE identity '10.231.4.2'" in caplog.text
        rec = KnownPeers(tmp_path).get_null("10.231.4.2")
        assert rec.ike_id == "ID_NULL" and [c.ike_id for c in rec.other_ids] == ["10.231.4.2"]
        assert rec.sessions == 2
    finally:
        for n in (1, 2):
            lab.b.whack("--delete", "--name", f"btns-claim{n}", check=False)
        lab.a.whack("--delete", "--name", "btns-nullid", check=False)


def test_unwritable_store_leaves_answers_alone(lab: Lab, tmp_path: Path) -> None:
    """A store that cannot be written (here: a file where the directory should be) never fails a query."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    sas = sas_of(lab.a.ctl, blocker)
    assert sas["nullc"].is_established and "null_peer" not in sas["nullc"].extra


def test_off_switch(lab: Lab, tmp_path: Path) -> None:
    b = plugins.get_backend("libreswan", {"pluto_ctl": str(lab.a.ctl), "key_dir": str(tmp_path), "known_peers": "no"})
    assert all("null_peer" not in sa.extra for sa in b.list_sas())
    assert not (tmp_path / knownpeers.FILE_NAME).exists()
    assert nullpeers.instance(str(lab.a.ctl)) == nullpeers.instance(str(lab.a.ctl)) != "pluto"
