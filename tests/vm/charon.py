"""A strongSwan charon with the kernel-netlink data plane in one network namespace (VM tier).

Each charon gets its own mount namespace with a private tmpfs on /run (the pid file is
compiled in), its own strongswan.conf and a VICI socket on tmpfs. It is stopped by pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import vici

CHARON = "/usr/lib/ipsec/charon"
PLUGINS = "random nonce aes sha1 sha2 hmac kdf pem pkcs1 pubkey x509 curve25519 kernel-netlink socket-default vici"

CONF = """\
charon {{
  load_modular = no
  load = {plugins}
  install_routes = no
  install_virtual_ip = no
  retransmit_tries = 3
  retransmit_timeout = 1.0
  # Reauthentication builds the new IKE_SA and its CHILD_SAs before deleting the old ones (the
  # key-swap latch test needs the flow's SA never to be missing in between).
  make_before_break = yes
  filelog {{
    log {{
      path = {log}
      default = 1
      ike_name = yes
    }}
  }}
  plugins {{
    vici {{
      socket = unix://{vici}
    }}
  }}
}}
"""


class Charon:
    """One running charon; ``session()`` gives a VICI session to it."""

    def __init__(self, netns: str, workdir: Path, plugins: str = PLUGINS) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.netns, self.vici_path, self.log = netns, workdir / "charon.vici", workdir / "charon.log"
        conf = workdir / "strongswan.conf"
        conf.write_text(CONF.format(plugins=plugins, log=self.log, vici=self.vici_path))
        cmd = [
            "ip",
            "netns",
            "exec",
            netns,
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            f"mount -t tmpfs btns-run /run && exec {CHARON}",
        ]
        # Every step execs, so this pid is charon's.
        self.proc = subprocess.Popen(
            cmd, env={**os.environ, "STRONGSWAN_CONF": str(conf)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self._wait_for_vici(30.0)

    def _wait_for_vici(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"charon exited ({self.proc.returncode}): {self.log_tail()}")
            with contextlib.suppress(OSError):
                self.session().version()
                return
            time.sleep(0.1)
        raise RuntimeError(f"charon's VICI did not answer within {timeout}s: {self.log_tail()}")

    def session(self) -> vici.Session:
        import socket

        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(self.vici_path))
        return vici.Session(sock)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def charon(netns: str, workdir: Path, plugins: str = PLUGINS) -> Iterator[Charon]:
    c = Charon(netns, workdir, plugins)
    try:
        yield c
    finally:
        c.stop()


def load_psk_conn(
    c: Charon,
    name: str,
    me: str,
    peer: str,
    *,
    reqid: int,
    policies: bool = True,
    start_action: str = "none",
    local_ts: str | None = None,
    remote_ts: str | None = None,
) -> None:
    """A transport-mode IKEv2 conn with PSK auth; identities are the addresses."""
    ses = c.session()
    ses.load_shared({"type": "IKE", "data": "btns-vm-test-psk", "owners": [me, peer]})
    child = {
        "mode": "transport",
        "esp_proposals": ["aes128gcm16"],
        "reqid": str(reqid),
        "local_ts": [local_ts or f"{me}/32"],
        "remote_ts": [remote_ts or f"{peer}/32"],
        "start_action": start_action,
        "policies": "yes" if policies else "no",
    }
    ses.load_conn(
        {
            name: {
                "version": "2",
                "local_addrs": [me],
                "remote_addrs": [peer],
                "proposals": ["aes128-sha256-x25519"],
                "local": {"auth": "psk", "id": me},
                "remote": {"auth": "psk", "id": peer},
                "children": {"host": child},
            }
        }
    )


def _text(v: object) -> object:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, list):
        return [_text(x) for x in v]
    return v


def child_sas(c: Charon) -> list[dict]:
    """The CHILD_SAs charon reports (list-sas), each with its IKE_SA's addresses."""
    out = []
    for ike in c.session().list_sas():
        for ike_name, sa in ike.items():
            for child in sa.get("child-sas", {}).values():
                out.append(
                    {
                        **{k: _text(v) for k, v in child.items()},
                        "ike": ike_name,
                        "local-host": sa["local-host"].decode(),
                        "remote-host": sa["remote-host"].decode(),
                        "ike-state": sa["state"].decode(),
                    }
                )
    return out
