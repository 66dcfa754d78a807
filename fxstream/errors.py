"""Exceptions raised by fxstream. Every error a user can cause is an :class:`FxstreamError`."""
from __future__ import annotations


class FxstreamError(Exception):
    """Base class of the errors fxstream raises for bad input or unsupported models."""


class CaptureError(FxstreamError):
    """``torch.export`` could not capture the module; the message quotes export's reason."""


class ExecutionError(FxstreamError, RuntimeError):
    """The compiled graph raised while running: the message quotes the op's error and lists the inputs. Almost
    always inputs the module itself rejects (their dtypes or shapes do not fit its weights) that ``torch.export``
    did not check; also a ``RuntimeError``, as the module's own error would be."""


class MemoryBudgetError(FxstreamError):
    """``Policy(max_memory=...)`` is below what any slicing the budget searches can reach (weights plus the lower
    bound of the activations); raised before any compute, with both figures."""

    def __init__(self, message: str, *, max_memory: int, weight_bytes: int, lower_bound_bytes: int):
        super().__init__(message)
        self.max_memory = max_memory
        self.weight_bytes = weight_bytes
        self.lower_bound_bytes = lower_bound_bytes


class HostMemoryError(FxstreamError):
    """``Policy(host_memory=...)`` cannot hold even one value a halo region would park (NOTE [Host checkpoints]):
    raised at compile, before any compute, with the host budget and the smallest value's bytes."""

    def __init__(self, message: str, *, host_memory: int, smallest_bytes: int):
        super().__init__(message)
        self.host_memory = host_memory
        self.smallest_bytes = smallest_bytes


class CantSlice(Exception):
    """Internal: a rule refuses a cut. Caught in one place (the slicer) and reported as a reason."""


class VerificationError(FxstreamError):
    """``Policy(verify=True)``: the compiled module's output differs from the original's beyond float rounding.
    ``max_abs_diff`` is the largest difference of the outputs; ``region`` the first loop region whose output
    differs from the same values computed by the original graph (None if every region agrees)."""

    def __init__(self, message: str, *, max_abs_diff: float, region: str | None):
        super().__init__(message)
        self.max_abs_diff = max_abs_diff
        self.region = region
