"""The version strings of decoded kernel images, kept across the kexec (imagestrings.py): what
prepare records is what verify finds for the same bytes, a cache of any shape is a miss, and
verify after a live update does not decompress the image prepare decoded."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from enginerig import Rig

from kho_agent import facts
from kho_agent.engine import CommitOptions, PrepareOptions
from kho_agent.imagestrings import FILE_NAME, MAX_IMAGES, ImageStrings, image_digest

STRINGS = {"kho-root": ["kho-v4"], "luo": ["luo-v5"], "handler:memfd": ["memfd-v2"],
           "luo-flb": []}


def test_what_is_remembered_is_found_by_the_same_bytes_only(tmp_path: Path) -> None:
    cache = ImageStrings(tmp_path)
    digest = image_digest(b"an image")
    assert cache.lookup(digest) is None
    cache.remember(digest, STRINGS)
    assert cache.lookup(digest) == STRINGS
    assert cache.lookup(image_digest(b"an image.")) is None
    # bounded: the oldest goes
    for i in range(MAX_IMAGES):
        cache.remember(image_digest(bytes([i])), {"luo": [f"luo-v{i}"]})
    assert cache.lookup(digest) is None
    newest = MAX_IMAGES - 1
    assert cache.lookup(image_digest(bytes([newest]))) == {"luo": [f"luo-v{newest}"]}
    assert len(json.loads((tmp_path / FILE_NAME).read_text())["images"]) == MAX_IMAGES


@pytest.mark.parametrize("shape", ["directory", "fifo", "garbage", "nested", "schema",
                                   "bad-digest", "bad-string", "huge", "dangling"])
def test_a_cache_of_any_shape_is_a_miss_and_is_replaced(tmp_path: Path, shape: str) -> None:
    path = tmp_path / FILE_NAME
    digest = image_digest(b"k")
    good = {"version": 1, "images": [{"blake3": digest, "strings": STRINGS}]}
    bad: dict[str, Any] = {
        "garbage": b"\xff not json", "nested": b"[" * 100_000,
        "schema": json.dumps({**good, "version": 2}).encode(),
        "bad-digest": json.dumps({"version": 1, "images": [
            {"blake3": "XYZ", "strings": STRINGS}]}).encode(),
        "bad-string": json.dumps({"version": 1, "images": [
            {"blake3": digest, "strings": {"luo": ["../../etc"]}}]}).encode(),
        "huge": b" " * (2 << 20)}
    if shape == "directory":
        path.mkdir()
    elif shape == "fifo":
        os.mkfifo(path)
    elif shape == "dangling":
        path.symlink_to(tmp_path / "nowhere")
    else:
        path.write_bytes(bad[shape])
    cache = ImageStrings(tmp_path)
    assert cache.lookup(digest) is None          # and no hang on the FIFO
    cache.remember(digest, STRINGS)              # never raises
    if shape not in ("directory", "fifo"):       # a regular file (or link) is replaced
        assert cache.lookup(digest) == STRINGS


def test_verify_after_a_live_update_does_not_decompress_the_prepared_image(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def run(directory: Path, cached: bool) -> dict[str, Any]:
        rig = Rig(directory)
        rig.client("vm-a", {1: b"alpha" * 100})
        rig.agent.prepare(PrepareOptions(kernel=rig.target))
        rig.agent.commit(CommitOptions())
        if not cached:
            (directory / "state" / FILE_NAME).unlink()
        agent = rig.reboot_view()
        decoded: list[str] = []
        real = facts.read_image

        def counting(path: str, *args: Any, **kwargs: Any) -> Any:
            decoded.append(path)
            return real(path, *args, **kwargs)
        monkeypatch.setattr(facts, "read_image", counting)
        report = agent.verify()
        monkeypatch.setattr(facts, "read_image", real)
        agent.close()
        assert report.ok
        abi = json.loads((directory / "state" / "last-verify.json").read_text())
        return {"decoded": decoded, "abi": [i for i in abi["items"] if i["kind"] == "abi"]}

    with_cache = run(tmp_path / "a", cached=True)
    without = run(tmp_path / "b", cached=False)
    assert with_cache["decoded"] == [] and len(without["decoded"]) == 1
    # the same ABI items either way: the strings are what a new scan finds
    assert with_cache["abi"] and with_cache["abi"] == without["abi"]
