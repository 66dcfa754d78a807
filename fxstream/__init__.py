"""fxstream: Streamlined Inference for video diffusion UNets as torch.fx compiler passes.

    >>> import fxstream
    >>> pipe.unet = fxstream.compile(pipe.unet, policy=fxstream.Policy(slices=8))
    >>> pipe.unet = fxstream.compile(pipe.unet, policy=fxstream.Policy(max_memory="6GiB"))
    >>> pipe.unet = fxstream.compile(pipe.unet, policy=fxstream.Policy(rehash=fxstream.StepRehash(full_every=3, steps=25)))
    >>> pipe = fxstream.compile_pipeline(pipe, policy=fxstream.Policy(max_memory="6GiB"))  # UNet + VAE decoder
"""
from . import rehash
from .api import CompiledModule, compile, explain
from .distributed import Distributed, DistributedError
from .errors import CaptureError, ExecutionError, FxstreamError, HostMemoryError, MemoryBudgetError, VerificationError
from .policy import Policy
from .rehash import StepRehash
from .report import Report
from .stages import PipelineBudgetError, PipelineReport, compile_pipeline, explain_pipeline

__all__ = ["compile", "explain", "compile_pipeline", "explain_pipeline", "PipelineReport", "PipelineBudgetError",
           "Policy", "StepRehash", "rehash", "CompiledModule", "Report", "FxstreamError",
           "CaptureError", "ExecutionError", "HostMemoryError", "MemoryBudgetError", "VerificationError", "Distributed", "DistributedError"]
__version__ = "0.1.0"
