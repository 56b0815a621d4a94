"""The engine: the live-update state machine, behind one narrow facade (`Engine`)."""

from .facade import (
    CommitOptions,
    CommitResult,
    Engine,
    EngineConfig,
    Plan,
    PrepareOptions,
    RecoveryResult,
)

__all__ = ["CommitOptions", "CommitResult", "Engine", "EngineConfig", "Plan", "PrepareOptions",
           "RecoveryResult"]
