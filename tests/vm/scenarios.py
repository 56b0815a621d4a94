"""Host side of the VM scenarios: put a scenario on a job disk, boot the guest until it powers
off (through as many kexecs as the scenario makes), and read back what every boot recorded.

The guest side is tests/vm/jobs/run.py (the runner, /mnt/job/run) and tests/vm/jobs/workload.py
(the VM manager stand-in). Each boot n writes out/boot-<n>.json; QEMU is started again only
where the scenario reboots cold (`-no-reboot` makes a reboot end QEMU; a kexec does not); a
guest may leave words for the next cold boot's command line in out/next-append.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import jobdisk, qemu, rootfs
from .kernels import KernelImage

JOBS = Path(__file__).resolve().parent / "jobs"
# kho=on liveupdate=on: both default off. panic=-1: a panic reboots at once, which -no-reboot
# turns into QEMU exiting, so a panicking kernel ends the run instead of hanging it.
APPEND = "console=ttyS0 root=/dev/vda rw kho=on liveupdate=on panic=-1 loglevel=6"
GUEST_MEMORY_MB = 2048


@dataclass
class ScenarioRun:
    """What came back: each boot's record (by boot number), the job disk's files, the serial
    logs (one per QEMU start) and the framed lines in them."""

    directory: Path
    boots: dict[int, dict[str, Any]]
    result_dir: Path
    serial: list[str]
    runs: list[qemu.GuestRun] = field(default_factory=list)

    def boot(self, n: int) -> dict[str, Any]:
        if n not in self.boots:
            raise AssertionError(f"boot {n} left no record (boots: {sorted(self.boots)});"
                                 f" serial tail:\n{self.serial_tail()}")
        return self.boots[n]

    def facts(self, n: int) -> dict[str, Any]:
        facts: dict[str, Any] = self.boot(n)["facts"]
        return facts

    def step(self, n: int, name: str) -> dict[str, Any]:
        for step in self.boot(n)["steps"]:
            if step["name"] == name:
                found: dict[str, Any] = step
                return found
        raise AssertionError(f"boot {n} has no step {name!r}: "
                             f"{[s['name'] for s in self.boot(n)['steps']]}")

    def serial_tail(self, lines: int = 60) -> str:
        return "\n".join("\n".join(log.splitlines()[-lines:]) for log in self.serial)

    def describe(self) -> str:
        """For assertion messages: every step's status and the last of the serial console."""
        out = []
        for n, boot in sorted(self.boots.items()):
            for step in boot["steps"]:
                out.append(f"boot {n} {step['name']}: rc={step['rc']} "
                           f"{step['stderr'][-400:].strip()}")
        return "\n".join(out) + "\n--- serial ---\n" + self.serial_tail()


def prepare_job(directory: Path, spec: dict[str, Any], files: dict[str, Path]) -> Path:
    """The job directory: the runner as `run`, the workload, scenario.json, and `files`
    (kernel images, by their name on the job disk)."""
    job = directory / "job"
    job.mkdir(parents=True)
    job.chmod(0o755)  # the workload runs as the guest's user vmm
    shutil.copy(JOBS / "run.py", job / "run")
    (job / "run").chmod(0o755)
    for script in ("workload.py", "vmm_qemu.py", "keeper.py"):
        shutil.copy(JOBS / script, job / script)
        (job / script).chmod(0o644)
    (job / "scenario.json").write_text(json.dumps(spec))
    out = job / "out"
    out.mkdir()
    out.chmod(0o777)  # the workload (vmm) writes its reports there
    for name, src in files.items():
        dest = job / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest)
    return job


def run_scenario(directory: Path, spec: dict[str, Any], kernel: KernelImage,
                 files: dict[str, Path] | None = None, *, cold_boots: int = 1,
                 timeout_s: float = 900, memory_mb: int = GUEST_MEMORY_MB,
                 append: str = "", guest: str = rootfs.DEFAULT_GUEST) -> ScenarioRun:
    """Boot the guest `guest` (a release of rootfs.GUESTS) on `kernel` with the scenario
    `spec`; `cold_boots` QEMU starts (more than one where the scenario reboots cold); `append`:
    more kernel command line."""
    image = rootfs.ensure_guest_image(guest)
    root = rootfs.scratch_copy(image, directory)
    files = {"kernels/running": kernel.path, **(files or {})}
    disk = make_scenario_disk(directory, spec, files)
    runs = []
    serial = []
    for i in range(cold_boots):
        log = directory / f"serial-{i + 1}.log"
        cmdline = f"{APPEND} {append}".strip()
        if i:  # what the guest asked for its next cold boot (e.g. a kho_scratch= plan)
            try:
                extra = jobdisk.read_job_file(disk, "/out/next-append").decode().strip()
            except jobdisk.JobDiskError:
                extra = ""
            cmdline = f"{cmdline} {extra}".strip()
        run = qemu.run_guest(kernel.path, cmdline, [root, disk], memory_mb=memory_mb,
                             timeout_s=timeout_s, serial_log=log)
        runs.append(run)
        serial.append(log.read_text(errors="replace"))
        if run.timed_out:
            break
    return read_scenario_disk(disk, directory, serial, runs)


def make_scenario_disk(directory: Path, spec: dict[str, Any], files: dict[str, Path]) -> Path:
    """The job disk of one guest's scenario: `spec`, the runner and `files` (name on the disk
    -> host path), sized for them, as directory/job.img."""
    job = prepare_job(directory, spec, files)
    size = 256 + sum(p.stat().st_size for p in files.values()) // (1 << 20) * 2
    return jobdisk.make_job_disk(job, directory / "job.img", size_mb=size)


def read_scenario_disk(disk: Path, directory: Path, serial: list[str],
                       runs: list[qemu.GuestRun]) -> ScenarioRun:
    """What the guest wrote to its job disk (read into directory/result), with its boots'
    records, after QEMU exited."""
    result_dir = directory / "result"
    shutil.rmtree(result_dir, ignore_errors=True)
    jobdisk.read_job_disk(disk, result_dir)
    boots = {}
    for path in sorted((result_dir / "out").glob("boot-*.json")):
        n = int(path.stem.split("-")[1])
        boots[n] = json.loads(path.read_text())
    return ScenarioRun(directory, boots, result_dir, serial, runs)
