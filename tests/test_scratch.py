"""kho_agent.scratch (the recommendation) and `kho-agentctl scratch`. The kernel's rules it
applies have their own tests (test_kho_scratch.py, test_image.py); here they show through the
plan. Expected values come from the kernel's rules, worked by hand in the comments, or from the
real 7.3-rc7 capture in tests/data/kho-samples."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from cliout import cli_json
from test_image import bzimage_header
from test_kho_scratch import REGIONS

from kho_agent import cli
from kho_agent.abi.kho_state import ScratchArea
from kho_agent.cli import scratch as scratch_cli
from kho_agent.engine.scratch_plan import (
    ScratchPlan,
    estimate_reserved,
    largest_initrd,
    plan_scratch,
    smallest_scale,
)
from kho_agent.errors import InvalidArgument
from kho_agent.kernel.kho_scratch import (
    AreaSizes,
    KernReserved,
    ScratchParam,
    ScratchSizes,
    count_reserved,
    kernel_scratch_sizes,
)
from kho_agent.kernel.params import parse_cmdline
from kho_agent.kernel.sysinfo import MemblockRegion, NumaNode, SysInfo

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


# === the kernel's sizing against a real capture ================================================

def test_kernel_default_matches_the_real_capture(samples_dir: Path) -> None:
    """The 2 GiB VM of the capture: estimate its reservations from its dmesg and get the lowmem
    area its kernel actually reserved (debugfs out/scratch_len, default 200%)."""
    out = samples_dir / "debugfs" / "stage1-1-boot" / "out"
    lens = [int(x, 16) for x in (out / "scratch_len").read_text().split()]
    # dmesg: "Memory: 1691800K/2096608K available (7978K kernel code, 1428K rwdata, 2316K
    # rodata, 1796K init, 476K bss ...)" and "Freeing initrd memory: 25232K"
    image = (7978 + 1428 + 2316 + 1796 + 476) * KiB
    info = make_info(mem_total=2096608 * KiB, nodes=[(0, 2096608 * KiB)],
                     cmdline="console=ttyS0 kho=on liveupdate=on panic=-1")
    kern, _ = estimate_reserved(info, image, 25232 * KiB)
    sizes = kernel_scratch_sizes(kern, None, nodes=[0])
    assert sizes.lowmem == lens[0] == 160 * MiB
    assert sizes.global_ == lens[1] == 0            # every reservation is below 4 GiB
    assert sizes.per_node[0] >= lens[2]             # some regions have no node: conservative


# === plans =====================================================================================

def make_info(*, regions: list[MemblockRegion] | None = None, mem_total: int = 2 * GiB,
              nodes: list[tuple[int, int]] | None = None, cmdline: str = "kho=on",
              hugetlb: int = 0) -> SysInfo:
    node_list = [NumaNode(n, m) for n, m in (nodes if nodes is not None else [(0, mem_total)])]
    return SysInfo(release="7.3.0", cmdline=cmdline, params=parse_cmdline(cmdline),
                   boot_id="x", machine="x86_64", page_size=4096, mem_total=mem_total,
                   mem_available=mem_total // 2, hugepages_total=hugetlb, cma_total=None,
                   nodes=node_list, memblock_reserved=regions, pid1=None, systemd_version=None,
                   load_kexec_at_shutdown=None, lockdown=None)


# One 40 MiB RSV_KERN region at 256 MiB on node 0: low = total = node 0 = 40 MiB.
FORTY = [MemblockRegion(0x10000000, 40 * MiB, 0, ("RSV_KERN",))]


def areas(lowmem: int, global_: int, node0: int) -> list[ScratchArea]:
    return [ScratchArea(0x40000000, lowmem, "lowmem"), ScratchArea(0x100000000, global_, "global"),
            ScratchArea(0x80000000, node0, "node 0")]


def breakdown_total(plan: ScratchPlan) -> int:
    return sum(item.bytes for item in plan.breakdown)


def test_recommendation_by_hand() -> None:
    plan = plan_scratch(make_info(regions=FORTY), areas(100 * MiB, 0, 100 * MiB))
    # required: one copy = 40 MiB per area; recommended: 200% = 80 MiB, +25% = 100 MiB (aligned)
    assert plan.required == ScratchSizes(40 * MiB, 0, 40 * MiB)
    assert plan.recommended == ScratchSizes(100 * MiB, 0, 100 * MiB)
    # 40 MiB * s / 100 must round up to >= 100 MiB, i.e. exceed 96 MiB: s = 240 gives exactly
    # 96 MiB (not enough), s = 241 gives 96.4 MiB -> 100 MiB
    assert plan.percent == 241
    assert plan.absolute_form() == "kho_scratch=100M,0,100M"
    assert plan.percent_form() == "kho_scratch=241%"
    assert plan.kernel_default == ScratchSizes(80 * MiB, 0, 80 * MiB)
    assert plan.sufficient and plan.warnings == []
    assert not plan.estimated and plan.kern_source == "memblock"
    assert breakdown_total(plan) == plan.recommended.total(1) == 200 * MiB
    json.dumps(plan.to_json())


def test_margin_changes_the_recommendation() -> None:
    # margin 0: 80 MiB (the kernel default); margin 50%: 120 MiB
    assert plan_scratch(make_info(regions=FORTY), [], margin=0).recommended.lowmem == 80 * MiB
    assert plan_scratch(make_info(regions=FORTY), [], margin=0.5).recommended.lowmem == 120 * MiB
    with pytest.raises(InvalidArgument):
        plan_scratch(make_info(regions=FORTY), [], margin=-0.1)


def test_scratch_areas_are_not_counted_as_kernel_memory() -> None:
    # On a cold boot the areas are memblock allocations (RSV_KERN) still listed after boot.
    regions = [*FORTY, MemblockRegion(0x40000000, 100 * MiB, 0, ("RSV_KERN",)),
               MemblockRegion(0x80000000, 100 * MiB, 0, ("RSV_KERN",))]
    plan = plan_scratch(make_info(regions=regions), areas(100 * MiB, 0, 100 * MiB))
    assert plan.kern.low == 40 * MiB and plan.recommended.lowmem == 100 * MiB


def test_areas_too_small_warn_which_and_by_how_much() -> None:
    plan = plan_scratch(make_info(regions=FORTY), areas(32 * MiB, 0, 36 * MiB))
    assert not plan.sufficient
    assert len(plan.warnings) == 2
    assert plan.warnings[0].startswith("lowmem scratch area is 32.0 MiB, 8.0 MiB smaller")
    assert plan.warnings[1].startswith("node 0 scratch area is 36.0 MiB, 4.0 MiB smaller")


def test_below_recommended_but_enough_is_a_note() -> None:
    plan = plan_scratch(make_info(regions=FORTY), areas(64 * MiB, 0, 100 * MiB))
    assert plan.sufficient and plan.warnings == []
    assert any("lowmem scratch area is 64.0 MiB, 36.0 MiB below the recommended 100.0 MiB" in n
               for n in plan.notes)


def test_segments_placed_like_the_kernel() -> None:
    small = [MemblockRegion(0x10000000, 8 * MiB, 0, ("RSV_KERN",))]
    plan = plan_scratch(make_info(regions=small), areas(48 * MiB, 48 * MiB, 48 * MiB),
                        image_bytes=40 * MiB, initrd_bytes=40 * MiB)
    where = {p.segment.label: p.area for p in plan.segments}
    # Each segment takes the first area in kho_scratch[] order with room: after the array,
    # purgatory, boot data and the 40 MiB kernel, lowmem has under 8 MiB left, so the 40 MiB
    # initrd goes to the global area.
    assert where == {"scratch array": "lowmem", "purgatory": "lowmem",
                     "boot params and setup data": "lowmem", "kernel image": "lowmem",
                     "initrd": "global"}
    # Addresses, by hand. lowmem is [0x40000000, 0x43000000). The array (one page, 64 KiB
    # aligned, top-down) goes to round_down(0x43000000 - 0x1000, 0x10000) = 0x42ff0000;
    # purgatory (bottom-up) to 0x40000000; boot data (256 KiB, top-down) below the array at
    # 0x42ff0000 - 0x40000 = 0x42fb0000; the kernel (2 MiB aligned) at
    # round_down(0x42fb0000 - 0x2800000, 0x200000) = 0x40600000; the initrd at the top of
    # global: 0x103000000 - 0x2800000 = 0x100800000.
    at = {p.segment.label: p.phys for p in plan.segments}
    assert at == {"scratch array": 0x42FF0000, "purgatory": 0x40000000,
                  "boot params and setup data": 0x42FB0000, "kernel image": 0x40600000,
                  "initrd": 0x100800000}
    assert plan.sufficient
    # A 1 MiB initrd fits into lowmem twice: below the kernel (0x40010000..0x40600000) and
    # between the kernel and the boot data (0x42e00000..0x42fb0000); top-down takes the higher
    # one, 0x42fb0000 - 0x100000 = 0x42eb0000.
    plan = plan_scratch(make_info(regions=small), areas(48 * MiB, 48 * MiB, 48 * MiB),
                        image_bytes=40 * MiB, initrd_bytes=MiB)
    initrd = plan.segments[-1]
    assert (initrd.segment.label, initrd.area, initrd.phys) == ("initrd", "lowmem", 0x42EB0000)


def test_segments_that_do_not_fit() -> None:
    small = [MemblockRegion(0x10000000, 8 * MiB, 0, ("RSV_KERN",))]
    plan = plan_scratch(make_info(regions=small), areas(48 * MiB, 48 * MiB, 48 * MiB),
                        image_bytes=60 * MiB)
    assert not plan.sufficient
    assert len(plan.warnings) == 1
    assert "kernel image (60.0 MiB) does not fit" in plan.warnings[0]
    assert "EADDRNOTAVAIL" in plan.warnings[0]
    # the recommendation puts the segments into the lowmem area on top of the reservations
    assert plan.recommended.lowmem >= 60 * MiB + 2 * 8 * MiB


def test_segments_counted_in_the_recommendation() -> None:
    plan = plan_scratch(make_info(regions=FORTY), [], image_bytes=20 * MiB,
                        initrd_bytes=3 * MiB)
    # segments, worst case: array 4K + 60K padding, purgatory 64K, boot data 256K,
    # kernel 20M + 2M - 4K padding, initrd 3M = 25M + 380K = 26603520 bytes;
    # lowmem = round_up((80M + 26603520) * 1.25 = 138112000, 4M) = 33 blocks = 132 MiB
    assert plan.recommended.lowmem == 132 * MiB
    assert breakdown_total(plan) == plan.recommended.total(1)


def test_smallest_scale_is_minimal() -> None:
    info = make_info(regions=REGIONS, nodes=[(0, GiB), (1, GiB)])
    plan = plan_scratch(info, [], image_bytes=30 * MiB, initrd_bytes=10 * MiB)
    assert plan.percent is not None
    kern = count_reserved(REGIONS)
    got = kernel_scratch_sizes(kern, ScratchParam(scale=plan.percent), nodes=[0, 1])
    below = kernel_scratch_sizes(kern, ScratchParam(scale=plan.percent - 1), nodes=[0, 1])
    rec = plan.recommended
    assert got.lowmem >= rec.lowmem and got.global_ >= rec.global_
    assert (below.lowmem < rec.lowmem or below.global_ < rec.global_
            or any(below.per_node[n] < got.per_node[n] for n in (0, 1)))
    assert breakdown_total(plan) == rec.total(2)
    # every node gets the largest node's size, and the breakdown says so
    assert any(item.label.startswith("pernode: every node") for item in plan.breakdown)


def test_no_scale_when_an_area_counts_nothing() -> None:
    target = AreaSizes(4 * MiB, 0, {0: 0})
    assert smallest_scale(KernReserved(0, 0, {0: 0}), target, [0], 4 * MiB) is None


def test_hugetlb_exclusion() -> None:
    regions = [MemblockRegion(0x10000000, 40 * MiB, 0, ("RSV_KERN",)),
               MemblockRegion(0x200000000, 64 * MiB, 0, ("RSV_KERN",))]  # a HugeTLB area
    info = make_info(regions=regions, hugetlb=64 * MiB)
    info.nodes[0].hugetlb = 64 * MiB
    with_hugetlb = plan_scratch(info, [])
    without = plan_scratch(info, [], exclude_hugetlb=True)
    assert with_hugetlb.recommended.global_ == 160 * MiB   # 64 MiB x 2 x 1.25
    assert without.recommended.global_ == 0
    assert without.recommended.pernode == 100 * MiB        # 40 MiB x 2 x 1.25


def test_kho_boot_note() -> None:
    plan = plan_scratch(make_info(regions=FORTY), areas(100 * MiB, 0, 100 * MiB), kho_boot=True)
    assert any("inherited" in n and "cold boot" in n for n in plan.notes)


# A KHO boot after a live update that carried 1 GiB: the areas (100 MiB) were inherited, this
# kernel allocated 40 MiB inside the lowmem one, and the 1 GiB came in as RSV_NIT elsewhere.
CARRIED = [MemblockRegion(0xC0000000, GiB, 0, ("RSV_NIT",)),
           MemblockRegion(0x40000000 + 60 * MiB, 40 * MiB, 0, ("RSV_KERN",))]


def test_memory_carried_in_is_not_what_the_next_boot_needs_in_scratch() -> None:
    plan = plan_scratch(make_info(regions=CARRIED), areas(100 * MiB, 0, 100 * MiB),
                        kho_boot=True)
    # one copy of this kernel's own 40 MiB, counted inside the inherited area; not the 1 GiB
    assert plan.kern == KernReserved(40 * MiB, 40 * MiB, {0: 40 * MiB})
    assert plan.required == ScratchSizes(40 * MiB, 0, 40 * MiB)
    assert plan.sufficient and plan.warnings == []
    assert plan.preserved_left_out == GiB
    assert any(n.startswith("1024.0 MiB of memory preserved by the previous kernel")
               for n in plan.notes)
    assert "left out: 1024.0 MiB preserved by the previous kernel" in \
        scratch_cli.render(plan, None)


def test_on_a_cold_boot_rsv_nit_is_counted_and_the_areas_are_not() -> None:
    # no memory comes in on a cold boot: RSV_NIT there is HugeTLB with HVO (RSRV_KERN too);
    # the areas are this kernel's own allocations, still listed: 1 GiB + 0 MiB counted
    regions = [CARRIED[0], MemblockRegion(0x40000000, 100 * MiB, 0, ("RSV_KERN",))]
    plan = plan_scratch(make_info(regions=regions), areas(100 * MiB, 0, 100 * MiB))
    assert plan.kern.total == GiB and plan.preserved_left_out == 0
    assert not plan.sufficient


def test_how_large_an_initrd_the_areas_take() -> None:
    # lowmem [0x40000000, +100 MiB) takes the array, purgatory, boot data and the 30 MiB kernel
    # (at round_down(0x46400000 - 64K - 256K - 30M, 2M) = 0x44400000), leaving about 68 MiB
    # below it; node 0's 100 MiB area is empty: the largest initrd is exactly 100 MiB.
    small = [MemblockRegion(0x10000000, 8 * MiB, 0, ("RSV_KERN",))]
    room = areas(100 * MiB, 0, 100 * MiB)
    assert largest_initrd(room, 30 * MiB, 1, 4096) == 100 * MiB
    assert largest_initrd(room, 120 * MiB, 1, 4096) is None      # the kernel alone does not fit
    plan = plan_scratch(make_info(regions=small), room, image_bytes=30 * MiB,
                        initrd_bytes=10 * MiB)
    assert plan.initrd_limit == 100 * MiB and plan.warnings == []
    assert any("until the next cold boot: with a 30.0 MiB kernel they take an initrd of at "
               "most 100.0 MiB (this one: 10.0 MiB)" in n for n in plan.notes)
    # 30 + 90 MiB grown by the 25% margin is 150 MiB > 30 + 100: warn, at the cold boot
    plan = plan_scratch(make_info(regions=small), room, image_bytes=30 * MiB,
                        initrd_bytes=90 * MiB)
    assert plan.sufficient and len(plan.warnings) == 1
    assert "sized at this cold boot" in plan.warnings[0]
    assert "only a cold boot helps; to leave room, boot cold with kho_scratch=" \
        in plan.warnings[0]
    # and its JSON form carries the new fields back (what kho-agentd sends the CLI)
    again = scratch_cli.plan_from_json(json.loads(json.dumps(plan.to_json())))
    assert again.initrd_limit == 100 * MiB and again.preserved_left_out == 0
    assert "until the next cold boot: an initrd of up to 100.0 MiB fits" in \
        scratch_cli.render(again, None)


def test_unknown_areas_are_not_sufficient() -> None:
    plan = plan_scratch(make_info(regions=FORTY, cmdline="quiet"), [])
    assert not plan.sufficient
    assert any("unknown" in w for w in plan.warnings)
    assert any("KHO is off" in n for n in plan.notes)


def test_malformed_current_kho_scratch_is_reported() -> None:
    plan = plan_scratch(make_info(regions=FORTY, cmdline="kho=on kho_scratch=64M,,64M"),
                        areas(100 * MiB, 0, 100 * MiB))
    assert any("Malformed early option" in w for w in plan.warnings)


def test_derived_from_the_areas_of_the_real_capture(samples_dir: Path) -> None:
    out = samples_dir / "debugfs" / "stage1-1-boot" / "out"
    phys = [int(x, 16) for x in (out / "scratch_phys").read_text().split()]
    lens = [int(x, 16) for x in (out / "scratch_len").read_text().split()]
    captured = [ScratchArea(p, n, r) for p, n, r in zip(phys, lens, ["lowmem", "global", "node 0"],
                                                        strict=True)]
    info = make_info(cmdline="console=ttyS0 kho=on liveupdate=on panic=-1")
    plan = plan_scratch(info, captured)
    # default 200% on a cold boot: the areas are twice what the kernel counted
    assert plan.kern_source == "areas" and plan.estimated
    assert (plan.kern.low, plan.kern.total, plan.kern.per_node) == (80 * MiB, 80 * MiB,
                                                                    {0: 76 * MiB})
    assert plan.sufficient


def test_estimate_for_a_large_two_node_host() -> None:
    info = make_info(mem_total=64 * GiB, nodes=[(0, 32 * GiB), (1, 32 * GiB)],
                     cmdline="kho=on crashkernel=512M-2G:64M,2G-:256M")
    kern, items = estimate_reserved(info, 30 * MiB, 60 * MiB)
    # per node: memmap 32 GiB / 4 KiB * 64 = 512 MiB and RAM/1024 = 32 MiB, both above 4 GiB;
    # below 4 GiB: fixed 6 + image 30 + initrd 60 + swiotlb 64 + crashkernel 256 = 416 MiB
    assert kern.low == 416 * MiB
    assert kern.total == 416 * MiB + 2 * 544 * MiB
    assert kern.per_node == {0: 960 * MiB, 1: 544 * MiB}
    assert {i.label for i in items} >= {"memmap node 0", "memmap node 1", "swiotlb bounce buffer",
                                        "crashkernel (low)"}


def test_estimate_crashkernel_high_and_swiotlb_noforce() -> None:
    info = make_info(mem_total=64 * GiB, cmdline="crashkernel=1G,high swiotlb=noforce")
    kern, items = estimate_reserved(info, None, None)
    labels = {i.label: i.bytes for i in items}
    assert labels["crashkernel (high)"] == GiB
    assert labels["crashkernel (low)"] == 256 * MiB      # the default low part of ,high
    assert "swiotlb bounce buffer" not in labels
    assert kern.low == 6 * MiB + 256 * MiB


def test_estimated_plan_is_marked() -> None:
    plan = plan_scratch(make_info(), [], image_bytes=20 * MiB)
    assert plan.estimated and plan.kern_source == "estimate" and plan.estimate
    assert any("estimated from MemTotal" in n for n in plan.notes)
    assert any("next kernel's stands in" in n for n in plan.notes)


# === the command ===============================================================================

def put(root: Path, rel: str, data: str | bytes) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)
    return path


def fake_host(root: Path, scratch: list[int] | None) -> Path:
    put(root, "proc/sys/kernel/osrelease", "7.3.0-test\n")
    put(root, "proc/cmdline", "console=ttyS0 kho=on liveupdate=on\n")
    put(root, "proc/sys/kernel/random/boot_id", "6f8515e3-2fdc-4179-8329-a9789f3f2fe4\n")
    put(root, "proc/meminfo", "MemTotal:        2097152 kB\nMemAvailable:    1048576 kB\n")
    put(root, "sys/devices/system/node/has_memory", "0\n")
    put(root, "sys/devices/system/node/node0/meminfo", "Node 0 MemTotal:  2097152 kB\n")
    put(root, "sys/kernel/debug/memblock/reserved",
        "   0: 0x0000000010000000..0x00000000127fffff    0 RSV_KERN\n")   # 40 MiB
    if scratch is not None:
        put(root, "sys/kernel/debug/kho/out/scratch_phys", "0x40000000\n0x0\n0x80000000\n")
        put(root, "sys/kernel/debug/kho/out/scratch_len", "".join(f"{n:#x}\n" for n in scratch))
        (root / "sys/kernel/debug/kho/out/sub_fdts").mkdir(parents=True, exist_ok=True)
    return root


def images(root: Path) -> tuple[str, str]:
    kernel = put(root, "next/bzImage", bzimage_header(20 * MiB) + bytes(MiB - 4096))
    initrd = put(root, "next/initrd.img", bytes(3 * MiB))
    return str(kernel), str(initrd)


def run_cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
            *argv: str) -> tuple[int, str, str]:
    code = cli.main(["scratch", *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def test_cli_sufficient_text(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    root = fake_host(tmp_path / "root", [100 * MiB, 0, 100 * MiB])
    kernel, initrd = images(tmp_path)
    code, out, _ = run_cli(capsys, monkeypatch, "--root", str(root), "--kernel", kernel,
                           "--initrd", initrd)
    assert code == 0
    # the same arithmetic as test_segments_counted_in_the_recommendation: 132 MiB lowmem
    assert "recommended: kho_scratch=132M,0,100M" in out
    assert "or: kho_scratch=" in out
    assert "kernel image" in out and "lowmem at 0x" in out
    assert "Verdict: SUFFICIENT" in out
    assert f"next kernel: {kernel}: 20.0 MiB in memory (bzImage init_size)" in out


def test_cli_json(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                  monkeypatch: pytest.MonkeyPatch) -> None:
    root = fake_host(tmp_path / "root", [100 * MiB, 0, 100 * MiB])
    kernel, initrd = images(tmp_path)
    code, out, _ = run_cli(capsys, monkeypatch, "--root", str(root), "--kernel", kernel,
                           "--initrd", initrd, "--json", "--margin", "0")
    assert code == 0
    doc = cli_json(out)
    assert doc["sufficient"] is True and doc["verdict"] == "sufficient"
    plan = doc["plan"]
    # margin 0: 80 MiB + 26603520 bytes of segments = 110489600 -> 27 blocks = 108 MiB
    assert plan["recommended"] == {"lowmem": 108 * MiB, "global_": 0, "pernode": 80 * MiB}
    assert plan["absolute_form"] == "kho_scratch=108M,0,80M"
    assert [a["size"] for a in plan["reserved"]] == [100 * MiB, 0, 100 * MiB]
    assert doc["inputs"]["kernel"]["memory"] == 20 * MiB
    assert sum(item["bytes"] for item in plan["breakdown"]) == 188 * MiB


def test_cli_too_small_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    root = fake_host(tmp_path / "root", [32 * MiB, 0, 100 * MiB])
    code, out, _ = run_cli(capsys, monkeypatch, "--root", str(root))
    assert code == 1
    assert "warning: lowmem scratch area is 32.0 MiB, 8.0 MiB smaller" in out
    assert "Verdict: TOO SMALL" in out


def test_cli_without_debugfs_is_not_proven(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    root = fake_host(tmp_path / "root", None)
    code, out, _ = run_cli(capsys, monkeypatch, "--root", str(root))
    assert code == 1
    assert "scratch areas unknown" in out
    assert "Verdict: NOT PROVEN" in out


def test_cli_uses_the_running_kernel_from_boot(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    root = fake_host(tmp_path / "root", [100 * MiB, 0, 100 * MiB])
    put(root, "boot/vmlinuz-7.3.0-test", bzimage_header(24 * MiB) + bytes(4096))
    code, out, _ = run_cli(capsys, monkeypatch, "--root", str(root), "--json")
    doc = cli_json(out)
    assert code == 0
    assert doc["inputs"]["kernel"]["memory"] == 24 * MiB
    assert any("stand in for the next kernel" in n for n in doc["plan"]["notes"])


def test_cli_cannot_run_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run_cli(capsys, monkeypatch, "--root", str(tmp_path / "empty"))
    assert code == 2
    assert "osrelease does not exist" in err
    root = fake_host(tmp_path / "root", [100 * MiB, 0, 100 * MiB])
    code, _, err = run_cli(capsys, monkeypatch, "--root", str(root), "--kernel",
                           str(tmp_path / "missing"))
    assert code == 2 and "missing" in err
    code, _, err = run_cli(capsys, monkeypatch, "--root", str(root), "--margin", "-5")
    assert code == 2 and "negative" in err


def test_run_reachable_as_args_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    scratch_cli.add_parser(sub, "scratch")
    args = parser.parse_args(["scratch", "--root", str(fake_host(tmp_path, None))])
    assert args.run is scratch_cli.run
    assert args.run(args) == 1
    assert "NOT PROVEN" in capsys.readouterr().out
