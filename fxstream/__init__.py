"""fxstream: Streamlined Inference for video diffusion UNets as torch.fx compiler passes.

    >>> import fxstream
    >>> pipe.unet = fxstream.compile(pipe.unet, policy=fxstream.Policy(slices=8))
    >>> pipe.unet = fxstream.compile(pipe.unet, policy=fxstream.Policy(max_memory="6GiB"))
"""
from .api import CompiledModule, compile, explain
from .errors import CaptureError, ExecutionError, FxstreamError, MemoryBudgetError
from .policy import Policy
from .report import Report

__all__ = ["compile", "explain", "Policy", "CompiledModule", "Report", "FxstreamError", "CaptureError",
           "ExecutionError", "MemoryBudgetError"]
__version__ = "0.1.0"
