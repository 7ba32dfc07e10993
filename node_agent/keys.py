"""TLS-PSK key files: the consumer's keys (`KeyStore`) and the file format both sides share.

A key file holds one `identity:hexkey` line, the format nbdkit's
`--tls-psk` (owner side) and its nbd plugin's `tls-psk=` (consumer side)
read. Keys reach the agent only in request bodies over its authenticated
API; they are written once, 0600 in a 0700 directory, and never logged:
log lines and errors name the volume (and the client node), never a key.

Writes are atomic (a temporary file renamed into place, both fsynced): a
crash leaves the old key or the new one, never half a line that would
make every handshake fail.
"""

from __future__ import annotations

import hmac
import logging
import os
import uuid
from pathlib import Path

from tessera.ids import check_volume_id
from tessera.system.files import fsync_path

log = logging.getLogger(__name__)

KEY_SUFFIX = ".psk"


def psk_line(identity: str, key: str) -> bytes:
    return f"{identity}:{key}\n".encode()


def make_private_dir(directory: Path) -> None:
    """Create `directory` (and parents) and make it 0700: it holds keys."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)


def write_private(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically, mode 0600 from the first byte on."""
    make_private_dir(path.parent)
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def holds_key(path: Path, identity: str, key: str) -> bool:
    """Whether the key file says exactly `identity:key` (constant-time on the key)."""
    try:
        present = path.read_bytes()
    except OSError:
        return False
    return hmac.compare_digest(present, psk_line(identity, key))


class KeyStore:
    """Keys for connecting to remote volumes: `<directory>/<volume_id>.psk`.

    Nothing is created until the first key arrives, so an agent that never
    attaches a remote volume leaves no state directory behind.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, volume_id: str) -> Path:
        """Where the volume's key file is (for the nbd transport's `tls-psk=`)."""
        return self.directory / f"{check_volume_id(volume_id)}{KEY_SUFFIX}"

    def exists(self, volume_id: str) -> bool:
        return self.path(volume_id).is_file()

    def put(self, volume_id: str, identity: str, key: str) -> None:
        path = (
            self.directory / f"{check_volume_id(volume_id, missing_is_not_found=False)}{KEY_SUFFIX}"
        )
        if holds_key(path, identity, key):
            return  # a retried PUT: nothing to rewrite
        write_private(path, psk_line(identity, key))
        log.info("stored the key for volume %s", volume_id)

    def delete(self, volume_id: str) -> None:
        """Forget the volume's key; already gone is fine."""
        path = self.path(volume_id)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        log.info("deleted the key for volume %s", volume_id)
