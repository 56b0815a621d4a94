"""The next kernel's command line, as the next kernel will read it.

kexec_file_load takes any bytes; the damage shows only after the kexec, when the new kernel parses
them with next_arg() (kernel/params.c) and its early parameters: a `kho=off` anywhere (or a later
one winning over an earlier `kho=on`) drops every preserved page, an unbalanced double quote
swallows everything after it into one value (the `kho=on` we append included), words after `--`
go to init and not to the kernel, and single quotes mean nothing to the kernel. So the line the
agent loads is checked here, word by word with the kernel's own tokenizer, and refused with the
fix when the next kernel would lose what was preserved.

Pure: no I/O. The kernel's tokenizer is kernel/params.py; the limits come from the target image
(setup header `cmdline_size` on x86, kernel/image.py setup_cmdline_size()).
"""

from __future__ import annotations

from ..errors import InvalidArgument
from .kho_scratch import parse_kho_scratch
from .params import U64_MASK, Cmdline, Word, kstrtobool, memparse_prefix, split

# x86's bzImage64 loader refuses (EINVAL) a command line whose length, NUL included, plus room for
# "elfcorehdr=0x<64-bit>" (MAX_ELFCOREHDR_STR_LEN, arch/x86/kernel/kexec-bzimage64.c) exceeds the
# image's setup_header.cmdline_size.
MAX_ELFCOREHDR_STR_LEN = 30
# COMMAND_LINE_SIZE of x86-64 and arm64 (asm/setup.h): the kernel keeps at most this many bytes,
# NUL included, and silently cuts the rest (arm64 reads the line from the DTB it is handed).
COMMAND_LINE_SIZE = 2048
# the parameters without which the next kernel cannot take the handover or pass it on
REQUIRED = (("kho", "KHO"), ("liveupdate", "LUO"))


def max_length(setup_cmdline_size: int | None) -> int:
    """The longest command line (without its NUL) the target takes: from its setup header on x86,
    else COMMAND_LINE_SIZE."""
    if setup_cmdline_size:
        return max(0, setup_cmdline_size - MAX_ELFCOREHDR_STR_LEN - 1)
    return COMMAND_LINE_SIZE - 1


def check_kho_scratch(value: str | None) -> None:
    """The kernel's grammar (parse_kho_scratch), plus what it accepts but cannot mean: a size
    that wraps around 64 bits (memparse() wraps silently, so `kho_scratch=20E,...` asks for far
    less than it says)."""
    parse_kho_scratch(value)
    assert value is not None  # parse_kho_scratch refused None
    if value.endswith("%"):
        return
    for field in value.split(","):
        size, _ = memparse_prefix(field, 0, wrap=False)
        if size > U64_MASK:
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
