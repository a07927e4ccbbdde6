"""A node's persistent ed25519 identity: a PEM file created on first run.

Several nodes on one machine must not share an identity, so a file is locked while a
node uses it; the default location hands each running node the first free slot."""

from __future__ import annotations

import fcntl
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.swarm.records import node_id_of

log = logging.getLogger(__name__)

DEFAULT_DIR = Path("~/.local/share/potluck").expanduser()


class IdentityError(RuntimeError):
    """The identity file cannot be used (in use by another node, unreadable, not an ed25519 key)."""


@dataclass
class Identity:
    key: Ed25519PrivateKey
    path: Path | None
    _lock_fd: int | None = None

    @property
    def public_key(self) -> bytes:
        return self.key.public_key().public_bytes_raw()

    @property
    def node_id(self) -> str:
        return node_id_of(self.public_key)

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _lock(path: Path) -> int | None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(path) + ".lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _read_or_create(path: Path) -> Ed25519PrivateKey:
    if path.exists():
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as error:
            raise IdentityError(f"{path} is not a PEM private key: {error}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"{path} holds a {type(key).__name__}, not an ed25519 key")
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    log.info("created identity %s", path)
    return key


def _open_locked(path: Path, fd: int) -> Identity:
    try:
        return Identity(_read_or_create(path), path, fd)
    except BaseException:
        os.close(fd)
        raise


def load_identity(path: str | Path | None) -> Identity:
    """The identity at `path` (created if missing), or the first free default slot when `path` is None."""
    if path is not None:
        path = Path(path).expanduser()
        fd = _lock(path)
        if fd is None:
            raise IdentityError(f"{path} is in use by another running node; give each node its own --identity")
        return _open_locked(path, fd)
    for slot in range(1, 1000):
        candidate = DEFAULT_DIR / ("identity.pem" if slot == 1 else f"identity-{slot}.pem")
        DEFAULT_DIR.mkdir(parents=True, exist_ok=True)
        fd = _lock(candidate)
        if fd is not None:
            return _open_locked(candidate, fd)
    raise IdentityError(f"no free identity slot in {DEFAULT_DIR}")


def ephemeral_identity() -> Identity:
    """A throwaway identity (clients, tests)."""
    return Identity(Ed25519PrivateKey.generate(), None)
