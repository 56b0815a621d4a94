"""The simulated kernel: a product feature (rehearsal mode on any machine) that implements the
kernel seams (`LiveUpdate`, `Kexec`) with the behaviour of the 7.2/7.3 KHO/LUO kernel, keeps its
state in a directory, and writes byte-exact ABI structures with the decoder's encoders."""

from .kernel import SimKernel
from .versions import SimAbi, check_abi

__all__ = ["SimAbi", "SimKernel", "check_abi"]
