"""ipsec_set_socket_pToken for libreswan: pluto conns built from a pToken, XFRM guards on sockets.

What the library builds itself (host-to-host, IKEv2, one conn per distinct demand):

* a pinned RSA key in the demanded iToken (``pubKeyID``, leap of faith or BTNS raw key):
  ``authby=rsasig`` with ``rightrsasigkey`` converted from the SPKI, our key by ``leftckaid``
  (``options["ckaid"]``/``$BTNS_PLUTO_CKAID``, else the first RSA key in pluto's NSS db);
* otherwise, when BTNS is allowed: RFC 7619 NULL authentication (``authby=null``,
  ``%null`` ids) -- real BTNS, which strongSwan lacks;
* PSK and X.509 need a conn the operator configured: EOPNOTSUPP here.

Conns are written to ``<pluto rundir>/btns-conns/<name>.conf`` and loaded with
``addconn``. The socket guard is the core's per-socket XFRM policy requiring ESP in
transport mode with a reqid: the kernel matches a template's reqid exactly, so every conn
built for one demand gets the same fixed ``reqid=`` (below pluto's automatic range, which
starts at 16384), known before the peer is, when set_socket_pToken arms the guard.
Tunnel mode cannot be guarded that way: it is EOPNOTSUPP here.
"""

from __future__ import annotations

import base64
import errno
import ipaddress
import os
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from btns_vici import backendkit as kit
from btns_vici import guard
from btns_vici.backend import Enforcement
from btns_vici.core.constants import Attr, AuthMethod, Setting
from btns_vici.core.errors import BtnsError, NotSupportedError
from btns_vici.core.records import XFRM
from btns_vici.core.requirements import allowed_methods, demanded
from btns_vici.core.selectors import Flow
from btns_vici.core.tokens import PToken

from . import whack
from .parse import parse_status
from .rsakey import KeyFormatError, numbers_from_spki, rfc3110_from_numbers
from .sas import DEFAULT_NSSDIR, list_sas

#: ESP proposals (libreswan syntax), preferred first, with their (privacy, integrity) levels.
CANDIDATES: tuple[kit.Proposal, ...] = (
    ("aes_gcm256", Setting.LEVEL_HIGH, Setting.LEVEL_HIGH),
    ("chacha20_poly1305", Setting.LEVEL_HIGH, Setting.LEVEL_HIGH),
    ("aes256-sha2_512", Setting.LEVEL_HIGH, Setting.LEVEL_HIGH),
    ("aes256-sha2_256", Setting.LEVEL_HIGH, Setting.LEVEL_MEDIUM),
    ("aes_gcm128", Setting.LEVEL_MEDIUM, Setting.LEVEL_HIGH),
    ("aes128-sha2_256", Setting.LEVEL_MEDIUM, Setting.LEVEL_MEDIUM),
    ("aes128-sha1", Setting.LEVEL_MEDIUM, Setting.LEVEL_LOW),
)


def esp_proposals(demand: PToken) -> list[str]:
    """libreswan ``esp=`` proposals meeting the demanded levels (EOPNOTSUPP if none)."""
    return kit.esp_proposals(demand, CANDIDATES)


def mode(demand: PToken) -> str:
    """``transport``; tunnel mode and IP-options protection cannot be guarded per socket (EOPNOTSUPP)."""
    tunnel, ipopts = demanded(demand, Attr.tunnelMode), demanded(demand, Attr.ipoptionsProtected)
    if Setting.ENABLE in (tunnel, ipopts):
        raise NotSupportedError("the libreswan backend builds transport-mode ESP only (per-socket guard)")
    return "transport"


def demand_reqid(demand: PToken) -> int:
    """The fixed reqid (1..16000) of every conn built for this demand (the guard's template reqid)."""
    method, key = auth(demand)
    return kit.demand_number(16000, method, mode(demand), *esp_proposals(demand), key or b"")


def auth(demand: PToken) -> tuple[str, bytes | None]:
    """(``null`` | ``rsasig``, pinned SPKI or None) for the demand, or EOPNOTSUPP."""
    methods = allowed_methods(demand)
    tok = demand.itoken
    if tok is not None and (tok.certificate_dn or tok.certificate_authority_dn):
        raise NotSupportedError("a certificate identity needs a conn the operator configured (X.509)")
    pinned = tok.pub_key_id if tok is not None else None
    if pinned is not None:
        if not methods & kit.RAW_KEY_METHODS:
            raise NotSupportedError("a pinned key needs BTNS or LEAPOFFAITH to be allowed")
        try:
            numbers_from_spki(pinned)
        except KeyFormatError:
            raise NotSupportedError("libreswan raw keys are RSA only; the pinned key is not RSA") from None
        return "rsasig", pinned
    if AuthMethod.BTNS in methods:
        return "null", None
    names = ", ".join(sorted(m.name for m in methods)) or "none"
    raise NotSupportedError(f"the library builds NULL-auth or pinned-key conns only; allowed: {names}")


def check_supported(demand: PToken) -> None:
    """Raise EOPNOTSUPP for any requirement the libreswan backend cannot build."""
    esp_proposals(demand)
    mode(demand)
    auth(demand)


def conn_name(role: str, local: str, remote: str, demand: PToken) -> str:
    """A stable name per (role, endpoints, demand): the same demand reuses its conn."""
    method, key = auth(demand)
    return kit.demand_name(role, local, remote, method, mode(demand), *esp_proposals(demand), key or b"")


def conn_text(
    name: str, local: str, remote: str | None, demand: PToken, ckaid: str | None, ike: str | None = None
) -> str:
    """The ipsec.conf section of one conn: initiator when ``remote`` is given, else responder.

    ``ike``: an ``ike=`` proposal (``options["ike"]``), else pluto's defaults.
    """
    method, key = auth(demand)
    lines = [
        f"conn {name}",
        f"\tleft={local}",
        f"\tright={remote or '%any'}",
        "\tikev2=insist",
        f"\ttype={mode(demand)}",
        f"\tesp={','.join(esp_proposals(demand))}",
        "\tkeyingtries=1",
        f"\treqid={demand_reqid(demand)}",
        "\tauto=add",
    ]
    if demanded(demand, Attr.compressionAvailable) == Setting.ENABLE:
        lines.append("\tcompress=yes")
    if ike:
        lines.append(f"\tike={ike}")
    if method == "null":
        lines += ["\tauthby=null", "\tleftid=%null", "\trightid=%null"]
    else:
        assert key is not None
        rsasigkey = "0s" + base64.b64encode(rfc3110_from_numbers(*numbers_from_spki(key))).decode()
        lines += ["\tauthby=rsasig", f"\tleftckaid={ckaid}", f"\trightrsasigkey={rsasigkey}"]
    return "\n".join(lines) + "\n"


# -- talking to pluto ------------------------------------------------------------------------


def _tool(options: Mapping[str, str], name: str) -> tuple[list[str], dict[str, str]]:
    argv, _, env = whack.resolve(options)
    if argv[-1] == "whack":  # "ipsec whack"
        return [*argv[:-1], name], env
    return [str(Path(argv[0]).with_name(name))], env


def host_ckaid(options: Mapping[str, str], nssdir: str) -> str:
    """Our RSA key in pluto's NSS db: options/env, else the first ``showhostkey --list`` entry."""
    explicit = options.get("ckaid") or os.environ.get("BTNS_PLUTO_CKAID")
    if explicit:
        return explicit
    argv, env = _tool(options, "showhostkey")
    out = subprocess.run(
        [*argv, "--nssdir", nssdir, "--list"], capture_output=True, text=True, env=env, timeout=10, check=False
    )
    m = re.search(r"RSA keyid: \S+ ckaid: ([0-9a-f]{40})", out.stdout + out.stderr)
    if not m:
        raise BtnsError(f"pluto has no RSA host key in {nssdir} (ipsec newhostkey)", errno.ENOKEY)
    return m.group(1)


def load_conn(options: Mapping[str, str], name: str, text: str) -> None:
    """Write ``text`` to the pluto rundir's btns-conns/ and ``addconn`` it."""
    _, ctl, _ = whack.resolve(options)
    directory = Path(options.get("conf_dir") or Path(ctl).parent / "btns-conns")
    directory.mkdir(mode=0o700, exist_ok=True)
    path = directory / f"{name}.conf"
    path.write_text(text)
    argv, env = _tool(options, "addconn")
    out = subprocess.run(
        [*argv, "--ctlsocket", ctl, "--config", str(path), name],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    if out.returncode != 0:
        raise BtnsError(f"addconn {name} failed: {(out.stderr + out.stdout).strip()[-300:]}", errno.EINVAL)


def _nssdir(options: Mapping[str, str]) -> str:
    return options.get("nssdir") or parse_status(whack.run(options, "--status")).nssdir or DEFAULT_NSSDIR


def establish(options: Mapping[str, str], flow: Flow, demand: PToken) -> str:
    """Load and initiate a conn to ``flow.remote_addr`` meeting ``demand``; its name once the CHILD SA is up."""
    check_supported(demand)
    local, remote = str(flow.local_addr), str(flow.remote_addr)
    name = conn_name("init", local, remote, demand)
    ckaid = host_ckaid(options, _nssdir(options)) if auth(demand)[0] == "rsasig" else None
    load_conn(options, name, conn_text(name, local, remote, demand, ckaid, options.get("ike")))
    timeout = float(options.get("timeout", "30"))
    try:
        log = whack.run(options, "--initiate", "--name", name, timeout=timeout)
    except BtnsError as exc:
        raise BtnsError(f"no SA with {remote}: {exc.strerror}", errno.EHOSTUNREACH) from None
    probe = Flow(flow.proto, flow.local_addr, flow.local_port or 1, flow.remote_addr, flow.remote_port or 1)
    for sa in list_sas(options):
        if sa.name == name and sa.child_for(probe) is not None:
            return name
    tail = " | ".join(line.strip() for line in log.splitlines()[-3:])
    raise BtnsError(f"no CHILD SA meeting the pToken with {remote}: {tail}", errno.EHOSTUNREACH)


def serve(options: Mapping[str, str], local_addr: Any, demand: PToken) -> str:
    """Load a responder conn on ``local_addr`` for any peer meeting ``demand``; its name."""
    check_supported(demand)
    local = str(ipaddress.ip_address(local_addr if not isinstance(local_addr, tuple) else local_addr[0]))
    name = conn_name("resp", local, "%any", demand)
    ckaid = host_ckaid(options, _nssdir(options)) if auth(demand)[0] == "rsasig" else None
    load_conn(options, name, conn_text(name, local, None, demand, ckaid, options.get("ike")))
    return name


def enforce(sock: Any, demand: PToken) -> Enforcement:
    """Check the demand can be built, then arm the per-socket XFRM guard (ESP required both ways)."""
    check_supported(demand)
    reqid = demand_reqid(demand)
    how = guard.apply(sock, XFRM, reqid=reqid)
    return Enforcement(
        connection="(established on connect/listen)",
        dataplane_guard=f"{how}, reqid {reqid}",
        details={"reqid": str(reqid)},
    )
