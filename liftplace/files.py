"""Result files written so that a crash never leaves a half-written one in place.

Each file is written beside its destination under a hidden temporary name and renamed over it
(``os.replace`` is atomic on one file system): readers see the old file or the new one. A write
that fails removes its temporary file, so no debris is left for a later run to trip over.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

# Local folders that mirror a study on an object store (liftplace.storage.Mirror), by folder:
# each file written under one is reported to it (``written``), and put into the store at its
# next flush. Empty unless a driver runs a study on a store.
MIRRORS: dict[Path, object] = {}


def written(path: str | Path) -> None:
    """Say that ``path`` was written (replaced, or appended to): a mirror holding it puts it
    into its store at its next flush."""
    if not MIRRORS:
        return
    path = Path(path).absolute()
    for root, mirror in list(MIRRORS.items()):
        if root in path.parents:
            mirror.changed(path)


def temp_path(path: Path) -> Path:
    """Where path is written before it is renamed into place (hidden: ``.<name>.tmp``)."""
    return path.with_name(f".{path.name}.tmp")


def stage(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Write path's new content to its temporary file with write(tmp); returns the temporary
    path (rename it into place with commit). A failed write leaves no temporary file."""
    tmp = temp_path(Path(path))
    try:
        write(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def commit(tmp: Path, path: str | Path) -> None:
    try:
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    written(path)


def write_all(directory: str | Path, writers: dict[str, Callable[[Path], object]]) -> None:
    """Write several files of one folder as a unit, as far as renames allow: every file is
    staged first and renamed into place only once all are written, in the writers' order (put
    the file that marks the set complete last). A failed write leaves the folder as it was and
    no temporary files; a failed rename removes the temporary files not yet renamed."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[Path, Path]] = []
    try:
        for name, write in writers.items():
            staged.append((stage(directory / name, write), directory / name))
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for i, (tmp, path) in enumerate(staged):
        try:
            commit(tmp, path)
        except BaseException:
            for left, _ in staged[i + 1:]:
                left.unlink(missing_ok=True)
            raise


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """Replace path with what write(tmp) writes to a temporary file, or leave it untouched."""
    commit(stage(path, write), path)


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def make_folder(path: str | Path, what: str) -> Path:
    """Create a results folder (and its parents) and prove it writable (check_writable);
    ValueError names the folder and why not (a file in the way, no permission, a full disk)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{what} {path} cannot be written: {err.strerror or err}") from None
    check_writable(path, what)
    return path


def check_writable(path: str | Path, what: str) -> None:
    """Prove that a folder could be created and written, writing nothing that stays: the
    nearest existing ancestor must be a folder in which a probe file of one page (4 KiB, so
    that a full disk fails here and not after Ray has started) can be written (and is removed).
    ValueError names the folder and why not."""
    path = Path(path).absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what} {path} cannot be written: {existing} is not a folder")
    probe = existing / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(bytes(4096))
        probe.unlink()
    except OSError as err:
        probe.unlink(missing_ok=True)
        raise ValueError(f"{what} {path} cannot be written: {err.strerror or err}") from None


def read_json_object(file: str | Path, what: str) -> dict:
    """A JSON file holding one object; ValueError "<what> <file>: ..." when it is not valid JSON
    or not an object (teacher and pipeline configs are read so)."""
    try:
        data = json.loads(Path(file).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {file}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {file}: not a JSON object")
    return data


def digest_files(root: str | Path, paths: list[Path]) -> str:
    """SHA-256 over files (each one's name relative to root, then its content), in sorted order.
    A JSON file counts by what it says, not how it is laid out (keys sorted, no whitespace), so
    that a config rewritten with other indentation is the same config."""
    root, digest = Path(root), hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        if path.suffix == ".json":
            try:
                digest.update(json.dumps(json.loads(path.read_text()), sort_keys=True).encode())
                continue
            except ValueError:
                pass  # not valid JSON: its bytes
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
