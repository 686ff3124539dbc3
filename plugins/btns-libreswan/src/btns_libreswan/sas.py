"""Every SA pluto holds, as :mod:`btns_vici.core.records`: four whack calls, no cache.

pluto has no event stream, so every answer is read fresh (~2 ms a whack call): whoever asks
never gets stale state. Peers' raw keys come from the ipsec.conf pluto reports (or option
``ipsec_conf``) and, for ``leftckaid=`` keys, from pluto's NSS database.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace

from btns_vici.core.records import IkeSA

from . import ipsecconf, nullpeers, whack
from .normalize import ike_sas
from .parse import parse_listpubkeys, parse_showstates, parse_status, parse_trafficstatus
from .rsakey import KeyFormatError, spki_from_pubkey

DEFAULT_NSSDIR = "/var/lib/ipsec/nss"


def _conf_keys(options: Mapping[str, str], configfile: str | None) -> dict[str, ipsecconf.ConnKeys]:
    path = options.get("ipsec_conf") or os.environ.get("BTNS_IPSEC_CONF") or configfile
    if not path or not os.path.exists(path):
        return {}
    try:
        return ipsecconf.load(path)
    except OSError:
        return {}


_ckaid_cache: dict[tuple[str, str], bytes | None] = {}


def _key_by_ckaid(options: Mapping[str, str], ckaid: str, nssdir: str) -> bytes | None:
    """A key of pluto's NSS database (``leftckaid=``) as SPKI DER; cached, a key never changes."""
    if (nssdir, ckaid) not in _ckaid_cache:
        text = whack.showhostkey_pubkey(options, ckaid, nssdir)
        try:
            _ckaid_cache[(nssdir, ckaid)] = spki_from_pubkey(text) if text else None
        except KeyFormatError:
            _ckaid_cache[(nssdir, ckaid)] = None
    return _ckaid_cache[(nssdir, ckaid)]


def _with_ckaid_keys(
    options: Mapping[str, str], keys: dict[str, ipsecconf.ConnKeys], nssdir: str
) -> dict[str, ipsecconf.ConnKeys]:
    out = {}
    for name, k in keys.items():
        if k.left_key is None and k.left_ckaid:
            k = replace(k, left_key=_key_by_ckaid(options, k.left_ckaid, nssdir))
        if k.right_key is None and k.right_ckaid:
            k = replace(k, right_key=_key_by_ckaid(options, k.right_ckaid, nssdir))
        out[name] = k
    return out


def list_sas(options: Mapping[str, str]) -> list[IkeSA]:
    """Every IKE SA pluto holds, normalized (four whack calls, no cache)."""
    status = parse_status(whack.run(options, "--status"))
    states = parse_showstates(whack.run(options, "--showstates"))
    traffic = parse_trafficstatus(whack.run(options, "--trafficstatus"))
    pubkeys = parse_listpubkeys(whack.run(options, "--listpubkeys"))
    nssdir = options.get("nssdir") or status.nssdir or DEFAULT_NSSDIR
    keys = _with_ckaid_keys(options, _conf_keys(options, status.configfile), nssdir)
    return nullpeers.annotate(options, ike_sas(status, states, traffic, keys, pubkeys))
