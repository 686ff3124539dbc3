"""A reusable host testbed: two network namespaces, a veth pair and two charons.

Layout (names carry a per-run tag so parallel runs never collide)::

    netns btns-tb-<tag>-a                       netns btns-tb-<tag>-b
      btns-<tag>a 10.231.0.1/24 fd00:b75::1/64 <-veth-> btns-<tag>b 10.231.0.2/24 fd00:b75::2/64
      charon (own mount ns, private /run)         charon (own mount ns, private /run)
      VICI  <tmp>/a/charon.vici                   VICI  <tmp>/b/charon.vici

The kernel here has XFRM but no ESP, so each charon uses kernel-libipsec (ESP in
userspace over the TUN ``ipsec0``, routes in table 220) in tunnel mode with the
two peer /32 (/128) as traffic selectors; charon's own packets carry fwmark 0x42
and skip table 220. Keys are generated per run with the ``openssl`` CLI (ed25519).

Everything is torn down by :meth:`Testbed.close`: only the charons it started are
stopped (by pid), only its namespaces deleted, its temporary directory removed.
No host sysctl is changed (every sysctl written lives inside the namespaces).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import vici

from btns_vici import netns

CHARON = "/usr/lib/ipsec/charon"
NETNS_PREFIX = "btns-tb-"
LINK_PREFIX = "btns-"
PLUGINS = (
    "random nonce aes sha1 sha2 hmac chapoly gcrypt kdf pem pkcs1 pkcs8 pubkey x509 curve25519 "
    "kernel-libipsec kernel-netlink socket-default vici"
)
DEFAULT_ESP = "chacha20poly1305"
DEFAULT_IKE = "chacha20poly1305-prfsha256-x25519"

_CONF = """\
charon {{
  load_modular = no
  load = {plugins}
  block_threshold = 100000
  cookie_threshold = 100000
  init_limit_half_open = 100000
  install_virtual_ip = no
  threads = 32
  retransmit_tries = 3
  retransmit_timeout = 1.0
  syslog {{
    daemon {{
      default = -1
    }}
    auth {{
      default = -1
    }}
  }}
  filelog {{
    log {{
      path = {log}
      default = {loglevel}
      time_format = %H:%M:%S
      ike_name = yes
    }}
  }}
  plugins {{
    vici {{
      socket = unix://{vici}
    }}
    kernel-libipsec {{
      allow_peer_ts = yes
    }}
    socket-default {{
      fwmark = 0x42
    }}
    kernel-netlink {{
      fwmark = !0x42
    }}
  }}
}}
"""


class TestbedError(RuntimeError):
    """The testbed could not be built: missing root, tool or kernel feature."""


def _run(cmd: Sequence[str], *, input: bytes | None = None, check: bool = True) -> bytes:
    res = subprocess.run(list(cmd), input=input, capture_output=True, check=False)
    if check and res.returncode != 0:
        raise TestbedError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.decode(errors='replace')}")
    return res.stdout


def check_prerequisites() -> None:
    """Raise TestbedError naming what is missing (root, ip, unshare, openssl, charon)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("must run as root (network namespaces, TUN, charon)")
    for tool in ("ip", "unshare", "openssl", "swanctl"):
        if shutil.which(tool) is None:
            problems.append(f"missing tool {tool!r}")
    if not os.access(CHARON, os.X_OK):
        problems.append(f"missing {CHARON} (apt-get install strongswan-charon libcharon-extra-plugins)")
    plugin = "/usr/lib/ipsec/plugins/libstrongswan-kernel-libipsec.so"
    if not os.path.exists(plugin):
        problems.append(f"missing {plugin} (apt-get install libcharon-extra-plugins)")
    if not os.path.exists("/dev/net/tun"):
        problems.append("missing /dev/net/tun")
    if problems:
        raise TestbedError("testbed prerequisites missing: " + "; ".join(problems))


# -- keys and certificates -------------------------------------------------------------------


@dataclass(frozen=True)
class KeyPair:
    private_pem: bytes
    public_pem: bytes
    public_der: bytes  # DER SubjectPublicKeyInfo


def generate_key(workdir: Path, name: str) -> KeyPair:
    """A fresh ed25519 key pair (openssl CLI)."""
    path = workdir / f"{name}.key"
    _run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(path)])
    priv = path.read_bytes()
    pub = _run(["openssl", "pkey", "-in", str(path), "-pubout"])
    der = _run(["openssl", "pkey", "-in", str(path), "-pubout", "-outform", "DER"])
    return KeyPair(priv, pub, der)


def make_ca(workdir: Path, cn: str) -> tuple[KeyPair, bytes]:
    """A self-signed test CA: (key, certificate PEM)."""
    key = generate_key(workdir, "ca")
    out = workdir / "ca.crt"
    _run(
        [
            "openssl",
            "req",
            "-x509",
            "-new",
            "-key",
            str(workdir / "ca.key"),
            "-subj",
            f"/CN={cn}",
            "-days",
            "2",
            "-out",
            str(out),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]
    )
    return key, out.read_bytes()


def issue_cert(workdir: Path, name: str, cn: str, san: str) -> tuple[KeyPair, bytes]:
    """An end-entity certificate for ``cn`` signed by the CA in ``workdir``."""
    key = generate_key(workdir, name)
    csr = _run(["openssl", "req", "-new", "-key", str(workdir / f"{name}.key"), "-subj", f"/CN={cn}"])
    ext = workdir / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n")
    out = workdir / f"{name}.crt"
    _run(
        [
            "openssl",
            "x509",
            "-req",
            "-CA",
            str(workdir / "ca.crt"),
            "-CAkey",
            str(workdir / "ca.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            str(ext),
            "-out",
            str(out),
        ],
        input=csr,
    )
    return key, out.read_bytes()


# -- one host --------------------------------------------------------------------------------


@dataclass
class Peer:
    """One end of the testbed: a namespace, its addresses and its charon."""

    name: str  # "a" | "b"
    netns: str
    link: str
    v4: ipaddress.IPv4Address
    v6: ipaddress.IPv6Address
    v4_plain: ipaddress.IPv4Address  # a second address no connection covers
    v6_plain: ipaddress.IPv6Address
    workdir: Path
    loglevel: int = 1
    proc: subprocess.Popen[bytes] | None = None
    key: KeyPair | None = None
    cert_pem: bytes | None = None
    sessions: list[vici.Session] = field(default_factory=list)

    @property
    def vici_path(self) -> str:
        return str(self.workdir / "charon.vici")

    @property
    def log_path(self) -> Path:
        return self.workdir / "charon.log"

    @property
    def options(self) -> dict[str, str]:
        """Backend options for btns_vici: this peer's VICI socket and network namespace."""
        return {"vici_socket": self.vici_path, "netns": self.netns}

    def addr(self, family: int, plain: bool = False) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        """The host address (what the default connections cover) or the plain one."""
        if plain:
            return self.v4_plain if family == 4 else self.v6_plain
        return self.v4 if family == 4 else self.v6

    def exec(self, *cmd: str, check: bool = True) -> bytes:
        return _run(["ip", "netns", "exec", self.netns, *cmd], check=check)

    # charon ---------------------------------------------------------------------------------
    def start_charon(self, timeout: float = 10.0) -> None:
        """Start charon in this namespace and a private mount namespace; wait for VICI."""
        if self.proc is not None and self.proc.poll() is None:
            raise TestbedError(f"charon {self.name} already running")
        conf = self.workdir / "strongswan.conf"
        conf.write_text(_CONF.format(plugins=PLUGINS, log=self.log_path, vici=self.vici_path, loglevel=self.loglevel))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.vici_path)
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "STRONGSWAN_CONF": str(conf)}
        self.proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.netns,
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                f"mount -t tmpfs btns-tb /run && exec {CHARON}",
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / "charon.stderr", "ab"),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise TestbedError(f"charon {self.name} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                self.session().version()
                return
            except OSError:
                time.sleep(0.02)
        raise TestbedError(f"charon {self.name} did not answer on {self.vici_path}")

    def stop_charon(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> None:
        """Stop the charon this testbed started (by pid), then forget its sessions."""
        self.close_sessions()
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def restart_charon(self) -> None:
        self.stop_charon()
        self.start_charon()

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def ctl(self) -> vici.Session:
        """This peer's control session (reopened after a charon restart)."""
        if not self.sessions:
            self.session()
        return self.sessions[0]

    def session(self) -> vici.Session:
        """A new VICI session (closed with the peer)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.vici_path)
        except OSError:
            sock.close()
            raise
        s = vici.Session(sock)
        self.sessions.append(s)
        return s

    def close_sessions(self) -> None:
        for s in self.sessions:
            with contextlib.suppress(OSError):
                s.transport.close()
        self.sessions.clear()


# -- the pair --------------------------------------------------------------------------------


class Testbed:
    """Two namespaces joined by a veth pair, one charon in each. Use as a context manager."""

    __test__ = False  # not a pytest test class

    def __init__(self, loglevel: int = 1, keep: bool | None = None) -> None:
        check_prerequisites()
        self.tag = secrets.token_hex(3)
        self.keep = bool(os.environ.get("BTNS_TB_KEEP")) if keep is None else keep
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{NETNS_PREFIX}{self.tag}-"))
        self.a = self._peer("a", 1, loglevel)
        self.b = self._peer("b", 2, loglevel)
        self._netns_created: list[str] = []
        self.conns: dict[str, tuple[str, int, dict[str, Any]]] = {}
        self.ca_pem: bytes | None = None
        self.ca_key: KeyPair | None = None
        #: The leap-of-faith learner's UDP port the inbound filter lets in (README "Leap of faith"); None: closed.
        self.leap_port: int | None = None

    def _peer(self, name: str, host: int, loglevel: int) -> Peer:
        wd = self.workdir / name
        wd.mkdir()
        return Peer(
            name=name,
            netns=f"{NETNS_PREFIX}{self.tag}-{name}",
            link=f"{LINK_PREFIX}{self.tag}{name}",
            v4=ipaddress.IPv4Address(f"10.231.0.{host}"),
            v6=ipaddress.IPv6Address(f"fd00:b75::{host}"),
            v4_plain=ipaddress.IPv4Address(f"10.231.0.{host + 10}"),
            v6_plain=ipaddress.IPv6Address(f"fd00:b75::{host + 10}"),
            workdir=wd,
            loglevel=loglevel,
        )

    @property
    def peers(self) -> tuple[Peer, Peer]:
        return (self.a, self.b)

    # lifecycle --------------------------------------------------------------------------------
    def __enter__(self) -> Testbed:
        try:
            self.setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def setup(self) -> None:
        for p in self.peers:
            _run(["ip", "netns", "add", p.netns])
            self._netns_created.append(p.netns)
        a, b = self.a, self.b
        _run(["ip", "link", "add", a.link, "netns", a.netns, "type", "veth", "peer", "name", b.link, "netns", b.netns])
        for p in self.peers:
            p.exec("sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0")
            p.exec("ip", "link", "set", "lo", "up")
            p.exec("ip", "addr", "add", f"{p.v4}/24", "dev", p.link)
            p.exec("ip", "-6", "addr", "add", f"{p.v6}/64", "dev", p.link, "nodad")
            p.exec("ip", "addr", "add", f"{p.v4_plain}/24", "dev", p.link)
            p.exec("ip", "-6", "addr", "add", f"{p.v6_plain}/64", "dev", p.link, "nodad")
            p.exec("ip", "link", "set", p.link, "up")
        self.generate_credentials()
        for p in self.peers:
            self.inbound_filter(p, True)
            p.start_charon()
            self.load_credentials(p)

    # inbound filter (README "Inbound filter") -------------------------------------------------
    @contextlib.contextmanager
    def without_inbound_filter(self) -> Iterator[None]:
        """Both peers accept clear packets from each other's covered addresses while the block runs."""
        for p in self.peers:
            self.inbound_filter(p, False)
        try:
            yield
        finally:
            for p in self.peers:
                self.inbound_filter(p, True)

    def inbound_filter(self, p: Peer, on: bool) -> None:
        """Refuse, by routing, clear packets from the other peer's covered addresses on ``p``'s link.

        With kernel-libipsec nothing else stops a clear packet from the peer's address
        reaching a socket that is not bound to ipsec0; with these rules the kernel's
        input route lookup answers "prohibit" for TCP and UDP from them, except IKE and
        ESP-in-UDP (UDP 500/4500), which charon needs, and the leap-of-faith learner's port
        when :attr:`leap_port` is set (:meth:`allow_leap`). (A rule without ``ipproto`` would
        also refuse the route lookup ARP makes for the peer's requests.) The local table
        moves from preference 0 to 100 so that the filter comes first.
        """
        other = self.peer_of(p)
        rules = []
        ports = ["500", "4500"] + ([str(self.leap_port)] if self.leap_port else [])
        for fam, addr, mine in (("-4", other.v4, p.v4), ("-6", other.v6, p.v6)):
            sel = ("iif", p.link, "from", str(addr), "to", str(mine))
            for port in ports:
                rules.append((fam, "pref", "10", *sel, "ipproto", "17", "dport", port, "lookup", "local"))
            for proto in ("6", "17"):  # TCP, UDP only: ARP and neighbour discovery do route lookups too
                rules.append((fam, "pref", "11", *sel, "ipproto", proto, "prohibit"))
        for rule in rules:  # idempotent: never twice
            p.exec("ip", rule[0], "rule", "del", *rule[1:], check=False)
        if on:
            for fam in ("-4", "-6"):
                if b"lookup local" not in p.exec("ip", fam, "rule", "show", "pref", "100"):
                    p.exec("ip", fam, "rule", "add", "pref", "100", "lookup", "local")
                p.exec("ip", fam, "rule", "del", "pref", "0", "lookup", "local", check=False)
            for rule in rules:
                p.exec("ip", rule[0], "rule", "add", *rule[1:])

    def allow_leap(self, port: int | None = 5386) -> None:
        """Let the learner's udp/``port`` through both inbound filters (None: close it again)."""
        for p in self.peers:
            self.inbound_filter(p, False)
        self.leap_port = port
        for p in self.peers:
            self.inbound_filter(p, True)

    def close(self) -> None:
        """Stop our charons (by pid), delete our namespaces and temporary files."""
        for p in self.peers:
            with contextlib.suppress(Exception):
                p.stop_charon()
        for ns in reversed(self._netns_created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        self._netns_created.clear()
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # credentials -------------------------------------------------------------------------------
    def generate_credentials(self) -> None:
        self.ca_key, self.ca_pem = make_ca(self.workdir, f"BTNS Test CA {self.tag}")
        for p in self.peers:
            p.key, p.cert_pem = issue_cert(
                self.workdir, f"host-{p.name}", f"host-{p.name}.btns.test", f"DNS:host-{p.name}.btns.test"
            )

    def load_credentials(self, p: Peer) -> None:
        """Load this peer's private key, the CA and the PSKs into its charon."""
        assert p.key is not None and self.ca_pem is not None
        s = p.ctl
        s.load_key({"type": "ed25519", "data": p.key.private_pem})
        s.load_cert({"type": "x509", "flag": "CA", "data": self.ca_pem})
        s.load_shared({"type": "IKE", "data": f"btns-psk-{self.tag}", "owners": []})

    def peer_of(self, p: Peer) -> Peer:
        return self.b if p is self.a else self.a

    # connections -------------------------------------------------------------------------------
    def conn_config(
        self,
        p: Peer,
        name: str,
        auth: str,
        family: int = 4,
        children: Mapping[str, tuple[Sequence[str], Sequence[str]]] | None = None,
        esp: str = DEFAULT_ESP,
        ike: str = DEFAULT_IKE,
    ) -> dict[str, Any]:
        """The VICI load-conn message for ``p``'s side of connection ``name``.

        ``auth``: "rawkey" (BTNS: auth=pubkey, the peer's bare key in ``pubkeys``),
        "psk" or "x509" (certificates from the test CA). ``children`` maps a child
        name to (local_ts, remote_ts) as written from A's point of view; by default one
        child "host" protecting the two host addresses of ``family``.
        """
        q = self.peer_of(p)
        assert p.key is not None and q.key is not None and p.cert_pem and q.cert_pem and self.ca_pem
        fam = f"v{family}"
        if auth == "rawkey":
            local = {"auth": "pubkey", "id": f"{p.name}-{name}-{fam}@btns.test", "pubkeys": [p.key.public_pem]}
            remote = {"auth": "pubkey", "id": f"{q.name}-{name}-{fam}@btns.test", "pubkeys": [q.key.public_pem]}
        elif auth == "psk":
            local = {"auth": "psk", "id": f"{p.name}-{name}-{fam}@psk.btns.test"}
            remote = {"auth": "psk", "id": f"{q.name}-{name}-{fam}@psk.btns.test"}
        elif auth == "x509":
            local = {"auth": "pubkey", "certs": [p.cert_pem], "id": f"CN=host-{p.name}.btns.test"}
            remote = {"auth": "pubkey", "id": f"CN=host-{q.name}.btns.test", "cacerts": [self.ca_pem]}
        else:
            raise ValueError(f"unknown auth {auth!r}")
        if children is None:
            mine, theirs = self.a.addr(family), self.b.addr(family)
            bits = 32 if family == 4 else 128
            children = {"host": ([f"{mine}/{bits}"], [f"{theirs}/{bits}"])}
        kids = {}
        for cname, (lts, rts) in children.items():
            if p is self.b:
                lts, rts = rts, lts
            kids[cname] = {
                "local_ts": list(lts),
                "remote_ts": list(rts),
                "mode": "tunnel",
                "esp_proposals": [esp],
                "start_action": "none",
                "dpd_action": "clear",
                "rekey_time": "0",
                "life_time": "0",
            }
        return {
            name: {
                "version": "2",
                "local_addrs": [str(p.addr(family))],
                "remote_addrs": [str(q.addr(family))],
                "proposals": [ike],
                "rekey_time": "0",
                "reauth_time": "0",
                "unique": "never",
                "local-1": local,
                "remote-1": remote,
                "children": kids,
            }
        }

    def load_conn(self, name: str, auth: str, family: int = 4, **kw: Any) -> None:
        """Load connection ``name`` on both charons."""
        self.conns[name] = (auth, family, dict(kw))
        for p in self.peers:
            p.ctl.load_conn(self.conn_config(p, name, auth, family, **kw))

    def unload_conn(self, name: str) -> None:
        """Terminate ``name``'s IKE_SAs and unload it on both charons."""
        self.conns.pop(name, None)
        for p in self.peers:
            if p.proc is None:
                continue
            with contextlib.suppress(vici.exception.CommandException):
                # forced: delete locally, sending a DELETE but not waiting for the answer
                for _ in p.ctl.terminate({"ike": name, "timeout": "-1", "force": "yes"}):
                    pass
            deadline = time.monotonic() + 3
            while list(p.ctl.list_sas({"ike": name})) and time.monotonic() < deadline:
                time.sleep(0.005)
            with contextlib.suppress(vici.exception.CommandException):
                p.ctl.unload_conn({"name": name})

    def terminate(self, name: str, child: str | None = None, via: Peer | None = None, force: bool = False) -> None:
        """Terminate (blocking) the CHILD_SA ``child`` of ``name``, or the whole IKE_SA.

        ``force``: delete locally without waiting for the peer (after a peer crash).
        """
        msg = {"ike": name, "timeout": "5000"}
        if force:
            msg.update(force="yes", timeout="-1")
        if child:
            msg["child"] = child
        for _ in (via or self.a).ctl.terminate(msg):
            pass

    def rekey(self, name: str, child: str | None = None, via: Peer | None = None, settle: float = 5.0) -> None:
        """Rekey the CHILD_SA ``child`` (or the IKE_SA) of ``name`` and wait until it is done on both ends."""
        p = via or self.a
        before = {q.name: self._sa_ids(q, name, child) for q in self.peers}
        msg = {"ike": name}
        if child:
            msg["child"] = child
        p.ctl.rekey(msg)
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline:
            now = {q.name: self._sa_ids(q, name, child) for q in self.peers}
            if all(now[k] and not (now[k] & before[k]) and len(now[k]) == len(before[k]) for k in now):
                return
            time.sleep(0.01)
        raise TestbedError(f"rekey of {name}/{child} did not complete")

    @staticmethod
    def _sa_ids(p: Peer, name: str, child: str | None) -> set[str]:
        out: set[str] = set()
        for sa in p.ctl.list_sas({"ike": name}):
            sec = sa[name]
            if child is None:
                if sec.get("state") == b"ESTABLISHED":
                    out.add(sec["uniqueid"].decode())
                continue
            for c in sec.get("child-sas", {}).values():
                if c.get("name") == child.encode() and c.get("state") == b"INSTALLED":
                    out.add(c["uniqueid"].decode())
        return out

    def restart_charon(self, p: Peer, sig: int = signal.SIGTERM) -> None:
        """Restart ``p``'s charon (stopped with ``sig``) and reload credentials and connections.

        Nothing is initiated. SIGKILL simulates a crash: no DELETE reaches the peer.
        """
        p.stop_charon(sig)
        p.start_charon()
        self.load_credentials(p)
        for name, (auth, family, kw) in self.conns.items():
            p.ctl.load_conn(self.conn_config(p, name, auth, family, **kw))

    def initiate(self, name: str, child: str = "host", timeout_ms: int = 10000, via: Peer | None = None) -> None:
        """Initiate ``child`` of ``name`` from A (or ``via``) and wait until installed."""
        s = (via or self.a).ctl
        for _ in s.initiate({"ike": name, "child": child, "timeout": str(timeout_ms), "init-limits": "no"}):
            pass

    def up(self, name: str, auth: str, family: int = 4, **kw: Any) -> None:
        self.load_conn(name, auth, family, **kw)
        self.initiate(name)

    @contextlib.contextmanager
    def in_netns(self, p: Peer) -> Iterator[None]:
        """Run the calling thread inside ``p``'s network namespace (sockets created keep it)."""
        with netns.entered(p.netns):
            yield


def connected_pair(
    tb: Testbed, proto: int, family: int, port: int = 0, plain: bool = False
) -> tuple[socket.socket, socket.socket]:
    """A connected TCP or UDP socket pair: (client in A, server-side socket in B), data exchanged.

    ``plain``: between the peers' plain addresses, which no connection covers. (With
    kernel-libipsec every packet to a host address some CHILD_SA covers is routed into
    ipsec0, where libipsec drops what no SA covers: uncovered traffic needs other addresses.)
    """
    fam = socket.AF_INET if family == 4 else socket.AF_INET6
    kind = socket.SOCK_STREAM if proto == socket.IPPROTO_TCP else socket.SOCK_DGRAM
    with tb.in_netns(tb.b):
        srv = socket.socket(fam, kind)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((str(tb.b.addr(family, plain)), port))
    with tb.in_netns(tb.a):
        cli = socket.socket(fam, kind)
    cli.bind((str(tb.a.addr(family, plain)), 0))
    cli.settimeout(10)
    srv.settimeout(10)
    if kind == socket.SOCK_STREAM:
        srv.listen(1)
        cli.connect(srv.getsockname()[:2])
        conn, _ = srv.accept()
        srv.close()
        conn.settimeout(10)
        cli.sendall(b"ping")
        if conn.recv(4) != b"ping":
            raise TestbedError("TCP data did not arrive")
        return cli, conn
    cli.connect(srv.getsockname()[:2])
    cli.send(b"ping")
    data, addr = srv.recvfrom(16)
    if data != b"ping":
        raise TestbedError("UDP data did not arrive")
    srv.connect(addr[:2])
    return cli, srv
