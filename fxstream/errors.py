"""Exceptions raised by fxstream. Every error a user can cause is an :class:`FxstreamError`."""
from __future__ import annotations


class FxstreamError(Exception):
    """Base class of the errors fxstream raises for bad input or unsupported models."""


class CaptureError(FxstreamError):
    """``torch.export`` could not capture the module; the message quotes export's reason."""


class CantSlice(Exception):
    """Internal: a rule refuses a cut. Caught in one place (the slicer) and reported as a reason."""
