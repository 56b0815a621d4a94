"""End-to-end on a real KHO/LUO kernel: host-side harness for the QEMU guests (issue 5).

Nothing here runs inside the guest; files that go into the guest live in ``tests/vm/guest``.
"""
