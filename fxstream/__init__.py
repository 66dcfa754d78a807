"""fxstream: Streamlined Inference for video diffusion UNets as torch.fx compiler passes.

    >>> import fxstream
    >>> pipe.unet = fxstream.compile(pipe.unet, policy=fxstream.Policy(slices=8))
    >>> pipe.unet = fxstream.compile(pipe.unet, policy=fxstream.Policy(max_memory="6GiB"))
    >>> pipe.unet = fxstream.compile(pipe.unet, policy=fxstream.Policy(rehash=fxstream.StepRehash(full_every=3, steps=25)))
"""
from . import rehash
from .api import CompiledModule, compile, explain
from .errors import CaptureError, ExecutionError, FxstreamError, MemoryBudgetError, VerificationError
from .policy import Policy
from .rehash import StepRehash
from .report import Report

__all__ = ["compile", "explain", "Policy", "StepRehash", "rehash", "CompiledModule", "Report", "FxstreamError",
           "CaptureError", "ExecutionError", "MemoryBudgetError", "VerificationError"]
__version__ = "0.1.0"
