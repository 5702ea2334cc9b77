"""Opening a producer's file without following it anywhere: no links, only regular files.

Whoever drops files into the watched directory is not trusted, and a symbolic link is a
file that says "read that instead": a link to `/proc/self/environ` or to the product's
`.env` would upload the service's own secrets, and a link swapped in between a sensor
tick and its run would be followed by a plain `open()`. So a file below a root (the
watched directory, the error directory) is opened by walking from the root one
component at a time with `O_NOFOLLOW`: a link anywhere on the way, or a final name that
is not a regular file (a FIFO, a device), fails that file with the reason. What is read
is then the opened descriptor, so the check and the read are the same file. A file with
a second hard link is refused as well: its other name may be anywhere on the file system.

A path outside every root was named by the operator on the command line (`s3proc
process /tmp/x.csv`): it is read as named, but its last component is still never a link.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from s3proc_dagster.errors import UnsafeSourceError

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)
# A file with this many bytes of holes (never written, nothing on disk) is refused: it
# would cost its apparent size in staging and upload while its producer paid nothing.
SPARSE_MIN_HOLE_BYTES = 64 * 1024 * 1024


def lexically_below(path: Path | str, root: Path | str) -> str | None:
    """`path` relative to `root` by spelling alone (`..` folded, no link resolved), or None."""
    normal = Path(os.path.normpath(os.path.abspath(path)))
    try:
        rel = normal.relative_to(os.path.normpath(os.path.abspath(root)))
    except ValueError:
        return None
    return rel.as_posix() if rel.parts else None


def _refused(display: str, exc: OSError) -> OSError | UnsafeSourceError:
    """ELOOP is what O_NOFOLLOW answers for a link; any other error stays what it is."""
    if exc.errno == errno.ELOOP:
        return UnsafeSourceError(f"{display}: is (or passes through) a symbolic link; links are never followed")
    return exc


def _open_below(root: Path, rel: str, display: str) -> int:
    parts = PurePosixPath(rel).parts
    fd = os.open(root, _DIR_FLAGS)
    try:
        for part in parts[:-1]:
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except NotADirectoryError as exc:  # what O_DIRECTORY|O_NOFOLLOW answers for a link to a folder
                if stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
                    raise _refused(display, OSError(errno.ELOOP, "link")) from None
                raise exc from None
            except OSError as exc:
                raise _refused(display, exc) from None
            os.close(fd)
            fd = child
        try:
            return os.open(parts[-1], _OPEN_FLAGS, dir_fd=fd)
        except OSError as exc:
            raise _refused(display, exc) from None
    finally:
        os.close(fd)


def open_fd(path: Path | str, roots: tuple[Path, ...] = ()) -> int:
    """A descriptor on the regular file `path`, opened without following links (see the module).

    Raises UnsafeSourceError for a link or a non-regular file, FileNotFoundError when it
    is not there (the callers tell "gone" from "refused").
    """
    display = str(path)
    fd, below_root = -1, False
    for root in roots:
        rel = lexically_below(path, root)
        if rel is not None:
            fd, below_root = _open_below(Path(root), rel, display), True
            break
    else:
        try:
            fd = os.open(os.path.normpath(os.path.abspath(path)), _OPEN_FLAGS)
        except OSError as exc:
            raise _refused(display, exc) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafeSourceError(f"{display}: not a regular file (only regular files are processed)")
    if below_root and st.st_nlink > 1:
        # A hard link is the same file under another name, which may be anywhere on the
        # same file system (a producer's link to a file it may read but should not ship).
        os.close(fd)
        raise UnsafeSourceError(
            f"{display}: has {st.st_nlink} hard links, and another name may lie outside the watched "
            "directory; hard links are refused (copy the file in instead)"
        )
    return fd


@contextlib.contextmanager
def open_regular(path: Path | str, roots: tuple[Path, ...] = ()) -> Iterator[BinaryIO]:
    """`open_fd` as a binary file object, closed on exit."""
    with os.fdopen(open_fd(path, roots), "rb") as readable:
        yield readable


def confined_path(path: Path | str, root: Path | str) -> Path | None:
    """`path` if it lies below `root` through real folders only (no folder on the way a
    link), else None: what may be moved, or created, without landing where a link points."""
    rel = lexically_below(path, root)
    if rel is None:
        return None
    top = Path(os.path.normpath(os.path.abspath(root)))
    current = top
    for part in PurePosixPath(rel).parts[:-1]:
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            break  # nothing exists from here on, so nothing on the way is a link
        if stat.S_ISLNK(mode):
            return None
        if not stat.S_ISDIR(mode):
            break  # a file in the way: whoever creates below it gets the system's own error
    return top / rel


def is_regular(path: Path | str) -> bool:
    """Whether `path` itself (not what a link points to) is a regular file."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def check_size(readable: BinaryIO, display: str, max_bytes: int) -> int:
    """The open file's size, refused over `max_bytes` or when mostly holes (a sparse file)."""
    fd = readable.fileno()
    size = os.fstat(fd).st_size
    if size > max_bytes:
        raise UnsafeSourceError(f"{display}: {size:,} bytes is over MAX_FILE_BYTES ({max_bytes:,})")
    holes = hole_bytes(fd, size)
    if holes >= SPARSE_MIN_HOLE_BYTES and holes * 2 > size:
        raise UnsafeSourceError(
            f"{display}: a sparse file ({holes:,} of its {size:,} bytes are holes that were never written); "
            "sparse files are refused"
        )
    return size


def hole_bytes(fd: int, size: int) -> int:
    """Bytes of `fd` that are holes, by SEEK_DATA/SEEK_HOLE (0 where the system cannot say)."""
    if not hasattr(os, "SEEK_HOLE"):
        return 0
    holes, offset = 0, 0
    try:
        while offset < size:
            try:
                data = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole from here to the end
                    holes += size - offset
                    break
                raise
            holes += data - offset
            offset = os.lseek(fd, data, os.SEEK_HOLE)
    except OSError:
        return 0
    finally:
        os.lseek(fd, 0, os.SEEK_SET)
    return holes
