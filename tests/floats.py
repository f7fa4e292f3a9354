"""Float comparisons relative to float32 rounding of what is compared.

Two computations of one function in float32 (another kernel, another summation order, another
CPU's vector width) differ by a few units of float32 rounding *of the magnitudes summed*, not by
a fixed amount: logits near 80 that agree to 2.8e-7 relative differ by 2.3e-5 absolute, which a
fixed ``atol=1e-5`` calls a failure on one CPU and not on another. These helpers scale the
tolerance by float32's machine epsilon and by the largest magnitude compared, so a test is as
strict on logits of 80 as on probabilities of 0.01, and the same on every machine.
"""

from __future__ import annotations

from typing import Any

import torch

EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7: one unit of float32 rounding at 1.0


def f32_tolerance(*tensors: torch.Tensor, ulps: float = 64) -> dict[str, float]:
    """``rtol`` and ``atol`` for :func:`torch.testing.assert_close`: ``ulps`` units of float32
    rounding, relative to each element and to the largest magnitude among ``tensors`` (a sum
    rounds at the scale of its largest terms, so an element near zero inherits their error)."""
    scale = max((float(t.detach().abs().max()) for t in tensors if t.numel()), default=0.0)
    return {"rtol": ulps * EPS32, "atol": ulps * EPS32 * max(scale, 1e-30)}


def assert_f32_close(
    actual: torch.Tensor, expected: torch.Tensor, *, ulps: float = 64, msg: Any = None
) -> None:
    """``actual`` equals ``expected`` (same shape, dtype and device) up to ``ulps`` units of
    float32 rounding of the largest magnitude compared (see :func:`f32_tolerance`)."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    tolerance = f32_tolerance(actual.float(), expected.float(), ulps=ulps)
    torch.testing.assert_close(
        actual, expected, **tolerance, msg=None if msg is None else lambda m: f"{msg}: {m}"
    )
