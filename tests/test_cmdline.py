"""The next kernel's command line as the next kernel reads it (kho_agent/kernel/cmdline.py):
refused when the handover would be lost, kept word for word otherwise."""

from __future__ import annotations

import pytest

from kho_agent.errors import InvalidArgument
from kho_agent.kernel.cmdline import (
    COMMAND_LINE_SIZE,
    MAX_ELFCOREHDR_STR_LEN,
    max_length,
    target_cmdline,
)
from kho_agent.kernel.params import split


@pytest.mark.parametrize(("base", "expected"), [
    ("console=ttyS0 root=/dev/vda", "console=ttyS0 root=/dev/vda kho=on liveupdate=on"),
    # words stay as written: double quotes (the kernel's) and single quotes (not the kernel's)
    ('x="a b" y=\'c', 'x="a b" y=\'c kho=on liveupdate=on'),
    # the kernel's parameters end at "--": what is added goes before it
    ("root=/dev/vda -- single kho=off", "root=/dev/vda kho=on liveupdate=on -- single kho=off"),
    ("-- init-arg", "kho=on liveupdate=on -- init-arg"),
    # already on, in any spelling kstrtobool takes; the last well-formed value wins
    ("kho=1 liveupdate=yes", "kho=1 liveupdate=yes"),
    ("kho=off kho=on liveupdate=On", "kho=off kho=on liveupdate=On"),
    ("kho=on kho=garbage liveupdate=on", "kho=on kho=garbage liveupdate=on"),
    # dashes and underscores are the same parameter to the kernel
    ("kho_scratch=16M,512M,256M", "kho_scratch=16M,512M,256M kho=on liveupdate=on"),
    ("", "kho=on liveupdate=on"),
])
def test_accepted_lines_keep_every_word(base: str, expected: str) -> None:
    assert target_cmdline(base) == expected


@pytest.mark.parametrize(("base", "needle"), [
    ("root=/dev/vda kho=off", "turns KHO off"),
    ("kho=on root=/dev/vda kho=0", "turns KHO off"),
    ("liveupdate=n", "turns LUO off"),
    ("kho=maybe", "not a value the kernel reads"),
    ("kho", "not a value the kernel reads"),
    ('console="ttyS0 kho=on liveupdate=on', "unbalanced double quote"),
    ("kho_scratch=16M,512M kho=on", "three sizes"),
    ("kho_scratch=1M,1M,1M kho-scratch=2M,2M,2M", "given 2 times"),
    ("kho_scratch=20E,1M,1M", "64 bits"),
    ("kho_scratch=99999999999999999999,1M,1M", "64 bits"),
    ("kho_scratch=4294967296%", "4294967295"),
])
def test_lines_that_lose_the_handover_are_refused(base: str, needle: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        target_cmdline(base)
    assert needle in exc.value.message


def test_every_problem_is_named_at_once() -> None:
    with pytest.raises(InvalidArgument) as exc:
        target_cmdline('a="b kho=off liveupdate=0')
    assert "unbalanced" in exc.value.message
    # the quote swallows the rest, so the kernel sees neither kho= nor liveupdate=; both would
    # be appended inside the quote: the refusal is the unbalanced quote


def test_scratch_replaces_the_given_value_and_is_checked() -> None:
    line = target_cmdline("kho_scratch=1M,1M,1M root=/dev/vda", scratch="16M,512M,256M")
    assert line == "root=/dev/vda kho_scratch=16M,512M,256M kho=on liveupdate=on"
    with pytest.raises(InvalidArgument, match="64 bits"):
        target_cmdline("root=/dev/vda", scratch="1M,20E,1M")


def test_nul_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="NUL"):
        target_cmdline("a\0b")


def test_length_limit_comes_from_the_image() -> None:
    # x86: cmdline_size from the setup header, less room for elfcorehdr=, less the NUL
    assert max_length(2047) == 2047 - MAX_ELFCOREHDR_STR_LEN - 1
    assert max_length(None) == COMMAND_LINE_SIZE - 1
    fits = "x" * (max_length(2047) - len(" kho=on liveupdate=on"))
    assert len(target_cmdline(fits, setup_cmdline_size=2047)) == max_length(2047)
    with pytest.raises(InvalidArgument, match="at most 2016"):
        target_cmdline(fits + "y", setup_cmdline_size=2047)


def test_split_follows_next_arg() -> None:
    line = split('a "b=c d" e="f g" -- h i')
    assert [(w.name, w.value) for w in line.words] == [("a", None), ("b", "c d"), ("e", "f g")]
    assert line.init == "h i"
