"""How far a sliced result may lie from the original: the rounding of the dtype and of the backend's kernels.

Slicing changes how kernels block their sums (a convolution over 4 frames rounds differently from one over 8),
so a correct compile differs from the original by a few units of the arithmetic's precision, times the output's
magnitude. That precision is the dtype's, except where the backend computes float32 matmuls and convolutions in
TF32 (10 mantissa bits; CUDA's cuDNN does so for convolutions by default) or in bfloat16
(``torch.set_float32_matmul_precision("medium")``).
"""
from __future__ import annotations

import torch

__all__ = ["arithmetic_eps", "verify_tolerance"]

_ULPS = 8  # units of the arithmetic's precision a correct compile may differ by (measured 2-3, see test_dtypes)
_TF32_EPS = 2.0 ** -10
_BF16_EPS = torch.finfo(torch.bfloat16).eps


def _reduced_float32_eps(device: torch.device) -> float:
    """The precision float32 matmuls and convolutions actually run at on ``device``'s backend."""
    if device.type != "cuda":
        return torch.finfo(torch.float32).eps
    precision = torch.get_float32_matmul_precision()
    if precision == "medium":
        return _BF16_EPS
    if precision == "high" or torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32:
        return _TF32_EPS
    return torch.finfo(torch.float32).eps


def arithmetic_eps(t: torch.Tensor) -> float:
    """The relative precision that produced ``t``: its dtype's epsilon, or TF32's / bf16's for float32 on a
    backend set to compute in them."""
    eps = torch.finfo(t.dtype).eps
    if t.dtype == torch.float32:
        eps = max(eps, _reduced_float32_eps(t.device))
    return eps


def verify_tolerance(outputs) -> float:
    """The largest difference ``Policy(verify=True)`` accepts between compiled and original ``outputs`` (the
    original's floating tensors): ``max(1e-5, 8 eps)`` times the largest magnitude (at least 1)."""
    floats = [t for t in outputs if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
    eps = max((arithmetic_eps(t) for t in floats), default=torch.finfo(torch.float32).eps)
    scale = max((float(t.abs().max()) for t in floats), default=1.0)
    return max(1e-5, _ULPS * eps) * max(1.0, scale)
