"""kho-agent: live-update orchestrator for KHO (Kexec HandOver) and LUO (/dev/liveupdate)."""

__version__ = "0.1.0"
