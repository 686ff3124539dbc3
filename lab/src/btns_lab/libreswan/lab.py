"""A ready lab: two plutos with one conn per authentication method, IKE SAs up.

Used by the integration tests and by ``scripts/capture-whack-output.py``. Conns
(``auto=add`` on both sides, initiated by ``a``):

* ``nullc`` on address pair 0: ``authby=null``, ids ``%null`` (RFC 7619);
* ``pskc`` on pair 1: ``authby=secret``, ids ``@psk-a``/``@psk-b``;
* ``rsac`` on pair 2: ``authby=rsasig`` with raw keys (``rightrsasigkey=0s...``);
* ``anyc`` on pair 3 (``b`` only as a ``right=%any`` template; ``a`` initiates): NULL auth
  responder instances, printed by pluto as ``"anyc"[1] ...10.231.3.1``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .runner import Pluto, PlutoPair, RsaKey, wait_for

PSK = "btns-lsw-test-secret-0123456789"
CONNS = ("nullc", "pskc", "rsac", "anyc")


@dataclass
class Lab:
    """The pair, the two raw keys, and where each conn lives."""

    pair: PlutoPair
    key_a: RsaKey
    key_b: RsaKey

    @property
    def a(self) -> Pluto:
        assert self.pair.a is not None
        return self.pair.a

    @property
    def b(self) -> Pluto:
        assert self.pair.b is not None
        return self.pair.b


def conns_text(side: str, key_me: RsaKey, key_peer: RsaKey, defaults: str = "") -> str:
    """ipsec.conf conns of one side (``a`` or ``b``); left is always this side.

    ``defaults``: more ``conn %default`` lines (tab-indented), e.g. faster crypto for qemu TCG.
    """
    peer = "b" if side == "a" else "a"
    me_i, peer_i = (1, 2) if side == "a" else (2, 1)
    any_right = "%any" if side == "b" else f"10.231.3.{peer_i}"
    return f"""
conn %default
\tikev2=insist
\tauto=add
\tkeyingtries=1
{defaults}

conn nullc
\tleft=10.231.0.{me_i}
\tright=10.231.0.{peer_i}
\tauthby=null
\tleftid=%null
\trightid=%null

conn pskc
\tleft=10.231.1.{me_i}
\tright=10.231.1.{peer_i}
\tauthby=secret
\tleftid=@psk-{side}
\trightid=@psk-{peer}

conn rsac
\tleft=10.231.2.{me_i}
\tright=10.231.2.{peer_i}
\tauthby=rsasig
\tleftid=@rsa-{side}
\trightid=@rsa-{peer}
\tleftrsasigkey={key_me.rsasigkey}
\trightrsasigkey={key_peer.rsasigkey}

conn anyc
\tleft=10.231.3.{me_i}
\tright={any_right}
\tauthby=null
\tleftid=%null
\trightid=%null
"""


ExtraConns = Callable[[str, RsaKey, RsaKey], str]


def build(
    tag: str,
    workdir: Path,
    extra_conns: ExtraConns | None = None,
    pairs: int = 4,
    defaults: str = "",
    bits: int | None = None,
) -> Lab:
    """Set up the pair, keys and configs, start both plutos (IKE SAs not yet initiated).

    ``extra_conns(side, key_me, key_peer)`` returns more conns for that side's ipsec.conf
    (address pairs 4 .. ``pairs``-1 are free for them).
    """
    pair = PlutoPair(tag, workdir, pairs=max(pairs, 4))
    a, b = pair.setup()
    try:
        ka, kb = a.new_rsa_key(bits), b.new_rsa_key(bits)
        for p, me, peer, side, other in ((a, ka, kb, "a", "b"), (b, kb, ka, "b", "a")):
            secrets = f'@psk-{side} @psk-{other} : PSK "{PSK}"\n'
            extra = extra_conns(side, me, peer) if extra_conns else ""
            p.write_config(conns_text(side, me, peer, defaults) + extra, secrets)
            p.start()
    except BaseException:
        pair.teardown()
        raise
    return Lab(pair, ka, kb)


def established(p: Pluto, conn: str) -> bool:
    """True when pluto ``p`` shows an established IKE SA of ``conn`` (any instance)."""
    _, out = p.whack("--showstates", check=False)
    return any(f'"{conn}"' in line and "ESTABLISHED_IKE_SA" in line for line in out.splitlines()) or any(
        line.split('"')[1:2] == [conn] and ("MAIN_I4" in line or "MAIN_R3" in line) for line in out.splitlines()
    )


def bring_up(lab: Lab, conns: tuple[str, ...] = CONNS, timeout: float = 15.0) -> list[str]:
    """Initiate ``conns`` from ``a``; the names that reached ESTABLISHED_IKE_SA on both sides."""
    for conn in conns:
        lab.a.whack("--initiate", "--name", conn, "--asynchronous")
    up = []
    for conn in conns:
        if wait_for(lambda c=conn: established(lab.a, c) and established(lab.b, c), timeout):
            up.append(conn)
    return up
