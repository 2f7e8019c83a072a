"""Where a study lives: a local folder, or a URI on an object store (``s3://``, ``gs://``, ...).

``Store`` is one pyarrow file system and a path in it, made from what ``--storage`` says: a
folder, or any URI that ``pyarrow.fs.FileSystem.from_uri`` resolves, query options included
(``s3://bucket/results?endpoint_override=HOST:PORT&scheme=http`` for an S3-compatible server;
credentials from the provider's usual chain: environment, profile, instance role). Ray Tune is
handed the same URI and stores the trials, their checkpoints and its experiment state there.

A study on a store is written by its driver through a ``Mirror``: the driver keeps the study's
own files (study.json, the heartbeat, ``runs/<run>/``) in a local folder, exactly as for a local
study, and the mirror puts each file it wrote into the store, whole, in one write (an object
store has no rename and no append): at each checkpoint a run keeps, each heartbeat, each
trial's end and the driver's end. A run's checkpoints are copied inside the store (from Ray's
copy to ``runs/<run>/checkpoints/step-<k>/``), never through the driver's disk.

Readers (``liftplace status``, ``analysis/make_all.py``, ``liftplace export``, ``load_student``)
read a study on a store from a local copy of its rows (``local_copy``), refreshed on each read:
a file unchanged in the store (same size and time) is not fetched again. Checkpoints are fetched
only where asked for (the report's figures need the final ones).

Inputs on a store (``teacher.name``, ``data.spec=folder:URI``, ``eval.extractor_weights``, a
checkpoint for ``load_student``) are copied once per machine (``input_copy``).

The local copies live under ``$LIFTPLACE_CACHE`` (default ``~/.cache/liftplace``): in
``stores/<digest of the URI>/``, ``driver/<study>`` for a driver and ``read/<study>`` for
readers; inputs in ``inputs/<key>/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
import urllib.parse
from pathlib import Path, PurePosixPath

from liftplace import files

# The files of a study that are the driver's own (Ray's trial folders and experiment state are
# Ray's): what a driver or a reader copies from a store. checkpoints/ only where asked for.
OWN_TOP = ("study.json", "driver.heartbeat", "driver.json")
UNSENT = ".unsent"  # in a driver's mirror: what it wrote could not all be put into the store
RUNS = "runs"
CHECKPOINTS = "checkpoints"


class StoreError(OSError):
    """The store could not be written while a study ran (said in one line)."""


def is_uri(where) -> bool:
    return "://" in str(where)


def cache_root() -> Path:
    # resolved: the mirror's folder is compared with the paths written under it (a symlink in
    # the way would hide every write from the mirror)
    return Path(os.environ.get("LIFTPLACE_CACHE") or Path.home() / ".cache" / "liftplace").expanduser().resolve()


# A URI's credentials, KEY:SECRET@ (a secret may hold '/' or '+'): up to the last '@' before
# the query.
_SECRET = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:/?#@\s]+:)[^?#\s]*@")


def shown(uri: str) -> str:
    """A URI (or a text holding one) as printed: a password (``s3://KEY:SECRET@bucket``) as ***."""
    return _SECRET.sub(r"\1***@", str(uri))


class Store:
    """A folder of a file system: ``fs`` (pyarrow) and ``root`` (a path in it); ``uri`` says it
    to Ray and to other processes (a local folder's absolute path, or the URI as given)."""

    def __init__(self, where: str | Path, what: str = "--storage"):
        import pyarrow.fs as pafs

        where, self.what = str(where), what
        if is_uri(where) and where.split("://", 1)[0].lower() == "file":
            where = urllib.parse.unquote(urllib.parse.urlsplit(where).path)
        if is_uri(where) and "/" in urllib.parse.urlsplit(where).query:
            raise ValueError(f"{what} {shown(where)}: a path after the query options; the path goes before "
                             "the '?' (s3://bucket/results/study?endpoint_override=...)")
        if is_uri(where):
            # Opened on first use (pyarrow asks S3 for a bucket's region then): a plan reads nothing.
            self.uri, self.local, self._fs, self._root = where, False, None, None
            return
        path = Path(where).expanduser().resolve()
        self._fs, self._root, self.uri, self.local = pafs.LocalFileSystem(), str(path), str(path), True

    def _open(self) -> None:
        import pyarrow.fs as pafs

        if self._fs is None:
            try:
                self._fs, root = pafs.FileSystem.from_uri(self.uri)
            except Exception as err:  # noqa: BLE001 -- pyarrow's errors: OSError, ValueError, ArrowInvalid
                raise ValueError(f"{self.what} {self.shown}: not a store pyarrow can open ({_one_line(err)})") from None
            self._root = root.rstrip("/")

    @property
    def fs(self):
        self._open()
        return self._fs

    @property
    def root(self) -> str:
        self._open()
        return self._root

    def __repr__(self) -> str:
        return f"Store({self.shown})"

    @property
    def shown(self) -> str:
        return shown(self.uri)

    @property
    def name(self) -> str:
        return PurePosixPath(self._root if self.local else urllib.parse.urlsplit(self.uri).path.rstrip("/")).name

    def child(self, name: str) -> Store:
        """The store of a folder inside this one (a study in its storage)."""
        store = Store(self.uri_of(name), self.what)
        if not self.local and self._fs is not None:
            store._fs, store._root = self._fs, self.path(name)
        return store

    def parent_uri(self) -> str:
        """The URI (a local folder's path) of the folder that holds this one."""
        if self.local:
            return str(Path(self._root).parent)
        parts = urllib.parse.urlsplit(self.uri)
        return urllib.parse.urlunsplit(parts._replace(path=str(PurePosixPath(parts.path.rstrip("/")).parent)))

    def path(self, rel: str = "") -> str:
        """The file system's path of ``rel`` (a POSIX path relative to the store's root)."""
        return f"{self.root}/{rel}".rstrip("/") if rel else self.root

    def uri_of(self, rel: str = "") -> str:
        """The URI of ``rel``, query options kept (for Ray, workers, and readers elsewhere)."""
        if self.local:
            return str(Path(self._root, rel)) if rel else self._root
        parts = urllib.parse.urlsplit(self.uri)
        path = parts.path.rstrip("/") + ("/" + rel.strip("/") if rel else "")
        return urllib.parse.urlunsplit(parts._replace(path=path))

    def rel(self, path: str) -> str | None:
        """``path`` (of this file system) relative to the root; None: not inside it."""
        path, root = str(path).rstrip("/"), self.root
        if path == root:
            return ""
        return path[len(root) + 1:] if path.startswith(root + "/") else None

    # -- reading and writing one file ------------------------------------------------------
    def info(self, rel: str = ""):
        return self.fs.get_file_info(self.path(rel))

    def exists(self, rel: str = "") -> bool:
        import pyarrow.fs as pafs

        return self.info(rel).type != pafs.FileType.NotFound

    def is_dir(self, rel: str = "") -> bool:
        import pyarrow.fs as pafs

        return self.info(rel).type == pafs.FileType.Directory

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as handle:
            return handle.read()

    def write_bytes(self, rel: str, data: bytes) -> None:
        """One file, whole: a local one is written under a temporary name and renamed into
        place; an object is put in one write (readers see the old object or the new one)."""
        if self.local:
            target = Path(self.path(rel))
            target.parent.mkdir(parents=True, exist_ok=True)
            files.atomic_write(target, lambda tmp: tmp.write_bytes(data))
            return
        with self.fs.open_output_stream(self.path(rel)) as handle:
            handle.write(data)

    def listing(self, rel: str = "", recursive: bool = True) -> dict[str, tuple[int, int]]:
        """Every file under ``rel``: {path relative to the root: (size, modified ns)}."""
        import pyarrow.fs as pafs

        found = self.fs.get_file_info(pafs.FileSelector(self.path(rel), recursive=recursive, allow_not_found=True))
        return {self.rel(f.path): (f.size, f.mtime_ns or 0) for f in found if f.type == pafs.FileType.File}

    def copy_tree(self, source: str, rel: str) -> None:
        """Copy the folder ``source`` (a path of this file system) to ``rel``, file by file
        (on an object store, each copy is done by the store)."""
        import pyarrow.fs as pafs

        found = self.fs.get_file_info(pafs.FileSelector(source, recursive=True))
        for f in found:
            if f.type == pafs.FileType.File:
                self.fs.copy_file(f.path, self.path(f"{rel}/{f.path[len(source.rstrip('/')) + 1:]}"))

    def delete_tree(self, rel: str) -> None:
        if self.is_dir(rel):
            self.fs.delete_dir(self.path(rel))

    # -- checks ---------------------------------------------------------------------------
    def check(self, what: str | None = None) -> None:
        """Refuse, in one line, a store that cannot be used: not a URI pyarrow opens, its
        bucket missing, no access (missing or wrong credentials), the server not answering, a
        file where the folder should be. Writes nothing."""
        import pyarrow.fs as pafs

        if self.local:
            return
        what = what or self.what
        self.what = what
        self._open()
        bucket = self.root.split("/", 1)[0]
        try:
            head = self.fs.get_file_info(bucket)
            here = self.fs.get_file_info(self.root) if head.type != pafs.FileType.NotFound else None
        except Exception as err:  # noqa: BLE001 -- pyarrow: OSError for network, access and credentials
            raise ValueError(f"{what} {self.shown}: cannot be read ({_one_line(err)})") from None
        if here is None:
            raise ValueError(f"{what} {self.shown}: the bucket {bucket!r} does not exist (create it first)")
        if here.type == pafs.FileType.File:
            raise ValueError(f"{what} {self.shown}: is a file, not a folder")


def _one_line(err: BaseException) -> str:
    return shown(" ".join(str(err).split()))[:300]  # no secret from a URI in an error


def open_store(where: str | Path, what: str = "--storage") -> Store:
    store = Store(where, what)
    store.check(what)
    return store


def _digest(uri: str) -> str:
    return hashlib.sha256(shown(uri).encode()).hexdigest()[:16]


# -- a driver's mirror ---------------------------------------------------------------------
class Mirror:
    """A study's files as its driver writes them: a local folder (``local``), each file put
    into the study's store (``store``) when ``flush`` is called; ``files`` reports every write
    under ``local`` (``files.written``). Registered while open.

    The store is written by one thread of its own, in the order asked (a checkpoint's copy
    before the flush that puts the row naming it; a flush takes the files' content when it is
    asked for), so that Tune's callbacks, where the driver asks, never wait on the store. An
    error there is raised by the next call, and by the end of the ``with``."""

    def __init__(self, store: Store, local: Path):
        from concurrent.futures import ThreadPoolExecutor

        self.store, self.local = store, Path(local).resolve()
        self.dirty: set[Path] = set()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="liftplace-store")
        self.pending: list = []
        self.failed: Exception | None = None

    def __enter__(self) -> Mirror:
        files.MIRRORS[self.local] = self
        return self

    def __exit__(self, kind, error, trace) -> None:
        try:
            self.flush()
            self.wait()
        except StoreError as err:
            if kind is None:
                raise
            print(f"storage: {err}", file=sys.stderr)  # the driver is ending on an error already, said
        finally:
            files.MIRRORS.pop(self.local, None)
            self.pool.shutdown(wait=True)

    def changed(self, path: Path) -> None:
        self.dirty.add(Path(path))

    def _submit(self, job, *args) -> None:
        self.pending = [f for f in self.pending if not f.done()]
        self.pending.append(self.pool.submit(self._run, job, *args))

    def _run(self, job, *args) -> None:
        """One job of the store's thread. After a failure nothing more is put (a row must not
        reach the store after a checkpoint it names failed to): said once, in one line; the
        files stay in the local folder, marked, and the next driver's ``pull`` puts them first."""
        if self.failed is not None:
            return
        try:
            job(*args)
        except Exception as err:  # noqa: BLE001 -- the store's errors: OSError, pyarrow's
            self.failed = err
            (self.local / UNSENT).write_text(_one_line(err) + "\n")
            print(f"storage: {self._failure()}; the study goes on, its files kept here", file=sys.stderr)

    def _failure(self) -> str:
        return (f"putting files into {self.store.shown} failed ({_one_line(self.failed)}); they are in {self.local}, "
                "and --resume on this machine puts them there first")

    def wait(self) -> None:
        """Until everything asked for is in the store; StoreError if something could not be."""
        pending, self.pending = self.pending, []
        for future in pending:
            future.result()
        if self.failed is not None:
            raise StoreError(self._failure())

    def flush(self) -> None:
        """Put every file written since the last flush into the store, whole, as it is now."""
        batch = {}
        while self.dirty:
            path = self.dirty.pop()
            if path.is_file():
                batch[path.relative_to(self.local).as_posix()] = path.read_bytes()
        if batch:
            self._submit(self._put, batch)

    def _put(self, batch: dict[str, bytes]) -> None:
        for rel, data in batch.items():
            self.store.write_bytes(rel, data)

    def keep(self, source: str, rel: str) -> None:
        """A checkpoint Ray stored (``source``: its path in the store's file system, or in the
        local mirror for one staged here) copied to ``rel``; a step kept again replaces it."""
        self._submit(self._copy, self._store_path(source), rel)

    def _copy(self, inside: str, rel: str) -> None:
        self.store.delete_tree(rel)
        self.store.copy_tree(inside, rel)

    def holds(self, source) -> bool:
        """Whether the checkpoint folder ``source`` (as for ``keep``) is there."""
        import pyarrow.fs as pafs

        return self.store.fs.get_file_info(self._store_path(str(source))).type == pafs.FileType.Directory

    def _store_path(self, source: str) -> str:
        try:
            return self.store.path(Path(source).relative_to(self.local).as_posix())
        except ValueError:
            return str(source)

    def pull(self) -> None:
        """Make the local folder hold what the store holds of the study's own files (its rows,
        not its checkpoints), for a driver that resumes it (here or on another machine). Files
        an earlier driver here could not put there (marked UNSENT) are put there first."""
        if (self.local / UNSENT).is_file():
            for path in sorted(self.local.rglob("*")):
                rel = path.relative_to(self.local).as_posix()
                if path.is_file() and _wanted(rel, None):
                    self.store.write_bytes(rel, path.read_bytes())
            (self.local / UNSENT).unlink()
        for name in (*OWN_TOP, RUNS):
            target = self.local / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        _fetch(self.store, self.local, checkpoints=None)


def driver_mirror(store: Store) -> Path:
    """The local folder a driver writes a study on a store through (``Mirror``)."""
    return cache_root() / "stores" / _digest(store.uri) / "driver" / store.name


def mirror_for(path: str | Path) -> Mirror | None:
    """The open mirror whose local folder holds ``path`` (None: a plain local file)."""
    path = Path(path).absolute()
    for root, mirror in list(files.MIRRORS.items()):
        if path == root or root in path.parents:
            return mirror
    return None


def settle(path: str | Path) -> None:
    """Put what was written under ``path``'s mirror into the store, and wait until it is there."""
    mirror = mirror_for(path)
    if mirror is not None:
        mirror.flush()
        mirror.wait()


def sync(path: str | Path) -> None:
    """Put what was written under ``path``'s mirror into the store now (nothing: not mirrored)."""
    mirror = mirror_for(path)
    if mirror is not None:
        mirror.flush()


# -- readers' local copies -----------------------------------------------------------------
def _wanted(rel: str, checkpoints) -> bool:
    """A study's own file: its top files and its run folders' files (``checkpoints`` None), or
    a file of one of ``checkpoints`` ({(run, step-<k>)})."""
    parts = rel.split("/")
    if checkpoints is not None:
        return len(parts) > 4 and parts[0] == RUNS and parts[2] == CHECKPOINTS and (parts[1], parts[3]) in checkpoints
    if len(parts) == 1:
        return parts[0] in OWN_TOP
    return parts[0] == RUNS and len(parts) == 3


def _fetch(store: Store, local: Path, checkpoints, previous: Path | None = None, old: dict | None = None) -> dict:
    """Copy a study's own files from ``store`` into ``local`` (``_wanted``). A file whose
    (size, time) equals ``old``'s is taken from ``previous`` instead. Returns the listing."""
    listing = {rel: meta for rel, meta in store.listing().items() if _wanted(rel, checkpoints)}
    for rel, meta in listing.items():
        target = local / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if previous is not None and old and old.get(rel) == list(meta) and (previous / rel).is_file():
            os.link(previous / rel, target)  # unchanged in the store: the last copy's file
        else:
            target.write_bytes(store.read_bytes(rel))
    return listing


def reader_copy(uri: str, purpose: str = "read") -> Path:
    """Where ``local_copy`` keeps its copy of a study on a store (one per purpose: `liftplace
    status --watch` refreshing its copy never pulls the analysis's from under it)."""
    store = Store(uri)
    return cache_root() / "stores" / _digest(store.uri) / purpose / store.name


def local_copy(where: str | Path, *, checkpoints=None, what: str = "study", purpose: str = "read") -> Path:
    """A folder to read a study (or a run folder) from: ``where`` itself when local; for a URI,
    a local copy of its rows (and the checkpoints that ``checkpoints(copy)`` names,
    {(run, step-<k>)}: ``results.final_checkpoints`` for each run's last), made anew on each
    call but fetching only files that changed in the store since the last."""
    if not is_uri(where):
        return Path(where)
    store = open_store(where, what)
    if not store.exists():
        raise FileNotFoundError(f"{what} {store.shown}: nothing there")
    current = reader_copy(store.uri, purpose)
    base, manifest = current.parent, current.parent / f".{store.name}.listing.json"
    base.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    fresh = base / f".{store.name}.{os.getpid()}.{time.monotonic_ns()}"
    fresh.mkdir()
    try:
        with FileLock(str(base / f".{store.name}.lock")):  # two readers at once (status --watch, make_all)
            try:
                old = json.loads(manifest.read_text())
            except (OSError, ValueError):
                old = {}
            listing = _fetch(store, fresh, None, current, old)
            if checkpoints is not None:
                listing.update(_fetch(store, fresh, checkpoints(fresh), current, old))
            stale = base / f".{store.name}.old.{os.getpid()}"
            if current.exists():
                current.rename(stale)
            fresh.rename(current)
            shutil.rmtree(stale, ignore_errors=True)
            files.write_text(manifest, json.dumps({k: list(v) for k, v in listing.items()}))
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
    return current


def put_tree(local: str | Path, store: Store, rel: str) -> None:
    """Put a local folder's files (a report, an export) into ``store`` under ``rel``."""
    local = Path(local)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        name = path.relative_to(local).as_posix()
        store.write_bytes(f"{rel}/{name}" if rel else name, path.read_bytes())


def input_copy(uri: str, what: str = "input") -> Path:
    """A local copy of a folder or file on a store (a teacher, a data folder, extractor
    weights, a checkpoint), made once per machine and shared by every process on it: kept under
    ``<cache>/inputs/`` by a key of the URI and each file's size and time (a changed file is a
    new copy), written under a lock by the first process that needs it, the others waiting."""
    from filelock import FileLock
    import pyarrow.fs as pafs

    store = open_store(uri, what)
    head = store.info()
    if head.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{what} {store.shown}: nothing there")
    listing = {"": (head.size, head.mtime_ns or 0)} if head.type == pafs.FileType.File else store.listing()
    key = hashlib.sha256(json.dumps([shown(store.uri), sorted(listing.items())]).encode()).hexdigest()[:24]
    base = cache_root() / "inputs"
    base.mkdir(parents=True, exist_ok=True)
    target = base / key / store.name
    with FileLock(str(base / f"{key}.lock")):
        if not target.parent.is_dir():
            staging = base / f".{key}.{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            try:
                for rel in listing:
                    path = staging / store.name / rel if rel else staging / store.name
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(store.read_bytes(rel))
                staging.rename(target.parent)  # whole, or not at all
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return target
