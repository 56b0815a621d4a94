"""How the kernel reads its command line: the line split into parameters (next_arg(),
kernel/params.c), booleans (kstrtobool(), lib/kstrtox.c) and sizes (memparse(), lib/cmdline.c).

Pure: no I/O. The engine reads the running kernel's line with these (kernel/sysinfo.py), checks
the next kernel's with them (kernel/cmdline.py), and the simulated kernel boots by them
(sim/boot.py), so all three read a line the same way.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

U64_MASK = (1 << 64) - 1
# kstrtobool(): the first character decides, or the first two for on/off.
_TRUE_FIRST = frozenset("1yYtTeE")
_FALSE_FIRST = frozenset("0nNfFdD")
# memparse() suffixes, any case
_SUFFIX_SHIFT = {"k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}


# --- words -----------------------------------------------------------------------------------

def next_arg(args: str) -> tuple[str, str | None, str]:
    """One parameter the way the kernel's next_arg() (kernel/params.c) splits it.

    Returns (name, value or None, rest). Quotes group spaces; a quote right after '=' and the
    matching last quote are dropped, as is a quote around the whole `"name=value"`.
    """
    quoted = False
    in_quote = False
    if args.startswith('"'):
        args = args[1:]
        in_quote = quoted = True
    i = 0
    equals = -1
    while i < len(args):
        ch = args[i]
        if ch.isspace() and not in_quote:
            break
        if equals < 0 and ch == "=":
            equals = i
        if ch == '"':
            in_quote = not in_quote
        i += 1
    token, rest = args[:i], args[i + 1:]
    last_quote = i > 0 and args[i - 1] == '"'
    if equals < 0:
        name, value = token, None
        if quoted and last_quote:
            name = name[:-1]
    else:
        name, value = token[:equals], token[equals + 1:]
        if value.startswith('"'):
            value = value[1:]
            if last_quote:
                value = value[:-1]
        elif quoted and last_quote:
            value = value[:-1]
    return name, value, rest.lstrip()


@dataclass(frozen=True)
class Word:
    raw: str             # as written, quotes included
    name: str            # dashes read as underscores, as parameq() does
    value: str | None    # after the kernel strips its quotes


@dataclass(frozen=True)
class Cmdline:
    words: list[Word]    # the kernel's parameters
    init: str | None     # what follows `--` (init's arguments), verbatim; None without `--`

    def values(self, name: str) -> list[str | None]:
        return [w.value for w in self.words if w.name == name]

    def text(self) -> str:
        out = " ".join(w.raw for w in self.words)
        if self.init is not None:
            out = f"{out} -- {self.init}" if out else f"-- {self.init}"
        return out.strip()


def split(text: str) -> Cmdline:
    """Split like the kernel: next_arg() word by word, up to a bare `--`."""
    words: list[Word] = []
    rest = text.strip()
    while rest:
        name, value, after = next_arg(rest)
        raw = rest[:len(rest) - len(after)].strip()
        if value is None and name == "--":
            return Cmdline(words, after)
        if name:
            words.append(Word(raw, name.replace("-", "_"), value))
        rest = after
    return Cmdline(words, None)


def parse_cmdline(cmdline: str) -> dict[str, str | None]:
    """Kernel parameters by name; stops at `--` (the rest belongs to init), last value wins.

    Names are stored with dashes turned into underscores, because the kernel treats `kho-scratch`
    and `kho_scratch` as the same parameter (parameq() in kernel/params.c).
    """
    return {w.name: w.value for w in split(cmdline).words}


def param_values(cmdline: str, key: str) -> list[str | None]:
    """Every value given to one parameter, in order (some, like crashkernel=, combine)."""
    return split(cmdline).values(key.replace("-", "_"))


# --- values ----------------------------------------------------------------------------------

def kstrtobool(value: str | None) -> bool | None:
    """The kernel's kstrtobool(): None when it rejects the value (or there is none)."""
    if not value:
        return None
    first = value[0]
    if first in _TRUE_FIRST:
        return True
    if first in _FALSE_FIRST:
        return False
    if first in "oO" and len(value) > 1:
        if value[1] in "nN":
            return True
        if value[1] in "fF":
            return False
    return None


def cmdline_bool(params: dict[str, str | None], key: str, default: bool) -> bool:
    """A boolean parameter under kstrtobool() rules; absent or malformed keeps the default.

    The kernel rejects a bare `kho` (no value) and `kho=` with "Malformed early option" and
    leaves its default in place, so both give `default` here.
    """
    parsed = kstrtobool(params.get(key.replace("-", "_")))
    return default if parsed is None else parsed


def strtoull(text: str, pos: int, *, wrap: bool = True) -> tuple[int, int]:
    """simple_strtoull(s, &end, 0) from `pos`: base from the prefix (0x hex, 0 octal), no sign,
    no spaces; returns (value, end). The kernel wraps at 64 bits; `wrap=False` tells a value
    that does not fit instead: it comes back as 2**64 (the count stops there, so a long string
    of digits costs no big-number arithmetic)."""
    base = 10
    if text.startswith("0", pos):
        after_x = text[pos + 2:pos + 3]
        if text[pos + 1:pos + 2].lower() == "x" and after_x and after_x in string.hexdigits:
            base, pos = 16, pos + 2
        else:
            base = 8
    digits = "0123456789abcdef"[:base]
    value = 0
    while pos < len(text) and text[pos].lower() in digits:
        value = value * base + int(text[pos], 16)
        value = value & U64_MASK if wrap else min(value, U64_MASK + 1)
        pos += 1
    return value, pos


def memparse_prefix(text: str, pos: int, *, wrap: bool = True) -> tuple[int, int]:
    """memparse() from `pos`: a number with an optional K/M/G/T/P/E suffix, any case; returns
    (value, end). `wrap` as for strtoull()."""
    value, end = strtoull(text, pos, wrap=wrap)
    if end < len(text) and text[end].lower() in _SUFFIX_SHIFT:
        value <<= _SUFFIX_SHIFT[text[end].lower()]
        value = value & U64_MASK if wrap else min(value, U64_MASK + 1)
        end += 1
    return value, end


def memparse(text: str) -> int | None:
    """memparse() over the whole string (reserve_mem=, kho_scratch= fields); None when it does
    not consume all of it."""
    if not text:
        return None
    value, end = memparse_prefix(text, 0)
    return value if end == len(text) else None
