"""BLAKE3 digests of real files: memfds, pipes, procfs files, and fds that cannot be read."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

from kho_agent.digest import DIGEST_ALG, DIGEST_HEX_LENGTH, MULTITHREAD_MIN_BYTES, digest_fd
from kho_agent.errors import InvalidArgument, KernelRefused

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
                                  (3 << 20) + 123])
@pytest.mark.parametrize("use_mmap", [True, False])
def test_memfd_digest_equals_blake3_of_its_bytes(memfd: int, size: int, use_mmap: bool) -> None:
    data = os.urandom(size)
    fill(memfd, data)
    os.lseek(memfd, 1234, os.SEEK_SET)
    result = digest_fd(memfd, use_mmap=use_mmap)
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
