"""Files and folders only the product's own user can read.

`.env` holds the S3 keys; `progress.db` every file's path, S3 key and error text; the
staging area a copy of every file being processed. Each is created with its final mode
(`os.open`/`mkdir` with the mode, or a umask set before), never written 0644 and
chmod-ed after: in between, another user could open it and keep reading through the
descriptor whatever the mode becomes.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700
#: A run worker's umask: what pyarrow, DuckDB and the archive extraction create is
#: 0600 (files) and 0700 (folders) without each of them being told.
PRIVATE_UMASK = 0o077
_GROUP_AND_OTHER = 0o077


def write_new_private_file(path: Path, text: str) -> bool:
    """Write `text` to `path`, 0600 from its creation; False, and `path` left as it is,
    when it exists already (`O_EXCL`: no check-then-write race)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as out:
        out.write(text)
    return True


def ensure_private_file(path: Path) -> None:
    """Make `path` exist readable by its owner only: created empty and 0600, or, when an
    earlier version of the product left it readable by others, tightened."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE))
    except FileExistsError:
        tighten(path)


def tighten(path: Path) -> None:
    """Take group and other permissions away from `path`, if it is there and ours
    (another user's file is not ours to change, and chmod would fail anyway)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return
    if info.st_uid == os.getuid() and info.st_mode & _GROUP_AND_OTHER:
        os.chmod(path, stat.S_IMODE(info.st_mode) & ~_GROUP_AND_OTHER)


def make_private_dir(path: Path, tighten_existing: bool = False) -> Path:
    """Create `path`, and each missing folder above it, 0700 (`mkdir -p` would make the
    parents 0755). An existing folder keeps its mode unless `tighten_existing`: a
    configured directory may be shared, while a folder the product names (a staged
    version) is the product's and may be an older, wider one."""
    missing = []
    for folder in (path, *path.parents):
        if folder.is_dir():
            break
        missing.append(folder)
    for folder in reversed(missing):
        folder.mkdir(mode=PRIVATE_DIR_MODE, exist_ok=True)  # exist_ok: a concurrent run made it
    if tighten_existing and not missing:
        tighten(path)
    return path


@contextmanager
def private_umask() -> Iterator[None]:
    """Everything created inside is readable by the owner only; the umask before is restored."""
    previous = os.umask(PRIVATE_UMASK)
    try:
        yield
    finally:
        os.umask(previous)
