"""Serving model artifacts: open a file and check it is the one its version names (sha256).

A version's artifact is immutable and content-addressed, so a file whose bytes do not hash to the
recorded sha256 has been damaged or replaced: it must not be served. Hashing a large file on every
download would be wasteful, so each file's hash is computed once and cached by its identity
(path, inode, mtime, size); a file rewritten in place gets a new mtime and is hashed again.
"""

import hashlib
import os
import threading
from collections import OrderedDict
from typing import BinaryIO

CHUNK_BYTES = 1 << 20
CACHE_ENTRIES = 256


class ArtifactUnavailable(Exception):
    """The artifact cannot be served: missing, unreadable, or not the recorded content."""


_hashes: OrderedDict[tuple, str] = OrderedDict()
_hashes_lock = threading.Lock()


def _cached_sha256(file: BinaryIO, identity: tuple) -> str:
    with _hashes_lock:
        if identity in _hashes:
            _hashes.move_to_end(identity)
            return _hashes[identity]
    digest = hashlib.sha256()
    while chunk := file.read(CHUNK_BYTES):
        digest.update(chunk)
    file.seek(0)
    sha256 = digest.hexdigest()
    with _hashes_lock:
        _hashes[identity] = sha256
        while len(_hashes) > CACHE_ENTRIES:
            _hashes.popitem(last=False)
    return sha256


def clear_cache() -> None:
    with _hashes_lock:
        _hashes.clear()


def open_verified(path: str, expected_sha256: str) -> tuple[BinaryIO, int]:
    """The open file and its size, once its content is known to hash to `expected_sha256`.

    The file is hashed and served through the same open descriptor, so a file swapped between
    the check and the download is not what gets sent.

    Raises:
        ArtifactUnavailable: the file is missing or unreadable, or its sha256 differs.
    """
    try:
        file = open(path, "rb")  # noqa: SIM115 (handed to the caller, who closes it)
    except OSError as exc:
        raise ArtifactUnavailable(f"cannot open {path}: {exc.strerror or exc}") from exc
    try:
        stat = os.fstat(file.fileno())
        identity = (os.path.abspath(path), stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size)
        actual = _cached_sha256(file, identity)
    except OSError as exc:
        file.close()
        raise ArtifactUnavailable(f"cannot read {path}: {exc.strerror or exc}") from exc
    if actual != expected_sha256:
        file.close()
        raise ArtifactUnavailable(f"{path} has sha256 {actual}, not the recorded {expected_sha256}")
    return file, stat.st_size


def read_chunks(file: BinaryIO):
    """The file's bytes in chunks; closes it at the end, or when the client goes away."""
    with file:
        while chunk := file.read(CHUNK_BYTES):
            yield chunk
