"""What every benchmark reports: a figure beside a floor measured in the same run, their ratio,
and the target stated as a ratio (see benchmarks/README.md).

Absolute times on shared CPUs say more about the machine than about the code: the same tree
measured 1.6x slower on the floor of another machine of the same kind. A floor is the least
work the figure's job needs, timed on the same machine, in the same process where possible and
at the same moment (interleaved with the figure's runs), so that the ratio follows the code.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

# A benchmark that could not produce a valid figure (an input that decodes wrongly, a digest
# that disagrees with b3sum, a verification that fails) exits with this status, so that
# `./quickstart.sh bench` fails on it; a missed ratio exits 1.
EXIT_BROKEN = 2


@dataclass(frozen=True)
class Ratio:
    figure: str             # what is measured
    value: float            # the figure (seconds, or bytes for a memory figure)
    floor_name: str         # what the floor measures, in a few words
    floor: float            # same unit as value
    target: float | None    # the largest acceptable value / floor; None: informational

    @property
    def ratio(self) -> float:
        return self.value / self.floor if self.floor > 0 else float("inf")

    @property
    def ok(self) -> bool:
        return self.target is None or self.ratio <= self.target


def settle() -> None:
    """Collect, then move every object alive now (the inputs the script built) out of the
    collector's reach: a timed call pays for collecting its own objects only."""
    gc.collect()
    gc.freeze()


def timed(fn: Callable[[], object]) -> float:
    settle()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    del result  # freeing the result is the caller's cost, not the timed call's
    return seconds


def interleaved_best(repeat: int, figure: Callable[[], object],
                     floor: Callable[[], object]) -> tuple[float, float]:
    """Best of `repeat` runs of each, the figure's and the floor's runs alternating, so that a
    neighbour's burst of load slows both rather than one."""
    best_figure = best_floor = float("inf")
    for _ in range(repeat):
        best_figure = min(best_figure, timed(figure))
        best_floor = min(best_floor, timed(floor))
    return best_figure, best_floor


def fmt_seconds(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def fmt_mib(value: float) -> str:
    return f"{value / (1 << 20):.1f} MiB"


def print_table(rows: list[Ratio], unit: Callable[[float], str] = fmt_seconds) -> None:
    """figure, floor, ratio, target ratio, result: one line per figure."""
    width = max(len(r.figure) for r in rows)
    floor_width = max(len(r.floor_name) for r in rows)
    head = (f"{'figure':<{width}} {'value':>10}  {'floor':<{floor_width}} {'':>10} "
            f"{'ratio':>8} {'target':>8}  result")
    print(head)
    print("-" * len(head))
    for r in rows:
        target = f"<= {r.target:g}x" if r.target is not None else "-"
        result = "info" if r.target is None else ("PASS" if r.ok else "MISS")
        print(f"{r.figure:<{width}} {unit(r.value):>10}  {r.floor_name:<{floor_width}} "
              f"{unit(r.floor):>10} {r.ratio:>7.2f}x {target:>8}  {result}")


def exit_status(rows: list[Ratio]) -> int:
    """0 when every ratio meets its target, 1 otherwise."""
    return 0 if all(r.ok for r in rows) else 1
