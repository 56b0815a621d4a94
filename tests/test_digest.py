"""BLAKE3 digests of real files: memfds, pipes, procfs files, and fds that cannot be read."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

from kho_agent import digest as digest_mod
from kho_agent.digest import DIGEST_ALG, DIGEST_HEX_LENGTH, MULTITHREAD_MIN_BYTES, digest_fd
from kho_agent.errors import Busy, InvalidArgument, KernelRefused

REPO = Path(__file__).resolve().parent.parent

# BLAKE3 of the empty input, from the BLAKE3 specification's test vectors.
EMPTY_BLAKE3 = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("digest-test", os.MFD_CLOEXEC)
    yield fd
    os.close(fd)


def fill(fd: int, data: bytes) -> None:
    offset = 0
    while offset < len(data):
        offset += os.pwrite(fd, data[offset:], offset)


@pytest.mark.parametrize("size", [1, 4095, 4096, 1 << 16, MULTITHREAD_MIN_BYTES + 4097,
                                  (3 << 20) + 123, (37 << 20) + 5])   # the last one pipelined
def test_memfd_digest_equals_blake3_of_its_bytes(memfd: int, size: int) -> None:
    data = os.urandom(size)
    fill(memfd, data)
    os.lseek(memfd, 1234, os.SEEK_SET)
    result = digest_fd(memfd)
    assert result.hexdigest == blake3.blake3(data).hexdigest()
    assert result.alg == DIGEST_ALG and len(result.hexdigest) == DIGEST_HEX_LENGTH
    assert result.size == size
    assert result.seconds >= 0
    # The fd is shared with its owner: its position must not move.
    assert os.lseek(memfd, 0, os.SEEK_CUR) == 1234


def test_empty_file_has_the_specification_digest(memfd: int) -> None:
    assert digest_fd(memfd).hexdigest == EMPTY_BLAKE3
    assert digest_fd(memfd, 0).hexdigest == EMPTY_BLAKE3
    assert digest_fd(memfd).size == 0


def test_sparse_memfd_hashes_its_holes_as_zeros(memfd: int) -> None:
    os.ftruncate(memfd, 8 << 20)
    os.pwrite(memfd, b"end", (8 << 20) - 3)
    expected = blake3.blake3(bytes((8 << 20) - 3) + b"end").hexdigest()
    assert digest_fd(memfd).hexdigest == expected


def test_prefix_and_oversized_sizes(memfd: int) -> None:
    data = os.urandom(100_000)
    fill(memfd, data)
    assert digest_fd(memfd, 4096).hexdigest == blake3.blake3(data[:4096]).hexdigest()
    with pytest.raises(InvalidArgument, match="fewer than"):
        digest_fd(memfd, 100_001)
    with pytest.raises(InvalidArgument):
        digest_fd(memfd, -1)


def test_pipe_is_refused_rather_than_hashed_as_empty() -> None:
    """A pipe has no offsets (the digest reads from offset 0 without moving a position): it
    fails with ESPIPE instead of returning the digest of nothing."""
    r, w = os.pipe()
    try:
        os.write(w, b"abc")
        os.close(w)
        with pytest.raises(KernelRefused) as caught:
            digest_fd(r)
        assert caught.value.errno == errno.ESPIPE
    finally:
        os.close(r)


def test_procfs_file_with_zero_stat_size_is_read_to_eof() -> None:
    path = Path("/proc/self/mountinfo")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.fstat(fd).st_size == 0
        expected = blake3.blake3(path.read_bytes()).hexdigest()
        result = digest_fd(fd)
        assert result.size > 0
        assert result.hexdigest == expected
    finally:
        os.close(fd)


def test_closed_fd_is_refused_with_ebadf(memfd: int) -> None:
    spare = os.dup(memfd)
    os.close(spare)
    with pytest.raises(KernelRefused) as caught:
        digest_fd(spare)
    assert caught.value.errno == errno.EBADF
    assert "EBADF" in caught.value.message


def test_write_only_fd_is_refused_with_ebadf(tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_bytes(b"x" * 10_000)
    fd = os.open(path, os.O_WRONLY)
    try:
        with pytest.raises(KernelRefused) as caught:
            digest_fd(fd)
        assert caught.value.errno == errno.EBADF
        assert "readable" in caught.value.message
    finally:
        os.close(fd)


def test_directory_is_refused(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(KernelRefused) as caught:
            digest_fd(fd)
        assert caught.value.errno == errno.EISDIR
    finally:
        os.close(fd)


# --- a file that changes while it is digested ----------------------------------------------------

BIG = 256 << 20


def big_memfd(size: int = BIG) -> int:
    """A sparse memfd (ftruncate) then written all through, 1 MiB at a time."""
    fd = os.memfd_create("digest-big", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    block = os.urandom(1 << 20)
    for offset in range(0, size, len(block)):
        os.pwrite(fd, block, offset)
    return fd


# In a child process, so that a SIGBUS kills the child and not the test run. At the digest's
# first hashed input another thread changes the file (and the hash waits for it to finish).
WHILE_HASHED = textwrap.dedent("""
    import os, sys, threading
    import kho_agent.digest as digest
    from kho_agent.errors import AgentError

    fd, change = int(sys.argv[1]), sys.argv[2]
    size = os.fstat(fd).st_size
    real_new_hasher = digest.new_hasher

    def act():
        if change == "truncate":
            os.ftruncate(fd, 1 << 20)
        else:
            os.pwrite(fd, b"grown", size)

    class Racing:
        def __init__(self, alg, hint=None):
            self.real = real_new_hasher(alg, hint)
            self.first = True
        def update(self, data):
            if self.first:
                self.first = False
                other = threading.Thread(target=act)
                other.start()
                other.join()
            self.real.update(data)
        def hexdigest(self):
            return self.real.hexdigest()

    digest.new_hasher = Racing
    try:
        result = digest.digest_fd(fd, size)
    except AgentError as exc:
        print("refused", type(exc).__name__, exc.name, exc.message, flush=True)
    else:
        print("digest", result.hexdigest, result.size, flush=True)
""")


def run_digest_child(fd: int, change: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", WHILE_HASHED, str(fd), change], cwd=REPO,
                          env=env, pass_fds=(fd,), capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("change", ["truncate", "grow"])
def test_memfd_resized_by_another_thread_during_the_digest(change: str) -> None:
    """A mapping of the memfd would take SIGBUS past the new end (the process, the daemon, would
    die); the digest reads instead, survives, and refuses with the size change."""
    fd = big_memfd()
    try:
        proc = run_digest_child(fd, change)
    finally:
        os.close(fd)
    assert proc.returncode == 0, f"the digest process died: {proc.returncode}\n{proc.stderr}"
    assert proc.stdout.startswith("refused FileChanged Busy "), proc.stdout
    message = proc.stdout.split(" ", 3)[3]
    after = 1 << 20 if change == "truncate" else BIG + 5
    assert f"changed size from {BIG} to {after} bytes" in message, proc.stdout


def test_memfd_truncated_by_another_process_during_the_digest() -> None:
    """The same with no hook: this process truncates the memfd while a child digests it."""
    fd = big_memfd()
    script = textwrap.dedent("""
        import os, sys
        from kho_agent.digest import digest_fd
        from kho_agent.errors import AgentError
        fd = int(sys.argv[1])
        size = os.fstat(fd).st_size
        print("digesting", flush=True)
        try:
            result = digest_fd(fd, size)
        except AgentError as exc:
            print("refused", exc.name, exc.message, flush=True)
        else:
            print("digest", result.hexdigest, flush=True)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        child = subprocess.Popen([sys.executable, "-c", script, str(fd)], cwd=REPO, env=env,
                                 pass_fds=(fd,), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "digesting"
        time.sleep(0.02)          # into the digest: hashing 256 MiB takes far longer
        os.ftruncate(fd, 4096)
        out, err = child.communicate(timeout=120)
    finally:
        os.close(fd)
    assert child.returncode == 0, f"the digest process died: {child.returncode}\n{err}"
    assert out.startswith("refused Busy "), out
    assert f"changed size from {BIG} to" in out or f"fewer than the {BIG}" in out, out


def test_memfd_written_during_the_digest_is_refused(memfd: int) -> None:
    data = os.urandom(4 << 20)
    fill(memfd, data)
    time.sleep(0.02)              # the write below gets a later change time
    calls = 0
    real = digest_mod.new_hasher

    class Writing:
        def __init__(self, alg: str, hint: int | None = None) -> None:
            self.real = real(alg, hint)

        def update(self, chunk: memoryview) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                os.pwrite(memfd, b"!", len(data) - 1)   # same size, new content
            self.real.update(chunk)

        def hexdigest(self) -> str:
            return str(self.real.hexdigest())

    digest_mod.new_hasher = Writing  # type: ignore[assignment]
    try:
        with pytest.raises(Busy, match="was written while its blake3 digest was taken"):
            digest_fd(memfd, len(data))
    finally:
        digest_mod.new_hasher = real
    assert calls >= 1
    digest_fd(memfd, len(data))       # quiet again: a digest
