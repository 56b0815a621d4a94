"""Composite compatible strings of the "granular compatibility" proposal (docs/kernel-abi.md §2.7).

A kernel that versions the parts of a contract separately names them in one string: the base
version, then each sub-component behind a `;`, the sub-components in strict alphabetical order
(`KHO_SUB_COMPAT(str)` is `";" str`), e.g. "kho-v4;radix-v1" or "luo-v5;block-v1". No kernel
writes one yet; when one does, the decoder meets a string it has no record for, and instead of
one "unknown" it reports each component: known to this decoder or not, and where the string
breaks the grammar (an empty, repeated or out-of-order component).

parse() is pure (text in, components out); findings() judges the components against the
registry.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from . import registry
from .context import DecodeContext

SEPARATOR = ";"


class Problem(enum.Enum):
    EMPTY = "empty"           # nothing between two separators, or at either end
    DUPLICATE = "duplicate"   # the same component named twice
    UNSORTED = "unsorted"     # a sub-component before one it sorts after


@dataclass(frozen=True)
class Component:
    text: str
    position: int             # 0: the base version; 1..: the sub-components
    problem: Problem | None = None


@dataclass(frozen=True)
class Composite:
    text: str
    components: tuple[Component, ...]

    @property
    def base(self) -> Component:
        return self.components[0]

    @property
    def well_formed(self) -> bool:
        return all(c.problem is None for c in self.components)


def is_composite(text: str) -> bool:
    return SEPARATOR in text


def parse(text: str) -> Composite:
    """Split a compatible string into its base and sub-components and check the grammar: every
    component non-empty, none twice, the sub-components in strictly ascending (strcmp) order."""
    out: list[Component] = []
    seen: set[str] = set()
    previous: str | None = None  # the last well-placed sub-component
    for position, part in enumerate(text.split(SEPARATOR)):
        problem: Problem | None = None
        if not part:
            problem = Problem.EMPTY
        elif part in seen:
            problem = Problem.DUPLICATE
        elif position > 0 and previous is not None and part < previous:
            problem = Problem.UNSORTED
        if part:
            seen.add(part)
        if position > 0 and problem is None:
            previous = part
        out.append(Component(part, position, problem))
    return Composite(text, tuple(out))


def _name(c: Component) -> str:
    return "the base version" if c.position == 0 else f"sub-component {c.position}"


def findings(ctx: DecodeContext, path: str, text: str, what: str, consequence: str) -> None:
    """One finding per component of the composite `text` met at `path` (`what` names the
    contract, e.g. "KHO root"); `consequence` says what a kernel that does not speak the string
    does. When every component is well formed and known, the combination itself is what this
    decoder does not know: one compatible-unknown says so."""
    parsed = parse(text)
    errors = 0
    for c in parsed.components:
        label = f"{what} compatible {text!r}: {_name(c)}"
        if c.problem is Problem.EMPTY:
            errors += 1
            ctx.add("compatible-component-empty", path, f"{label} is empty (two separators in a "
                    "row, or one at an end); no kernel writes such a string")
        elif c.problem is Problem.DUPLICATE:
            errors += 1
            ctx.add("compatible-component-duplicate", path, f"{label} {c.text!r} is named "
                    "twice; no kernel writes such a string")
        elif c.problem is Problem.UNSORTED:
            errors += 1
            ctx.add("compatible-component-unsorted", path, f"{label} {c.text!r} is out of "
                    "order: sub-components are joined in strict alphabetical order "
                    "(KHO_SUB_COMPAT), so no kernel writes this string")
        else:
            record = registry.by_compatible(c.text)
            if record is None:
                errors += 1
                ctx.add("compatible-component-unknown", path, f"{label} {c.text!r} is unknown "
                        f"to this decoder; {consequence}")
            else:
                ctx.add("compatible-component-known", path, f"{label} {c.text!r} is known to "
                        f"this decoder ({record.family} format of {record.releases})")
    if not errors:
        ctx.add("compatible-unknown", path, f"{what} compatible {text!r}: every component is "
                f"known, but not this combination; {consequence}")
