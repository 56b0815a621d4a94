"""The next kernel's command line, as the next kernel will read it.

kexec_file_load takes any bytes; the damage shows only after the kexec, when the new kernel parses
them with next_arg() (kernel/params.c) and its early parameters: a `kho=off` anywhere (or a later
one winning over an earlier `kho=on`) drops every preserved page, an unbalanced double quote
swallows everything after it into one value (the `kho=on` we append included), words after `--`
go to init and not to the kernel, and single quotes mean nothing to the kernel. So the line the
agent loads is checked here, word by word with the kernel's own tokenizer, and refused with the
fix when the next kernel would lose what was preserved.

Pure: no I/O. The limits come from the target image (setup header `cmdline_size` on x86).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import InvalidArgument
from ..scratch import U64_MASK, parse_kho_scratch
from .sysinfo import _next_arg, kstrtobool

# x86's bzImage64 loader refuses (EINVAL) a command line whose length, NUL included, plus room for
# "elfcorehdr=0x<64-bit>" (MAX_ELFCOREHDR_STR_LEN, arch/x86/kernel/kexec-bzimage64.c) exceeds the
# image's setup_header.cmdline_size.
MAX_ELFCOREHDR_STR_LEN = 30
# COMMAND_LINE_SIZE of x86-64 and arm64 (asm/setup.h): the kernel keeps at most this many bytes,
# NUL included, and silently cuts the rest (arm64 reads the line from the DTB it is handed).
COMMAND_LINE_SIZE = 2048
# the parameters without which the next kernel cannot take the handover or pass it on
REQUIRED = (("kho", "KHO"), ("liveupdate", "LUO"))


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
        name, value, after = _next_arg(rest)
        raw = rest[:len(rest) - len(after)].strip()
        if value is None and name == "--":
            return Cmdline(words, after)
        if name:
            words.append(Word(raw, name.replace("-", "_"), value))
        rest = after
    return Cmdline(words, None)


# x86 boot protocol (Documentation/arch/x86/boot.rst): "HdrS" at 0x202, the protocol version at
# 0x206, cmdline_size (protocol >= 2.06) at 0x238
_HDRS, _VERSION, _CMDLINE_SIZE, _CMDLINE_SIZE_PROTOCOL = 0x202, 0x206, 0x238, 0x0206


def setup_cmdline_size(head: bytes) -> int | None:
    """An x86 bzImage's setup_header.cmdline_size from the first bytes of the file; None for
    other images (their limit is COMMAND_LINE_SIZE)."""
    if len(head) < _CMDLINE_SIZE + 4 or head[_HDRS:_HDRS + 4] != b"HdrS":
        return None
    if struct.unpack_from("<H", head, _VERSION)[0] < _CMDLINE_SIZE_PROTOCOL:
        return 255  # before 2.06 the boot protocol takes 255 bytes
    return int(struct.unpack_from("<I", head, _CMDLINE_SIZE)[0])


def max_length(setup_cmdline_size: int | None) -> int:
    """The longest command line (without its NUL) the target takes: from its setup header on x86,
    else COMMAND_LINE_SIZE."""
    if setup_cmdline_size:
        return max(0, setup_cmdline_size - MAX_ELFCOREHDR_STR_LEN - 1)
    return COMMAND_LINE_SIZE - 1


def _strict_memparse(field: str) -> int | None:
    """A memparse() field computed without wrapping: None when it is not one number."""
    text = field
    base = 10
    if text[:2].lower() == "0x" and len(text) > 2:
        base, text = 16, text[2:]
    elif text.startswith("0") and len(text) > 1 and text[1].isdigit():
        base, text = 8, text[1:]
    shift = 0
    if text and text[-1].lower() in "kmgtpe":
        shift = 10 * ("kmgtpe".index(text[-1].lower()) + 1)
        text = text[:-1]
    try:
        return int(text, base) << shift if text else None
    except ValueError:
        return None


def check_kho_scratch(value: str | None) -> None:
    """The kernel's grammar (parse_kho_scratch), plus what it accepts but cannot mean: a size
    that wraps around 64 bits (memparse() wraps silently, so `kho_scratch=20E,...` asks for far
    less than it says)."""
    parse_kho_scratch(value)
    assert value is not None  # parse_kho_scratch refused None
    if value.endswith("%"):
        return
    for field in value.split(","):
        size = _strict_memparse(field)
        if size is not None and size > U64_MASK:
            raise InvalidArgument(f"kho_scratch={value}: {field} does not fit in 64 bits; the "
                                  "kernel would wrap it around to another size. Give sizes the "
                                  "machine can have (e.g. 16M,512M,256M)")


def target_cmdline(base: str, *, scratch: str | None = None,
                   setup_cmdline_size: int | None = None) -> str:
    """The command line to load the next kernel with: `base` (the caller's, or the running
    kernel's) with `kho_scratch=<scratch>` replacing any given one, `kho=on liveupdate=on` added
    where absent (before any `--`), every word kept as written. Raises InvalidArgument listing
    every reason the next kernel would lose the handover, each with its fix."""
    problems: list[str] = []
    if "\0" in base:
        raise InvalidArgument("the kernel command line contains a NUL byte: the kernel stops "
                              "reading there; remove it")
    if base.count('"') % 2:
        problems.append('an unbalanced double quote: the kernel reads everything after it as '
                        'one value (parameters after it, kho=on included, would be lost); '
                        'close the quote')
    line = split(base)
    words = list(line.words)
    if scratch is not None:
        check_kho_scratch(scratch)
        words = [w for w in words if w.name != "kho_scratch"]
        words.append(Word(f"kho_scratch={scratch}", "kho_scratch", scratch))
    given = [w.value for w in words if w.name == "kho_scratch"]
    if len(given) > 1:
        problems.append(f"kho_scratch= is given {len(given)} times; give it once")
    for value in given:
        try:
            check_kho_scratch(value)
        except InvalidArgument as exc:
            problems.append(exc.message)
    for name, what in REQUIRED:
        values = [w.value for w in words if w.name == name]
        # each occurrence is parsed in order and a malformed one changes nothing: the last
        # well-formed one decides
        parsed = [kstrtobool(v) for v in values]
        decided = [p for p in parsed if p is not None]
        if not values:
            words.append(Word(f"{name}=on", name, "on"))
        elif not decided:
            problems.append(f"{name}={values[-1] or ''} is not a value the kernel reads as on or "
                            f"off: it ignores it and {what} stays off; write {name}=on")
        elif not decided[-1]:
            problems.append(f"{name}= turns {what} off in the next kernel "
                            f"({' '.join(w.raw for w in words if w.name == name)}): it would "
                            "not take the handover and every preserved page would be lost; "
                            f"remove it or write {name}=on")
    text = Cmdline(words, line.init).text()
    limit = max_length(setup_cmdline_size)
    size = len(text.encode("utf-8", errors="surrogateescape"))
    if size > limit:
        problems.append(f"the command line has {size} bytes but the next kernel takes at most "
                        f"{limit}: kexec refuses it or the kernel cuts it; shorten it")
    if problems:
        raise InvalidArgument("the next kernel's command line is refused: " + "; ".join(problems))
    return text
