"""The suite's float comparisons: relative to float32 rounding of what is compared."""

from __future__ import annotations

import pytest
import torch
from floats import EPS32, assert_f32_close


def test_rounding_of_large_logits_passes_where_a_fixed_atol_failed() -> None:
    """Logits near 80 that differ by 2.3e-5 (2.8e-7 relative, seen on an AVX2-only CPU)."""
    logits = torch.full((3, 8), 80.0)
    other = logits + 2.3e-5
    fixed = {"rtol": 0.0, "atol": 1e-5}  # the tolerance this replaced: no relative part
    with pytest.raises(AssertionError):
        torch.testing.assert_close(other, logits, **fixed)
    assert_f32_close(other, logits)


def test_a_real_difference_fails_at_every_scale() -> None:
    for scale in (1e-3, 1.0, 80.0, 1e4):
        values = torch.linspace(-scale, scale, 16)
        assert_f32_close(values * (1 + 4 * EPS32), values)
        with pytest.raises(AssertionError, match="step 3"):
            assert_f32_close(values * (1 + 1e-4), values, msg="step 3")


def test_empty_tensors_compare_equal_and_shapes_must_match() -> None:
    assert_f32_close(torch.empty(0), torch.empty(0))
    with pytest.raises(AssertionError):
        assert_f32_close(torch.ones(2), torch.ones(3))
