"""The engine: the live-update state machine, behind one narrow facade (`Engine`, facade.py).

Its phase modules (recovery, sessions, prepare, handoff, verify) are the engine's own; what
the rest of the agent needs is here."""

from .context import EngineConfig
from .facade import Engine
from .handoff import CommitOptions, CommitResult
from .prepare import Plan, PrepareOptions
from .recovery import RecoveryResult
from .verifyrun import HostObservation, Retrieved, VerifyRun

__all__ = ["CommitOptions", "CommitResult", "Engine", "EngineConfig", "HostObservation", "Plan",
           "PrepareOptions", "RecoveryResult", "Retrieved", "VerifyRun"]
