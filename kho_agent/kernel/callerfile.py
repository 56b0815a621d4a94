"""Files someone else names: a kernel image or initrd from a D-Bus caller, a blob or core file on
the command line, the agent's own state file. Any of them can be a FIFO (an open for reading
blocks until a writer comes), a device (`/dev/zero` never ends; opening `/dev/watchdog` arms
it), a directory, a 2 GB sparse file, or be swapped for one of those between a check and a read.

So a named file is first opened with O_PATH (no open of the object itself: no blocking, no device
side effect), checked to be a regular file, and only then opened for reading through that same
handle (`/proc/self/fd/N` reopens the very inode that was checked). Its size is known before any
read, and a reader states the bound its format allows. A file descriptor that a caller passes
instead of a path gets the same checks.

Every refusal is an AgentError with a documented name: NotFound, PermissionDenied, or
InvalidArgument (not a regular file, too large, empty, unreadable with its errno). A directory
someone names (/boot for Target=newest-compatible) is listed with the same refusals, bounded.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from ..errors import AgentError, InvalidArgument, NotFound, PermissionDenied, errno_text

PATH_MAX = 4096  # the kernel's limit on a path given to open(2), NUL included

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"))


def file_kind(mode: int) -> str:
    """What a non-regular file is, for messages."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def _describe(what: str, name: str) -> str:
    return f"{what} {name}" if what else name


def _os_error(exc: OSError, what: str, name: str) -> AgentError:
    where = _describe(what, name)
    code = exc.errno or errno.EIO
    if code in (errno.ENOENT, errno.ENOTDIR):
        return NotFound(f"{where} does not exist")
    if code in (errno.EACCES, errno.EPERM):
        return PermissionDenied(f"{where} cannot be opened: {errno_text(code)}")
    return InvalidArgument(f"{where} cannot be opened: {errno_text(code)}")


@dataclass(frozen=True)
class FileIdentity:
    """Which file, in which version: a cache key that changes when the file does."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int


class RegularFile:
    """An open regular file with its size; read with bounds, close when done (or use `with`)."""

    def __init__(self, fd: int, name: str, what: str, st: os.stat_result) -> None:
        self.fd = fd
        self.name = name
        self.what = what
        self.size = st.st_size
        self.identity = FileIdentity(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                                     st.st_ctime_ns)

    def __repr__(self) -> str:
        return f"RegularFile({self.name!r}, fd={self.fd}, size={self.size})"

    @property
    def label(self) -> str:
        return _describe(self.what, self.name)

    def resolved_path(self) -> str:
        """Where the open file lives in this mount namespace (for records); the given name when
        /proc cannot tell."""
        try:
            return os.readlink(f"/proc/self/fd/{self.fd}")
        except OSError:
            return self.name

    def check_size(self, limit: int, *, allow_empty: bool = False) -> None:
        if self.size > limit:
            raise InvalidArgument(f"{self.label} has {self.size} bytes, more than the "
                                  f"{limit} this input can be ({_human(limit)})")
        if self.size == 0 and not allow_empty:
            raise InvalidArgument(f"{self.label} is empty")

    def read_at(self, offset: int, length: int) -> bytes:
        """Up to `length` bytes at `offset` (fewer at the end of the file); never more."""
        chunks: list[bytes] = []
        while length > 0:
            try:
                chunk = os.pread(self.fd, min(length, 1 << 24), offset)
            except OSError as exc:  # errno_text reads an OSError without errno as EIO
                raise InvalidArgument(f"{self.label} cannot be read: "
                                      f"{errno_text(exc)}") from exc
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
            length -= len(chunk)
        return b"".join(chunks)

    def read_all(self, limit: int, *, allow_empty: bool = False) -> bytes:
        """The whole file, refused before any read when it is larger than `limit`. A file that
        grows while being read is cut at `limit` + 1 bytes and refused."""
        self.check_size(limit, allow_empty=allow_empty)
        data = self.read_at(0, limit + 1)
        if len(data) > limit:
            raise InvalidArgument(f"{self.label} grew past {limit} bytes while it was read")
        return data

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> RegularFile:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def check_path(path: str | os.PathLike[str], what: str) -> str:
    """A path as open(2) will take it: text, no NUL, not empty, at most PATH_MAX."""
    text = os.fspath(path)
    if not text:
        raise InvalidArgument(f"{what or 'path'}: an empty path")
    if "\0" in text:
        raise InvalidArgument(f"{_describe(what, repr(text))} contains a NUL byte")
    if len(os.fsencode(text)) >= PATH_MAX:
        raise InvalidArgument(f"{what or 'path'}: a path of {len(text)} characters is longer "
                              f"than the kernel's {PATH_MAX - 1}")
    return text


def open_regular(path: str | os.PathLike[str], what: str = "", *,
                 max_size: int | None = None, follow_symlinks: bool = True) -> RegularFile:
    """Open a named file for reading only if it is a regular file, without ever blocking and
    without opening anything else. `max_size` refuses a larger file before any read.
    `follow_symlinks=False` refuses a symbolic link at `path` itself (as "a symbolic link"),
    for a directory whose entries must be files of its own, not links to anyone's."""
    name = check_path(path, what)
    nofollow = 0 if follow_symlinks else os.O_NOFOLLOW
    try:
        # O_PATH | O_NOFOLLOW opens the link itself, which fstat then shows as a link
        handle = os.open(name, os.O_PATH | os.O_CLOEXEC | nofollow)
    except OSError as exc:
        raise _os_error(exc, what, name) from exc
    try:
        st = os.fstat(handle)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(f"{_describe(what, name)} is {file_kind(st.st_mode)}, not a "
                                  "regular file")
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
        try:
            fd = _reopen(handle, flags)
            if fd is None:  # no /proc: open by name, then prove it is the same inode
                fd = os.open(name, flags | nofollow)
                again = os.fstat(fd)
                if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino):
                    os.close(fd)
                    raise InvalidArgument(f"{_describe(what, name)} was replaced while it was "
                                          "opened; try again")
        except OSError as exc:
            raise _os_error(exc, what, name) from exc
    finally:
        os.close(handle)
    opened = RegularFile(fd, name, what, os.fstat(fd))
    if max_size is not None:
        try:
            opened.check_size(max_size, allow_empty=True)
        except AgentError:
            opened.close()
            raise
    return opened


def _reopen(handle: int, flags: int) -> int | None:
    """Open the inode behind an O_PATH handle for I/O; None when /proc is not mounted."""
    try:
        return os.open(f"/proc/self/fd/{handle}", flags)
    except FileNotFoundError:
        if os.path.isdir("/proc/self/fd"):
            raise  # /proc is there: the file itself went away
        return None


def list_directory(path: str | os.PathLike[str], what: str, max_entries: int) -> list[str]:
    """The names in a directory, unsorted, at most `max_entries` of them (more is
    InvalidArgument). One that cannot be listed is refused as an unreadable file is, by its
    errno (NotFound: ENOENT, ENOTDIR; PermissionDenied: EACCES, EPERM; InvalidArgument: any
    other), and the message names the directory and the errno. A FIFO or device of that name is
    not opened (opendir asks for a directory: ENOTDIR)."""
    name = check_path(path, what)
    where = _describe(what, name)
    names: list[str] = []
    try:
        with os.scandir(name) as entries:
            for entry in entries:
                names.append(entry.name)
                if len(names) > max_entries:
                    raise InvalidArgument(f"{where} has more than {max_entries} entries")
    except OSError as exc:
        code = exc.errno or errno.EIO
        message = f"{where} cannot be listed: {errno_text(code)}"
        if code in (errno.ENOENT, errno.ENOTDIR):
            raise NotFound(message) from exc
        if code in (errno.EACCES, errno.EPERM):
            raise PermissionDenied(message) from exc
        raise InvalidArgument(message) from exc
    return names


def adopt_fd(fd: int, name: str, what: str = "", *, max_size: int | None = None) -> RegularFile:
    """A descriptor a caller passed (the caller opened it, with its own rights): checked like a
    named file. Takes ownership of `fd` (closed on refusal)."""
    try:
        try:
            st = os.fstat(fd)
            mode = fcntl.fcntl(fd, fcntl.F_GETFL)
        except OSError as exc:
            code = exc.errno or errno.EBADF
            raise InvalidArgument(f"{_describe(what, name)}: the passed fd cannot be used: "
                                  f"{errno_text(code)}") from exc
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(f"{_describe(what, name)} is {file_kind(st.st_mode)}, not a "
                                  "regular file")
        if mode & os.O_PATH or (mode & os.O_ACCMODE) == os.O_WRONLY:
            raise InvalidArgument(f"{_describe(what, name)}: the passed fd is not open for "
                                  "reading")
        opened = RegularFile(fd, name, what, st)
        if max_size is not None:
            opened.check_size(max_size, allow_empty=True)
        return opened
    except AgentError:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike[str], what: str, limit: int, *,
                 allow_empty: bool = False, follow_symlinks: bool = True) -> bytes:
    """The whole of a named regular file of at most `limit` bytes."""
    with open_regular(path, what, max_size=limit, follow_symlinks=follow_symlinks) as opened:
        return opened.read_all(limit, allow_empty=allow_empty)


@dataclass(frozen=True)
class Dangling:
    """A symbolic link at the path whose target does not exist (what it points to)."""
    target: str


# A reader beside a writer that renames a file into place can find nothing at open time and
# the new file right after: that is the new file, read again (bounded).
WRITTEN_MEANWHILE_ATTEMPTS = 3


def read_if_present(path: str | os.PathLike[str], what: str, limit: int, *,
                    allow_empty: bool = False,
                    follow_symlinks: bool = True) -> bytes | Dangling | None:
    """read_regular() for a file that may be absent: None when nothing is at `path`, Dangling
    for a symbolic link to nothing. A file renamed into place between the open and the check
    is read, not taken for a dangling link."""
    for attempt in range(WRITTEN_MEANWHILE_ATTEMPTS):
        try:
            return read_regular(path, what, limit, allow_empty=allow_empty,
                                follow_symlinks=follow_symlinks)
        except NotFound:
            if not os.path.lexists(path):
                return None
            if os.path.islink(path) and not os.path.exists(path):
                try:
                    return Dangling(os.readlink(path))
                except OSError:
                    return Dangling("?")
            if attempt == WRITTEN_MEANWHILE_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def is_regular(path: Path) -> bool:
    """lstat-free check that does not follow into devices: True for a regular file (through
    symlinks), False for anything else or nothing."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _human(size: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift:
            return f"{size / (1 << shift):g} {unit}"
    return f"{size} bytes"
