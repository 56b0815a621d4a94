"""Finding and reading kho-agentd's configuration files, systemd's way.

    ROOT/etc/kho-agent/agent.conf               the main file (else /run's, else /usr/lib's)
    ROOT/{etc,run,usr/lib}/kho-agent/agent.conf.d/*.conf   drop-ins

The main file is the first of /etc/kho-agent/agent.conf, /run/kho-agent/agent.conf,
/usr/lib/kho-agent/agent.conf that exists. Drop-ins are collected from the three directories; a
drop-in in /etc replaces the same-named one in /run, which replaces /usr/lib's; one that is a
symbolic link to /dev/null (or an empty file) masks the lower ones. They are applied after the
main file, in the lexical order of their names, so a later one wins.

Every file is opened without following it into a FIFO or device and without blocking
(callerfile.open_regular), must be a regular file of at most CONFIG_FILE_MAX bytes, and a
directory holds at most DROPINS_MAX drop-ins: anything else is ConfigInvalid naming it.
ROOT is `/` except in tests (kho-agentd --config-root).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import AgentError, ConfigInvalid, NotFound, errno_text
from ..kernel.callerfile import open_regular
from .model import AgentConfig
from .parse import parse_config

CONFIG_FILE_MAX = 64 * 1024
DROPINS_MAX = 128
# most important first
SEARCH_DIRS = ("etc/kho-agent", "run/kho-agent", "usr/lib/kho-agent")
MAIN_NAME = "agent.conf"
DROPIN_DIR = "agent.conf.d"
DROPIN_SUFFIX = ".conf"


def _masked(path: Path) -> bool:
    return path.is_symlink() and os.path.realpath(path) == os.devnull


def config_files(root: Path) -> list[Path]:
    """The files that apply, in the order they apply (lists directories, reads no file)."""
    files: list[Path] = []
    for directory in SEARCH_DIRS:
        main = root / directory / MAIN_NAME
        if main.is_symlink() or main.exists():
            if not _masked(main):
                files.append(main)
            break
    dropins: dict[str, Path] = {}
    for directory in reversed(SEARCH_DIRS):   # least important first; later ones replace
        where = root / directory / DROPIN_DIR
        try:
            names = os.listdir(where)
        except FileNotFoundError:
            continue
        except NotADirectoryError:
            raise ConfigInvalid(f"{where}: not a directory (drop-ins go in a directory "
                                f"{DROPIN_DIR}/)") from None
        except OSError as exc:
            raise ConfigInvalid(f"{where}: cannot list it: {errno_text(exc)}") from None
        names = [n for n in names if n.endswith(DROPIN_SUFFIX) and not n.startswith(".")]
        if len(names) > DROPINS_MAX:
            raise ConfigInvalid(f"{where}: {len(names)} drop-ins, more than {DROPINS_MAX}")
        for name in names:
            dropins[name] = where / name
    files += [dropins[name] for name in sorted(dropins) if not _masked(dropins[name])]
    return files


def read_config_file(path: Path) -> bytes:
    try:
        with open_regular(path, max_size=CONFIG_FILE_MAX) as handle:
            return handle.read_all(CONFIG_FILE_MAX, allow_empty=True)
    except NotFound:
        raise ConfigInvalid(f"{path}: does not exist (a dangling link, or removed while the "
                            "configuration was read)") from None
    except AgentError as exc:
        # callerfile's messages start with the path: "PATH is a directory, not a regular file"
        reason = exc.message.removeprefix(f"{path} ")
        raise ConfigInvalid(f"{path}: {reason}") from None


def load_config(root: Path = Path("/"), base: AgentConfig | None = None) -> AgentConfig:
    """The configuration under `root` (ConfigInvalid names the file, line and key)."""
    paths = config_files(root)
    return parse_config([(str(p), read_config_file(p)) for p in paths], base)
