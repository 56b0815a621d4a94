"""What the Ansible tests share (tests/test_ansible.py against simulated daemons, tests/vm/
test_fleet.py against QEMU guests): the collection found where it is in this checkout, and the
play's recap read back."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COLLECTION = REPO / "packaging" / "ansible"
RECAP = re.compile(r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)",
                   re.M)


def link_collection(directory: Path) -> Path:
    """A collections tree under `directory` whose khoagent/liveupdate is a link to this
    checkout's packaging/ansible (no galaxy, no network); returns the tree for
    ANSIBLE_COLLECTIONS_PATH."""
    root = directory / "collections"
    tree = root / "ansible_collections" / "khoagent"
    if not tree.exists():
        tree.mkdir(parents=True)
        (tree / "liveupdate").symlink_to(COLLECTION)
    return root


def recap(output: str) -> dict[str, dict[str, int]]:
    """The last PLAY RECAP of an ansible-playbook output: host -> {ok, changed, unreachable,
    failed}."""
    return {m.group(1): {"ok": int(m.group(2)), "changed": int(m.group(3)),
                         "unreachable": int(m.group(4)), "failed": int(m.group(5))}
            for m in RECAP.finditer(output.split("PLAY RECAP")[-1])}
