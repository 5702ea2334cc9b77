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

Moving and deleting a producer's file (parking, `s3proc retry`, `after_success`) go the
same way (`move_below`, `unlink_below`): through descriptors of the folders that hold the
file and its target, each reached from its root without following a link. A check of the
path a moment before (`confined_path`) is not enough: a producer can swap a folder for a
link between that check and a `rename()` of the path, which follows it, and move or delete
a file of the same name anywhere the service can write.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from s3proc_dagster.errors import UnsafeSourceError

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)
_ROOT_FLAGS = _DIR_FLAGS & ~os.O_NOFOLLOW  # a root is the operator's setting, which may be a link
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


def _open_folder(root: Path, folders: tuple[str, ...], display: str, create: bool = False) -> int:
    """A descriptor on `root/folders...`, each folder opened from the one above it with
    O_NOFOLLOW, so a link on the way is refused; missing folders are made when `create`."""
    fd = os.open(root, _ROOT_FLAGS)
    try:
        for part in folders:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, dir_fd=fd)
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
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_below(root: Path, rel: str, display: str) -> int:
    parts = PurePosixPath(rel).parts
    fd = _open_folder(root, parts[:-1], display)
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


@contextlib.contextmanager
def _folder_of(path: Path | str, root: Path | str, create: bool = False) -> Iterator[tuple[int, str]]:
    """(a descriptor on the folder holding `path`, reached from `root` as `_open_folder` does;
    `path`'s last component), the descriptor closed on exit."""
    rel = lexically_below(path, root)
    if rel is None:
        raise UnsafeSourceError(f"{path}: not below {root}")
    parts = PurePosixPath(rel).parts
    if create:
        Path(root).mkdir(parents=True, exist_ok=True)
    fd = _open_folder(Path(root), parts[:-1], str(path), create)
    try:
        yield fd, parts[-1]
    finally:
        os.close(fd)


def _regular_in(fd: int, name: str, display: str) -> os.stat_result:
    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeSourceError(f"{display}: not a regular file; it is not moved or deleted")
    return st


def move_below(source: Path | str, source_root: Path | str, target: Path | str, target_root: Path | str) -> None:
    """Move the regular file `source`, below `source_root`, to `target`, below `target_root`
    (its missing folders made), never through a link (see the module): UnsafeSourceError
    when a link is on either way. A rename where it can be; across file systems a copy
    under a temporary name renamed into place before the source goes, so a crash leaves
    the source whole, never half a file at the target."""
    with _folder_of(source, source_root) as (sfd, sname), _folder_of(target, target_root, True) as (tfd, tname):
        _regular_in(sfd, sname, str(source))
        try:
            os.rename(sname, tname, src_dir_fd=sfd, dst_dir_fd=tfd)
            return
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
        partial = f".{tname}.s3proc-partial"
        writing = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        with (
            os.fdopen(os.open(sname, _OPEN_FLAGS, dir_fd=sfd), "rb") as readable,
            os.fdopen(os.open(partial, writing, 0o600, dir_fd=tfd), "wb") as out,
        ):
            shutil.copyfileobj(readable, out, 1 << 20)
            st = os.fstat(readable.fileno())
            os.fchmod(out.fileno(), stat.S_IMODE(st.st_mode))
            os.utime(out.fileno(), ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(partial, tname, src_dir_fd=tfd, dst_dir_fd=tfd)
        os.unlink(sname, dir_fd=sfd)


def unlink_below(path: Path | str, root: Path | str) -> None:
    """Delete the regular file `path`, below `root`, never through a link (see the module)."""
    with _folder_of(path, root) as (fd, name):
        _regular_in(fd, name, str(path))
        os.unlink(name, dir_fd=fd)


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
