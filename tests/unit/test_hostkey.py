"""The library-managed host identity: made on first use, private, exportable as an iToken."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from btns_vici import AuthMethod, IToken
from btns_vici.hostkey import load_or_create


def test_created_once_private_and_stable(tmp_path) -> None:
    d = tmp_path / "keys"
    first = load_or_create(d)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(first.path).st_mode) == 0o600
    again = load_or_create(d)
    assert again.public_der == first.public_der and again.private_pem == first.private_pem
    assert first.public_der.startswith(b"0*0\x05\x06\x03+ep")  # ed25519 SPKI
    assert b"BEGIN PUBLIC KEY" in first.public_pem


def test_env_var_selects_location(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("BTNS_KEY_DIR", str(tmp_path / "env"))
    assert load_or_create().path == tmp_path / "env" / "host.key"


def test_readable_key_is_refused(tmp_path) -> None:
    ident = load_or_create(tmp_path / "k")
    os.chmod(ident.path, 0o644)
    with pytest.raises(OSError) as e:
        load_or_create(tmp_path / "k")
    assert e.value.errno == errno.EACCES


def test_garbage_key_is_einval(tmp_path) -> None:
    d = tmp_path / "g"
    d.mkdir(mode=0o700)
    fd = os.open(d / "host.key", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"not a key")
    os.close(fd)
    with pytest.raises(OSError) as e:
        load_or_create(d)
    assert e.value.errno == errno.EINVAL


def test_exported_as_itoken(tmp_path) -> None:
    ident = load_or_create(tmp_path / "i")
    tok = ident.itoken()
    assert tok.pub_key_id == ident.public_der
    assert tok.authentication_method is AuthMethod.BTNS
    assert IToken.from_bytes(tok.to_bytes()) == tok
