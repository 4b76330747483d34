"""Paths that are local files or object-store URIs (s3://, gs://, hdfs://, ... : whatever pyarrow's filesystems
resolve), read through pyarrow.fs. Credentials and endpoint come from each store's standard environment: for S3
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_ENDPOINT_URL (S3-compatible stores: MinIO, Ceph, Huawei OBS).

Decoders (decord, PySceneDetect's OpenCV, PIL) read local files: `local_copy` downloads an object once per
process and version (size and ETag, or modification time where a store has no ETag) into a bounded cache
(DOWNLOAD_CACHE_BYTES), so the clips of one long video decoded in one task fetch it once, and an object
overwritten under the same URI (a retrained adapter) is fetched again. A file that grows (a training run's
metrics, console, data order) is appended to in a local `WorkingCopy` and uploaded whole: an object store has no
append.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import hashlib
import json
import math
import os
import posixpath
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

DOWNLOAD_CACHE_BYTES = int(os.environ.get("WANRAY_DOWNLOAD_CACHE_BYTES", 4 * 1024**3))
"""Bytes of downloaded objects one process keeps for the next decode of the same object."""


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(path: str | os.PathLike) -> bool:
    """An object-store (or other non-local) address such as s3://bucket/key; file:// and plain paths (even one
    with "://" inside, as runs/x://y) are local."""
    text = str(path)
    return bool(_SCHEME.match(text)) and not text.startswith("file://")


def _local(path: str | os.PathLike) -> str:
    """A local path without its file:// prefix, if any."""
    return str(path).removeprefix("file://")


@functools.lru_cache(maxsize=32)
def _store(scheme_and_authority: str) -> pafs.FileSystem:
    fs, _ = pafs.FileSystem.from_uri(scheme_and_authority + "/")
    return fs


def filesystem(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(the pyarrow filesystem, the path within it) of a local path or a URI."""
    text = str(path)
    if not is_uri(text):
        return pafs.LocalFileSystem(), str(Path(_local(text)).resolve())
    scheme, rest = text.split("://", 1)
    authority = rest.split("/", 1)[0]
    if scheme in ("s3", "gs"):  # one client per bucket: from_uri makes a new one (and connection pool) each call
        return _store(f"{scheme}://{authority}"), rest.rstrip("/")
    fs, inner = pafs.FileSystem.from_uri(text)
    return fs, inner


def join(base: str | os.PathLike, *parts: str) -> str:
    """`parts` under `base`; a part that is itself a URI or an absolute local path stands alone."""
    text = str(base) if is_uri(base) else _local(base)
    for part in parts:
        if is_uri(part) or (not is_uri(text) and os.path.isabs(_local(part))):
            text = part if is_uri(part) else _local(part)
        elif is_uri(text):
            scheme, rest = text.split("://", 1)
            text = f"{scheme}://{posixpath.normpath(posixpath.join(rest, part))}"
        else:
            text = str((Path(text) / part).resolve())
    return text


def parent(path: str | os.PathLike) -> str:
    text = str(path)
    if is_uri(text):
        scheme, rest = text.split("://", 1)
        return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"
    return str(Path(text).resolve().parent)


def absolute(path: str | os.PathLike) -> str:
    """A URI as it is; a local path resolved."""
    return str(path) if is_uri(path) else str(Path(_local(path)).resolve())


def info(path: str | os.PathLike) -> pafs.FileInfo:
    fs, inner = filesystem(path)
    return fs.get_file_info(inner)


def is_file(path: str | os.PathLike) -> bool:
    return info(path).type == pafs.FileType.File


def is_dir(path: str | os.PathLike) -> bool:
    """A local directory, or a prefix that objects of the store sit under."""
    return info(path).type == pafs.FileType.Directory


def read_bytes(path: str | os.PathLike) -> bytes:
    fs, inner = filesystem(path)
    with fs.open_input_stream(inner) as f:
        return f.read()


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode("utf-8")


def list_files(directory: str | os.PathLike, pattern: str = "*") -> list[str]:
    """The files directly in `directory` whose name matches `pattern` (fnmatch), sorted by name; none when the
    directory does not exist."""
    fs, inner = filesystem(directory)
    found = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
    names = sorted(i.base_name for i in found if i.type == pafs.FileType.File and fnmatch.fnmatch(i.base_name, pattern))
    return [join(directory, name) if is_uri(directory) else str(Path(inner) / name) for name in names]


def list_dirs(directory: str | os.PathLike) -> list[str]:
    """The directories directly in `directory` (the prefixes, in an object store), sorted by name."""
    fs, inner = filesystem(directory)
    found = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
    names = sorted(i.base_name for i in found if i.type == pafs.FileType.Directory)
    return [join(directory, name) if is_uri(directory) else str(Path(inner) / name) for name in names]


def remove(path: str | os.PathLike) -> None:
    """Deletes a file or object; one already gone is no error."""
    fs, inner = filesystem(path)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(inner)


def make_dirs(directory: str | os.PathLike) -> None:
    """Create a local directory (and its parents); an object store has none to create."""
    if not is_uri(directory):
        Path(directory).mkdir(parents=True, exist_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Whole or not at all: locally a temporary sibling renamed into place (wanray.io); in an object store one
    upload, which makes the object appear only when it completes (there is no rename to make it atomic)."""
    if not is_uri(path):
        from wanray.io import write_bytes_atomic

        write_bytes_atomic(path, data)
        return
    fs, inner = filesystem(path)
    with fs.open_output_stream(inner) as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(obj, path: str | os.PathLike) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=True))


def write_parquet(table: pa.Table, path: str | os.PathLike, row_group_size: int | None = None) -> None:
    """A Parquet file written whole or not at all (write_bytes)."""
    if is_uri(path):
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer, row_group_size=row_group_size)
        write_bytes(path, buffer.getvalue().to_pybytes())
        return
    from wanray.io import atomic_path

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_size)


def read_table(path: str | os.PathLike, **kwargs) -> pa.Table:
    fs, inner = filesystem(path)
    return pq.read_table(inner, filesystem=fs, **kwargs)


def read_schema(path: str | os.PathLike) -> pa.Schema:
    fs, inner = filesystem(path)
    return pq.read_schema(inner, filesystem=fs)


def parquet_file(path: str | os.PathLike) -> pq.ParquetFile:
    """A ParquetFile reading `path` (from its store: row groups are fetched as they are read)."""
    if not is_uri(path):
        return pq.ParquetFile(path)
    fs, inner = filesystem(path)
    return pq.ParquetFile(fs.open_input_file(inner))


def check_replaceable(path: str | os.PathLike, marker: str, what: str, keep: tuple = ()) -> None:
    """A ConfigError unless writing the `what` at `path` may replace whatever is there: nothing yet, an empty
    directory, or an earlier `what` (its `marker` file at the top), never a bucket's root nor a path equal to,
    inside or holding one of `keep` (the model or the run it is made from)."""
    from wanray.errors import ConfigError

    text = absolute(path)
    if is_uri(text) and "/" not in text.split("://", 1)[1].strip("/"):
        raise ConfigError(f"{path} is a bucket's root: name a prefix in it for the {what}")
    for source in map(absolute, keep):
        a, b = text.rstrip("/") + "/", source.rstrip("/") + "/"
        if a.startswith(b) or b.startswith(a):
            raise ConfigError(f"{path} is, or is inside or holds, {source}: write the {what} elsewhere")
    found = info(text)
    if found.type == pafs.FileType.NotFound or is_file(join(text, marker)):
        return
    if found.type == pafs.FileType.File:
        raise ConfigError(f"{path} is a file: name a directory for the {what}")
    fs, inner = filesystem(text)
    if fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True)):
        raise ConfigError(
            f"{path} holds files and is no earlier {what} (no {marker}): writing it would delete them; name a new "
            "or empty directory"
        )


def upload_dir(local: str | os.PathLike, uri: str, last: str) -> None:
    """Replace what is under `uri` with the files under the local directory `local`, the file named `last`
    (the directory's marker, e.g. model_index.json) uploaded after every other: a reader that finds it finds
    the rest, as an object store cannot rename a finished directory into place."""
    fs, inner = filesystem(uri)
    fs.delete_dir_contents(inner, missing_dir_ok=True)
    root = Path(local)
    files = sorted(
        (p for p in root.rglob("*") if p.is_file()), key=lambda p: (p.relative_to(root).as_posix() == last, p)
    )
    try:
        for path in files:
            upload_file(path, join(uri, path.relative_to(root).as_posix()))
    except BaseException:
        # an interrupted upload leaves no half directory: pyarrow's S3 stream completes what it holds when
        # closed, even on an exception, so the object being written may be a truncated one
        fs.delete_dir_contents(inner, missing_dir_ok=True)
        raise


def upload_file(local: str | os.PathLike, uri: str) -> None:
    _write(local, *filesystem(uri))


def _write(local: str | os.PathLike, fs: pafs.FileSystem, inner: str) -> None:
    with open(local, "rb") as src, fs.open_output_stream(inner) as dst:
        while chunk := src.read(64 * 1024**2):
            dst.write(chunk)


MOVED_BYTES = 4 * 1024**3
"""replace_file writes a larger file in place: an object store's move is a copy, and S3 copies 5 GiB at most."""


def replace_file(local: str | os.PathLike, uri: str) -> None:
    """upload_file for a file that replaces an earlier upload of itself (a run's log or metrics): written under
    a temporary name beside it, then moved over it. pyarrow's S3 stream completes what it holds when closed,
    even on an exception, so an upload stopped part way (Ctrl-C) would replace the whole earlier file with a
    truncated one; stopped now, it leaves the earlier one. The temporary name (.<hash of the name>.part) keeps
    no part of the file's name a reader matches (TensorBoard loads any name holding "tfevents"), and is the
    same at every upload, so the next one replaces what a killed one left. A file over MOVED_BYTES (a long
    run's TensorBoard events with their videos) is written in place, as upload_file writes."""
    fs, inner = filesystem(uri)
    if os.path.getsize(local) > MOVED_BYTES:
        _write(local, fs, inner)
        return
    parent, _, name = inner.rpartition("/")
    part = f"{parent}/.{hashlib.sha1(name.encode()).hexdigest()[:16]}.part"
    try:
        _write(local, fs, part)
        fs.move(part, inner)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.delete_file(part)
        raise


class WorkingCopy:
    """A local directory standing for `root` (a local directory or a URI) to one writer of files under it:
    `root` itself, or a temporary local directory whose files `push` uploads whole (an object store has no
    append: a file that grows is uploaded again) and `pull` downloads to go on appending to. Each file under
    a run directory has one writer (a rank or the validation actor), so uploads never race."""

    def __init__(self, root: str | os.PathLike):
        self.root = absolute(root)
        self.remote = is_uri(root)
        self.local = Path(tempfile.mkdtemp(prefix="wanray-run-")) if self.remote else Path(self.root)
        self.local.mkdir(parents=True, exist_ok=True)
        self.synced: dict[tuple[str, ...], float] = {}
        self.unsent: set[str] = set()

    def pull(self, *names: str) -> None:
        """Download the files `names` (relative to root) that exist there."""
        if not self.remote:
            return
        for relative in names:
            target = self.local / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                target.write_bytes(read_bytes(join(self.root, relative)))

    def push(self, *names: str) -> None:
        """Upload the files `names` (relative to root; a directory: every file under it) that exist here."""
        if not self.remote:
            return
        for relative in names:
            path = self.local / relative
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            for file in files:
                if file.is_file():
                    replace_file(file, join(self.root, file.relative_to(self.local).as_posix()))

    def sync(self, *names: str, every: float = 0.0) -> None:
        """push, at most once per `every` seconds for the same names (a file that grows at every step is not
        uploaded at every step), each name on its own; an upload error is a warning on stderr, not the caller's
        failure: the next sync uploads the whole files again, and close keeps the copy while one is unsent."""
        now = time.monotonic()
        if not self.remote or now - self.synced.get(names, -math.inf) < every:
            return
        for relative in names:
            try:
                self.push(relative)
                self.unsent.discard(relative)
            except OSError as e:
                self.unsent.add(relative)
                print(f"warning: uploading {relative} to {self.root} failed (retried later): {e}", file=sys.stderr)
        self.synced[names] = now

    def close(self) -> None:
        """Remove the local copy, unless a file in it failed its last upload: then it stays, and says where."""
        if not self.remote:
            return
        if self.unsent:
            print(
                f"warning: {', '.join(sorted(self.unsent))} could not be uploaded to {self.root}; "
                f"the local copy stays in {self.local}",
                file=sys.stderr,
            )
            return
        shutil.rmtree(self.local, ignore_errors=True)

    def __enter__(self) -> WorkingCopy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def name(path: str | os.PathLike) -> str:
    """The last component of a path or URI."""
    return PurePosixPath(str(path).rstrip("/")).name


Version = tuple[str, int, str]
"""An object as it was downloaded: (URI, size, tag). The tag is the store's ETag, which changes with every write;
where a store gives none, the modification time in ns (S3's is in whole seconds: an overwrite of the same size
within a second of the last write would not show in it)."""


def _tag(fs: pafs.FileSystem, inner: str, opened: pa.NativeFile) -> str:
    etag = opened.metadata().get("ETag")
    return etag.decode() if etag else f"mtime:{fs.get_file_info(inner).mtime_ns}"


def _local_name(version: Version, inner: str) -> str:
    return hashlib.sha1(repr(version).encode()).hexdigest()[:16] + Path(inner).suffix


DOWNLOAD_TRIES = 3


class _Overwritten(Exception):
    """A download ended on another version of the object than it started on."""


def _copy(source: pa.NativeFile, dst) -> None:
    while chunk := source.read(8 * 1024**2):
        dst.write(chunk)


class _Downloads:
    """The objects this process downloaded, each version in a file of its own, least recently used first: the
    oldest go while the cache holds more than DOWNLOAD_CACHE_BYTES, and a version a newer one replaced goes
    at once, but never a file in use (pinned), nor the latest one used (a video larger than the whole cache
    still serves each of its clips from one download). One thread downloads a version while the others that
    want it wait; a thread that wants another object, or one already here, does not."""

    def __init__(self) -> None:
        self.dir: Path | None = None  # made at the first download
        self.files: OrderedDict[Version, Path] = OrderedDict()
        self.pinned: Counter[Version] = Counter()
        self.downloading: dict[Version, threading.Lock] = {}
        self.stale: set[Version] = set()  # versions found written over during their download
        self.lock = threading.Lock()  # guards the fields above, never held over a download

    def pin(self, uri: str, expected: str | None = None) -> tuple[Version, Path]:
        """The object's current version, downloaded unless here; Changed when that is not `expected` (a `version`
        taken earlier), before any download or, written while it downloaded, after. The store reads an object in
        ranges, so a download overlapping a write may hold parts of both versions: its ETag is taken again at the
        end, and a download it disagrees with is dropped and made again, DOWNLOAD_TRIES times at most."""
        fs, inner = filesystem(uri)
        for _ in range(DOWNLOAD_TRIES):
            try:
                return self._pin(uri, fs, inner, expected)
            except _Overwritten:
                if expected is not None:
                    raise Changed(f"{uri} was written while it downloaded") from None
        raise OSError(f"{uri} was written again during each of {DOWNLOAD_TRIES} downloads")

    def _pin(self, uri: str, fs: pafs.FileSystem, inner: str, expected: str | None) -> tuple[Version, Path]:
        try:
            opened = fs.open_input_file(inner)  # one HEAD: the object's size and ETag
        except FileNotFoundError:
            raise FileNotFoundError(f"{uri}: no such object") from None
        with opened:
            version: Version = (uri, opened.size(), _tag(fs, inner, opened))
            if expected is not None and f"{version[1]}:{version[2]}" != expected:
                raise Changed(f"{uri} was written since its version {expected} was taken")
            with self.lock:
                self.pinned[version] += 1  # from here on no eviction takes it, once it is here
                gate = None if version in self.files else self.downloading.setdefault(version, threading.Lock())
                self.dir = directory = self.dir or self._make_dir()
            try:
                if gate is not None:
                    with gate:
                        self._download(version, opened, directory / _local_name(version, inner), fs, inner)
            except BaseException:
                self.release(version)
                raise
            finally:
                with self.lock:  # the gate goes with its last user: a later one for the version is another's
                    if gate is not None and self.downloading.get(version) is gate:
                        del self.downloading[version]
        with self.lock:
            self.files.move_to_end(version)
            self._evict()
            return version, self.files[version]

    @staticmethod
    def _make_dir() -> Path:
        """The process's cache directory, removed when the process exits (a Ray worker ends with its job: a run
        after run would otherwise leave up to DOWNLOAD_CACHE_BYTES in the node's temporary directory each)."""
        import atexit

        directory = Path(tempfile.mkdtemp(prefix="wanray-downloads-"))
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        return directory

    def _download(self, version: Version, opened: pa.NativeFile, local: Path, fs: pafs.FileSystem, inner: str) -> None:
        """Writes `version` into the cache unless a thread that held the gate before this one did; _Overwritten
        when the object is another version once the download ends (or fails: a write that shrank it ends the
        ranges early), or a thread before this one found so."""
        with self.lock:
            if version in self.files:
                return
            if version in self.stale:
                raise _Overwritten
        fd, part = tempfile.mkstemp(dir=local.parent, suffix=".part")
        try:
            try:
                with os.fdopen(fd, "wb") as dst:
                    _copy(opened, dst)
            except OSError:
                self._check(version, fs, inner)
                raise  # the same version: a network or store error
            self._check(version, fs, inner)
            os.replace(part, local)
            with self.lock:
                self.files[version] = local
        finally:
            Path(part).unlink(missing_ok=True)

    def _check(self, version: Version, fs: pafs.FileSystem, inner: str) -> None:
        """_Overwritten unless the object is still `version`; FileNotFoundError when it is gone."""
        try:
            again = fs.open_input_file(inner)  # one more HEAD
        except FileNotFoundError:
            raise FileNotFoundError(f"{version[0]}: no such object (deleted while it downloaded)") from None
        with again:
            if (again.size(), _tag(fs, inner, again)) != version[1:]:
                with self.lock:
                    self.stale.add(version)
                raise _Overwritten

    def release(self, version: Version) -> None:
        with self.lock:
            self.pinned[version] -= 1
            if self.pinned[version] <= 0:
                del self.pinned[version]
            self._evict()

    def _evict(self) -> None:
        versions = list(self.files)
        for i, version in enumerate(versions[:-1]):
            if version in self.pinned:
                continue
            replaced = any(later[0] == version[0] for later in versions[i + 1 :])
            if replaced or sum(v[1] for v in self.files) > DOWNLOAD_CACHE_BYTES:
                self.files.pop(version).unlink(missing_ok=True)


_downloads = _Downloads()


class Changed(Exception):
    """The file or object is no longer the version a reader pinned (`version`): it was written since."""


def version(path: str | os.PathLike) -> str:
    """What local_copy checks a file or object against: an object's size and ETag (its modification time where
    a store gives none); a local file's size and content hash (copies of it on several nodes, or a file touched,
    are the same version)."""
    fs, inner = filesystem(path)
    if not is_uri(path):
        digest = hashlib.sha1()
        try:
            with open(inner, "rb") as f:
                while chunk := f.read(8 * 1024**2):
                    digest.update(chunk)
        except (FileNotFoundError, IsADirectoryError):
            raise FileNotFoundError(f"{path}: no such file") from None
        return f"{os.path.getsize(inner)}:sha1:{digest.hexdigest()}"
    try:
        opened = fs.open_input_file(inner)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such object") from None
    with opened:
        return f"{opened.size()}:{_tag(fs, inner, opened)}"


@contextlib.contextmanager
def local_copy(path: str | os.PathLike, pinned: str | None = None) -> Iterator[str]:
    """A local file with the content of `path` while the block runs: the path itself, or the object downloaded
    (cached while its size and ETag stay the same, and kept while a block uses it). A missing object is a
    FileNotFoundError naming it; with `pinned` (from `version`), one written since is Changed. (Written while
    the block reads it, it is not: a reader that must know checks `version` again after it.)"""
    if not is_uri(path):
        if pinned is not None and version(path) != pinned:
            raise Changed(f"{path} was written since its version {pinned} was taken")
        yield str(path)
        return
    got, local = _downloads.pin(str(path), pinned)
    try:
        yield str(local)
    finally:
        _downloads.release(got)
