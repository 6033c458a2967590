"""File helpers: atomic writes and content hashes. All pipeline outputs go through here."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Mapping

from pipeline.errors import InputError, OutputError, first_line

# Fixed ZIP member attributes, so an archive depends only on its members' names and contents.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest date a ZIP can hold
_ZIP_UNIX = 3  # "made by" system: Unix, whatever system writes it
_ZIP_MODE = 0o100644 << 16  # regular file, rw-r--r--


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only on success.

    Works for files and directories. A crash or exception leaves `path` untouched
    and removes the temporary, so readers never see a partial output. A failed write
    (disk full, size limit, a parent that is a file) raises OutputError naming `path`.
    """
    target = Path(path)
    if not target.is_absolute() and Path(os.path.normpath(target)).parts[:1] == ("..",):
        # Project outputs are relative paths made from checked names: one leaving the project is a bug.
        raise OutputError("refusing to write outside the project", file=str(target))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as exc:  # e.g. a parent that is a file: name it
        where = f" ({exc.filename})" if exc.filename else ""
        raise OutputError(f"cannot write: {exc.strerror or first_line(exc)}{where}", file=str(target)) from None
    staged = tmp / target.name
    try:
        yield staged
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(staged, target)
    except OSError as exc:
        if exc.filename and not str(exc.filename).startswith(str(tmp)):
            raise  # about another file (an input read inside the block), not this output
        raise OutputError(f"cannot write: {exc.strerror or first_line(exc)}", file=str(target)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def zip_member(name: str) -> zipfile.ZipInfo:
    """A ZIP entry whose bytes depend only on `name` and the data written to it."""
    member = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    member.create_system = _ZIP_UNIX
    member.external_attr = _ZIP_MODE
    return member


def save_npz(handle: BinaryIO, arrays: Mapping[str, Any]) -> None:
    """Like `np.savez`, but equal arrays give equal bytes: numpy stamps each member with the
    current time, which would make every rerun a changed DVC output. Loads with `np.load`."""
    import numpy as np

    with zipfile.ZipFile(handle, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            with archive.open(zip_member(f"{name}.npy"), "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


# A model archive (.keras) is unpacked by Keras: bounded by what its directory declares first
# (Python's zipfile never inflates a member past its declared size).
MAX_ARCHIVE_MEMBERS = 10_000
MAX_ARCHIVE_BYTES = 8 << 30


def check_archive(path: str | os.PathLike, *, key: str | None = None, what: str = "archive") -> None:
    """A ZIP archive's member count and declared uncompressed size are within the limits."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (OSError, zipfile.BadZipFile) as exc:
        raise InputError(f"cannot read {what}: {' '.join(str(exc).split())}", file=str(path), key=key) from None
    if len(members) > MAX_ARCHIVE_MEMBERS:
        raise InputError(f"{what} of {len(members):,} files (the limit is {MAX_ARCHIVE_MEMBERS:,})", file=str(path),
                         key=key)
    declared = sum(member.file_size for member in members)
    if declared > MAX_ARCHIVE_BYTES:
        raise InputError(f"{what} unpacks to {declared:,} bytes (the limit is {MAX_ARCHIVE_BYTES:,})", file=str(path),
                         key=key)


# Arrays read from an .npz: bounded before anything is allocated (a header can declare any shape).
MAX_NPZ_MEMBERS = 1000
MAX_NPZ_BYTES = 4 << 30
# What np.load raises for a truncated, pickled or otherwise malformed .npz.
NPZ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


def read_npz(path: str | os.PathLike, *, key: str | None = None, what: str = "arrays") -> dict[str, Any]:
    """Every array of an .npz file (no pickles), after checking the member count and the sizes
    the members' headers declare; a malformed file is an InputError naming `path` and `key`."""
    import numpy as np

    file = str(path)
    if not Path(path).is_file():  # a folder, a FIFO or a device is not an archive (and may block)
        raise InputError("no such file", file=file, key=key)
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            if len(members) > MAX_NPZ_MEMBERS:
                raise InputError(f"{len(members)} arrays (the limit is {MAX_NPZ_MEMBERS})", file=file, key=key)
            declared = 0
            for member in members:
                with archive.open(member) as handle:
                    version = np.lib.format.read_magic(handle)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(handle)
                declared += int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
            if declared > MAX_NPZ_BYTES:
                raise InputError(f"declares {declared:,} bytes of arrays (the limit is {MAX_NPZ_BYTES:,})", file=file,
                                 key=key)
        with np.load(path, allow_pickle=False) as loaded:
            return {name: loaded[name] for name in loaded.files}
    except NPZ_ERRORS as exc:
        raise InputError(f"cannot read {what}: {' '.join(str(exc).split())}", file=file, key=key) from None


# Small text files configs name (labels, recipes): read whole, so bounded.
MAX_CONFIG_FILE_BYTES = 16 << 20


def read_regular_file(path: str | os.PathLike, *, key: str | None = None, what: str = "file",
                      limit: int = MAX_CONFIG_FILE_BYTES) -> bytes:
    """A file a config names: a regular file (not a FIFO or device, which could block or never end)
    of at most `limit` bytes."""
    file = Path(path)
    try:
        if not file.is_file():
            raise InputError(f"cannot read {what}: not a regular file" if file.exists() else
                             f"cannot read {what}: No such file or directory", file=str(path), key=key)
        if file.stat().st_size > limit:
            raise InputError(f"{what} of {file.stat().st_size:,} bytes (the limit is {limit:,})", file=str(path), key=key)
        return file.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {what}: {exc.strerror}", file=str(path), key=key) from None


def read_bytes(path: str | os.PathLike, *, key: str | None = None) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror}", file=str(path), key=key) from exc


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_path(path: str | os.PathLike) -> str:
    """Hash a file, or a directory as the sorted list of (relative path, file hash)."""
    root = Path(path)
    if root.is_file():
        digest = hashlib.sha256()
        with root.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()
    if not root.is_dir():
        raise InputError("does not exist", file=str(root))
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(file.relative_to(root).as_posix().encode())
        digest.update(b"\0")
        digest.update(sha256_path(file).encode())
    return digest.hexdigest()
