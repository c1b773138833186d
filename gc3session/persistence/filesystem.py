"""The default store: one file per object in a directory.

Each file is named by the object's id and holds a line with the fields a
listing shows (a JSON array), a line of JSON metadata, then the pickle, so
listing reads and parses only the short first line of each file.
Files are written to a temporary name and renamed into place; the id
counter lives in the directory itself (``.next_id``), under a file lock.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Generator, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

from ..exceptions import InvalidArgument, LoadError, RepairWarning, SaveError, StoreError
from .atomic import write_atomically
from .idfactory import FileCounter, IdFactory, is_id, parse_id
from .serialization import DEFAULT_PROTOCOL, decode_json, encode_json, scan_json
from .store import (
    LAST_TAKEN,
    Record,
    Store,
    check_option_names,
    children_first,
    mask_password,
    matches,
    missing,
    store_options,
)

log = logging.getLogger(__name__)

#: The file in the store directory that holds the next free object number.
COUNTER_FILENAME = ".next_id"


class FilesystemStore(Store):
    """Objects as files in ``directory`` (created if missing).

    ``fsync=True`` makes every write reach the disk before returning, which
    guards against power loss as well as crashes, at a cost per write.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        idfactory: IdFactory | None = None,
        protocol: int = DEFAULT_PROTOCOL,
        *,
        fsync: bool = False,
        create: bool = True,
        **options: Any,
    ) -> None:
        check_option_names(options)  # a typo refused before the directory is made
        shared = store_options(options)
        directory = store_directory(directory)
        if "\0" in str(directory):
            raise InvalidArgument(f"store directory {str(directory)[:80]!r} contains a NUL byte")
        self.directory = directory.absolute()
        if self.directory.exists() and not self.directory.is_dir():
            raise StoreError(str(self.directory), "is not a directory")
        if not self.directory.exists():
            if not create:
                raise StoreError(str(self.directory), "no such store directory")
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise StoreError(str(self.directory), f"cannot create store directory: {error.strerror}") from error
        super().__init__(str(self.directory), idfactory=idfactory, protocol=protocol, **shared)
        self.fsync = fsync
        self._prefix = os.path.join(self.directory, "")  # reads use string paths: pathlib costs more than a read
        self._counter = FileCounter(self.directory / COUNTER_FILENAME, start=self._above_highest, fsync=fsync)
        self._counter_checked = False

    def _path(self, oid: str) -> Path:
        return self.directory / oid

    def _above_highest(self) -> int:
        # not past a record that leaves no room for new ids (put there by replace() or an earlier version)
        return max((n for oid in self._names() if (n := parse_id(oid)[1]) <= LAST_TAKEN), default=0) + 1

    def _names(self) -> Iterator[str]:
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if is_id(entry.name):
                    yield entry.name

    def _reserve(self, n: int) -> range:
        self._check_directory()
        if not self._counter_checked:
            # once per handle: a counter behind the records (restored, edited) would overwrite them
            counter_exists = self._counter.path.exists()
            try:
                highest = self._above_highest() - 1
            except OSError as error:  # a disk error, a stale NFS handle, no permission
                raise SaveError(str(self.directory), f"cannot list the records: {error.strerror or error}") from error
            if self._counter.advance(highest) and counter_exists:
                warnings.warn(f"id counter {self._counter.path} was behind the records; moved past them",
                              RepairWarning, stacklevel=5)
            self._counter_checked = True
        return self._counter.reserve(n)

    def _bump(self, number: int) -> None:
        self._check_directory()
        self._counter.advance(number)

    def _check_directory(self) -> None:
        """Before the counter's lock is taken, which would make the directory again: the store must be there
        (not removed, with the session around it, by another process)."""
        if not self.directory.is_dir():
            raise SaveError(str(self.directory), "the store directory is gone (removed by another process?)")

    def _write(self, records: list[Record]) -> None:
        for record in children_first(records):  # one file at a time: what a record names is there before it
            path = self._path(record.id)
            try:
                write_atomically(path, encode_record(record.meta, record.data), fsync=self.fsync)
            except OSError as error:
                raise SaveError(record.id, f"cannot write {path}: {error.strerror or error}") from error

    def _read(self, ids: list[str]) -> dict[str, tuple[dict[str, Any], bytes] | LoadError]:
        found: dict[str, tuple[dict[str, Any], bytes] | LoadError] = {}
        for oid in ids:
            path = self._prefix + oid
            try:
                content = read_file(path)
            except FileNotFoundError:
                continue
            except OSError as error:
                found[oid] = LoadError(oid, f"cannot read {path}: {error.strerror or error}")
                continue
            found[oid] = decode_record(oid, path, content)
        return found

    def _delete(self, ids: list[str]) -> None:
        for oid in ids:
            path = self._path(oid)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as error:
                raise SaveError(oid, f"cannot remove {path}: {error.strerror or error}") from error

    def _sorted_ids(self) -> list[str]:
        """The ids of every record, in order of number."""
        return sorted(self._names(), key=lambda oid: parse_id(oid)[1])

    def _list(self, filters: dict[str, Any]) -> list[str]:
        ids = self._sorted_ids()
        if not filters:
            return ids
        return [oid for oid, meta in self._read_metadata(ids) if isinstance(meta, dict) and matches(meta, filters)]

    def _read_metadata(self, ids: list[str] | None) -> Iterator[tuple[str, dict[str, Any] | LoadError]]:
        return self._parse_heads(ids, parse_metadata, metadata=True)

    def _read_summaries(self, ids: list[str] | None) -> Iterator[tuple[str, dict[str, Any] | LoadError]]:
        """The listing line of each file, read and parsed in a loop of its own: the hot path of ``ls``.

        Anything but a whole listing line (a file that cannot be read, a
        record without a listing line, a damaged one) goes through the
        general path, :meth:`_summary_of`, which reports errors and falls
        back to the metadata line.
        """
        if ids is None:
            ids = self._sorted_ids()
        dir_fd = _open_directory(self._prefix)
        if dir_fd is None:  # each file's own open then says what is wrong
            yield from self._parse_heads(ids, self._summary_of, metadata=False)
            return
        open_file, read, close, flags = os.open, os.read, os.close, os.O_RDONLY  # local names: once a task
        try:
            for oid in ids:
                try:
                    fd = open_file(oid, flags, dir_fd=dir_fd)
                    try:
                        head = read(fd, SUMMARY_BLOCK)
                        if b"\n" not in head:  # a listing line longer than a read (a big collection's)
                            head = _read_on(fd, head, 1)
                    finally:
                        close(fd)
                except OSError:  # the general path says what is wrong
                    head = b""
                summary = parse_summary(head)
                if summary is None:
                    with closing(self._parse_heads([oid], self._summary_of, metadata=False)) as one:
                        yield next(one)
                else:
                    yield oid, summary
        finally:
            os.close(dir_fd)

    def _summary_of(self, oid: str, path: str, head: bytes) -> dict[str, Any] | LoadError:
        if head[:1] != b"[":  # a record written without a listing line: its first line is the metadata
            return parse_metadata(oid, path, head)
        summary = parse_summary(head)
        if summary is not None:
            return summary
        # a listing line that cannot be read: the metadata line says the same, at more cost
        with closing(self._parse_heads([oid], parse_metadata, metadata=True)) as metadata:
            return next(metadata)[1]

    def _parse_heads(
        self, ids: list[str] | None, parse: Callable[[str, str, bytes], Any], *, metadata: bool
    ) -> Generator[tuple[str, Any], None, None]:
        """``(id, parse(id, path, head))`` for each file, ``head`` its first line (through its metadata line
        with ``metadata``); a file that cannot be read gives a LoadError instead."""
        if ids is None:
            ids = self._sorted_ids()
        prefix = self._prefix
        # files opened by name inside the directory: the kernel does not walk the whole path for each
        dir_fd = _open_directory(prefix)
        try:
            for oid in ids:
                try:
                    head = read_head(oid, dir_fd, metadata=metadata) if dir_fd is not None else read_head(
                        prefix + oid, metadata=metadata)
                except FileNotFoundError:
                    yield oid, missing(oid, self)
                    continue
                except OSError as error:
                    yield oid, LoadError(oid, f"cannot read {prefix}{oid}: {error.strerror or error}")
                    continue
                yield oid, parse(oid, prefix + oid, head)
        finally:
            if dir_fd is not None:
                os.close(dir_fd)

    def size(self) -> int | None:
        """Bytes the records take on disk; None if the directory cannot be listed."""
        total = 0
        try:
            names = list(self._names())
        except OSError:
            return None
        for oid in names:
            try:
                total += self._path(oid).stat().st_size
            except OSError:
                pass
        return total


def read_file(path: str) -> bytes:
    """The content of a file, with fewer system calls and objects than ``open().read()``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_head(path: str | Path, dir_fd: int | None = None, *, metadata: bool = False) -> bytes:
    """The first line of a file (``path`` relative to ``dir_fd`` if given), newline included (if it has one).

    With ``metadata``, through the metadata line of a record file: the
    second line when the first is a listing line (starts with ``[``).
    """
    fd = os.open(path, os.O_RDONLY, dir_fd=dir_fd)
    try:
        # one read, most often: the listing line is about a hundred bytes, the metadata line a few hundred
        head = os.read(fd, 4096 if metadata else SUMMARY_BLOCK)
        end = metadata_end(head) if metadata else head.find(b"\n")
        if end >= 0:
            return head[: end + 1]
        return _read_on(fd, head, 2 if metadata and head[:1] == b"[" else 1)
    finally:
        os.close(fd)


def _read_on(fd: int, start: bytes, lines: int) -> bytes:
    """``start`` and what follows it in ``fd``, through the ``lines``-th newline: for lines longer than a read."""
    head = bytearray(start)
    lines -= start.count(b"\n")
    while chunk := os.read(fd, 65536):
        end = -1
        while lines and (end := chunk.find(b"\n", end + 1)) >= 0:
            lines -= 1
        if not lines:
            head += chunk[: end + 1]
            break
        head += chunk
    return bytes(head)


def _open_directory(path: str) -> int | None:
    """A descriptor of directory ``path`` to open its files by name, or None (unsupported, or unreadable)."""
    if os.open not in os.supports_dir_fd:  # pragma: no cover - Windows
        return None
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # each file's own open then says what is wrong
        return None


#: How much of a record file a listing reads first: the listing line is about a hundred bytes.
SUMMARY_BLOCK = 512
#: The fields of a record file's first line, the listing line, in this order.
SUMMARY_FIELDS = ("id", "cls", "jobname", "state", "returncode", "modified", "children")


def encode_record(meta: dict[str, Any], data: bytes) -> bytes:
    """A record file: the listing line (a JSON array of SUMMARY_FIELDS), the JSON metadata line, the pickle."""
    summary = encode_json([meta.get(name) for name in SUMMARY_FIELDS])
    return b"".join((summary.encode("ascii"), b"\n", encode_json(meta).encode("ascii"), b"\n", data))


def decode_record(oid: str, path: str | Path, content: bytes) -> tuple[dict[str, Any], bytes] | LoadError:
    """Split a record file into metadata and pickle, or say what is wrong with it."""
    end = metadata_end(content)
    head, data = (content, b"") if end < 0 else (content[: end + 1], content[end + 1 :])
    meta = parse_metadata(oid, path, head)
    if isinstance(meta, LoadError):
        return meta
    return meta, data


def metadata_end(start: bytes) -> int:
    """Where the metadata line ends (its newline) in ``start``, the start of a record file; -1 if not in it."""
    end = start.find(b"\n")
    if end >= 0 and start[:1] == b"[":  # the listing line; a record written without one starts with its metadata
        end = start.find(b"\n", end + 1)
    return end


def parse_metadata(oid: str, path: str | Path, head: bytes) -> dict[str, Any] | LoadError:
    """The metadata in ``head``: a record file's first line, or its first two when the first is the listing line."""
    if not head:
        return LoadError(oid, f"{path} is empty")
    line = head.partition(b"\n")[2] if head[:1] == b"[" else head
    if not line.endswith(b"\n"):
        return LoadError(oid, f"{path} is truncated (no end to its metadata line)")
    try:
        meta = decode_json(line.decode())
    except ValueError:  # UnicodeDecodeError included
        return LoadError(oid, f"{path} does not have a JSON metadata line")
    if not isinstance(meta, dict):
        return LoadError(oid, f"{path}: metadata is not a JSON object")
    return meta


def parse_summary(head: bytes) -> dict[str, Any] | None:
    """The listing fields in the first line of ``head`` (the start of a record file), or None if it does not
    hold them: no listing line, one that is damaged, or one without its newline."""
    end = head.find(b"\n")
    if end < 0 or head[:1] != b"[":
        return None
    try:
        text = head[:end].decode()
        # a JSON value that starts with "[" is a list: unpacking checks its length
        (oid, cls, jobname, state, returncode, modified, children), stop = scan_json(text, 0)
    except (ValueError, StopIteration, RecursionError):  # not UTF-8 or JSON, not 7 fields, no value, too deep
        return None
    if stop != len(text):
        return None
    return {"id": oid, "cls": cls, "jobname": jobname, "state": state, "returncode": returncode,
            "modified": modified, "children": children}


def store_directory(directory: str | os.PathLike[str]) -> Path:
    """The directory of a filesystem store, given as a path or a ``file://`` URL."""
    if isinstance(directory, str) and directory[:7].lower() == "file://":  # schemes and hosts ignore case
        rest = directory[len("file://") :]
        if rest[:10].lower() == "localhost/":
            rest = rest[len("localhost") :]
        if not rest.startswith("/"):
            raise InvalidArgument(f"file URL {mask_password(directory)!r} must name an absolute path (file:///...)")
        return Path(rest)
    return Path(directory)
