"""The host identity the library manages: a raw key pair made on first use (draft 2.1, BTNS).

The private key lives in ``$BTNS_KEY_DIR`` (default ``/var/lib/btns-vici``) as
``host.key`` (PKCS#8 PEM, mode 0600, directory 0700); it is created atomically
and refused if anyone but the owner can read it. The public key is exported as
an iToken, so a peer can pin it (section 2.1: "store and require the same peer
identity in subsequent communications").
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .core.constants import AuthMethod
from .core.derive import itoken_for
from .core.errors import BtnsError
from .core.records import Identity
from .core.tokens import IToken

DEFAULT_KEY_DIR = "/var/lib/btns-vici"
KEY_NAME = "host.key"


@dataclass(frozen=True)
class HostIdentity:
    path: Path
    private_pem: bytes
    public_der: bytes  # DER SubjectPublicKeyInfo

    @property
    def public_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization  # (on use: ~20 ms to import)

        key = serialization.load_der_public_key(self.public_der)
        return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def itoken(self, ike_id: str = "%any") -> IToken:
        """This host's identity as an iToken (unauthenticated raw key: BTNS)."""
        return itoken_for(Identity(ike_id, AuthMethod.BTNS, public_key=self.public_der, auth_class="public key"))


def key_dir(directory: str | os.PathLike[str] | None = None) -> Path:
    return Path(directory or os.environ.get("BTNS_KEY_DIR") or DEFAULT_KEY_DIR)


def _check_private(path: Path) -> None:
    st = path.stat()
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise BtnsError(f"{path} is accessible by group or others (mode {stat.filemode(st.st_mode)})", errno.EACCES)


def load_or_create(directory: str | os.PathLike[str] | None = None) -> HostIdentity:
    """The host key pair, made on first use; never world-readable."""
    from cryptography.hazmat.primitives import serialization  # (on use: ~20 ms to import)
    from cryptography.hazmat.primitives.asymmetric import ed25519

    d = key_dir(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_private(d)
    path = d / KEY_NAME
    if not path.exists():
        key = ed25519.Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        tmp = d / f".{KEY_NAME}.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # atomic, and loses to a concurrent creator instead of overwriting it
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    _check_private(path)
    pem = path.read_bytes()
    try:
        loaded = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise BtnsError(f"{path} is not a usable private key: {exc}", errno.EINVAL) from None
    der = loaded.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return HostIdentity(path, pem, der)
