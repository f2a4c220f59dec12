"""Open a trace for reading without hanging on a damaged file.

HDF5 readers in SWMR mode retry a metadata read whose checksum fails (the writer may be half-way
through an update) 100 times with exponential back-off, so a truncated copy of a trace (an
interrupted `cp` or download) blocked `inspect` for minutes inside the first read. Here:

- the superblock's end-of-file address is compared with the file's size: a file whose writer closed
  it (no write flag in the superblock) and that is shorter than its recorded end is truncated;
- the reader's metadata read attempts are capped (`READ_ATTEMPTS`, ~1 s of back-off in all), and every
  object's metadata is read once at open, so damage surfaces there as one line, not later.
"""

from __future__ import annotations

import ctypes
import glob
import os
import struct
from pathlib import Path

import h5py

from ..errors import MarginscopeError

SIGNATURE = b"\x89HDF\r\n\x1a\n"
READ_ATTEMPTS = 10
_WRITE_FLAGS = 0x01 | 0x04  # superblock v3 file consistency flags: open for write / for SWMR write


def superblock(path: Path) -> tuple[int, int, int] | None:
    """(version, consistency flags, stored end-of-file address incl. base) of an HDF5 file's
    superblock; None when the file has no HDF5 signature at 0, 512, 1024 or 2048. Versions 0/1
    report flags 0 (they have no per-open flags)."""
    with open(path, "rb") as f:
        head = f.read(2048 + 96)
    for offset in (0, 512, 1024, 2048):
        if head[offset:offset + 8] == SIGNATURE:
            break
    else:
        return None
    version = head[offset + 8]
    if version in (2, 3):
        size_offsets, flags, at = head[offset + 9], head[offset + 11], offset + 12
    elif version in (0, 1):
        size_offsets, flags = head[offset + 13], 0
        at = offset + 24 + (4 if version == 1 else 0)
    else:
        return version, 0, -1
    code = {4: "I", 8: "Q"}.get(size_offsets)
    if code is None or len(head) < at + 4 * size_offsets:
        return version, flags, -1
    fields = struct.unpack_from("<" + code * 3, head, at)
    base, eof = fields[0], fields[2]  # v2/3: base, extension, eof; v0/1: base, free-space, eof
    return version, flags, base + eof


def check_complete(path: Path) -> None:
    """One-line MarginscopeError when `path` is not HDF5 or is a truncated copy of a closed file."""
    found = superblock(path)
    if found is None:
        raise MarginscopeError(f"{path}: not an HDF5 trace (no HDF5 signature)")
    _, flags, eof = found
    size = path.stat().st_size
    if eof > size and not flags & _WRITE_FLAGS:
        raise MarginscopeError(f"{path}: truncated trace file ({size} of its {eof} bytes; an interrupted copy "
                               "or download?)")


def _set_read_attempts():
    """HDF5's H5Pset_metadata_read_attempts from the library h5py itself loaded (None if not found)."""
    libs = os.path.join(os.path.dirname(h5py.__file__), os.pardir, "h5py.libs")
    for candidate in sorted(glob.glob(os.path.join(libs, "libhdf5-*.so*"))) or ["libhdf5.so"]:
        try:
            fn = ctypes.CDLL(candidate).H5Pset_metadata_read_attempts
        except (OSError, AttributeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_int64, ctypes.c_uint], ctypes.c_int
        return fn
    return None


def open_swmr(path: Path) -> h5py.File:
    """`path` opened read-only in SWMR mode with at most READ_ATTEMPTS metadata read attempts, every
    object's metadata read once; one-line MarginscopeError when it is damaged."""
    check_complete(path)
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    setter = _set_read_attempts()
    if setter is not None:
        setter(fapl.id, READ_ATTEMPTS)
    try:
        f = h5py.File(h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDONLY | h5py.h5f.ACC_SWMR_READ, fapl=fapl))
    except (OSError, RuntimeError) as err:
        raise MarginscopeError(f"{path}: not a readable HDF5 trace ({str(err).splitlines()[0]})") from None
    try:
        f.visititems(lambda name, obj: (obj.shape, obj.dtype) if isinstance(obj, h5py.Dataset) else None)
    except (OSError, RuntimeError, KeyError, ValueError) as err:
        f.close()
        raise MarginscopeError(f"{path}: damaged trace file ({str(err).splitlines()[0]})") from None
    return f
