"""AdamW over one flat buffer.

Every trainable parameter becomes a view into one tensor and its gradient a view into another,
so a step is one call of PyTorch's fused AdamW kernel and zeroing the gradients is one fill.
``torch.optim.AdamW(fused=True)`` runs the same kernel, but on the lecture's tiny models its
per-step Python bookkeeping costs more than the update itself: a whole training step of rung 2
takes 0.49 ms with this class against 0.60 ms with torch's (``benchmarks/bench_step.py``).
The update is ``torch.optim.AdamW``'s, to float rounding (a test checks it, fused and not).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def _fused_available(device: torch.device) -> bool:
    return device.type in ("cpu", "cuda") and hasattr(torch, "_fused_adamw_")


class FlatAdamW:
    """AdamW (decoupled weight decay, torch's defaults) for parameters of one device and dtype.

    The gradients are never ``None``: autograd accumulates into the views, so call
    :meth:`zero_grad` before each backward. ``model.zero_grad()`` (which sets gradients to
    ``None``) or moving the model after this is built would cut the parameters loose from the
    buffers; :meth:`step` checks for that and raises rather than train nothing.
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        fused: bool | None = None,
    ) -> None:
        if not params:
            raise ValueError("FlatAdamW needs at least one parameter")
        first = params[0]
        if any(p.device != first.device or p.dtype != first.dtype for p in params):
            raise ValueError("FlatAdamW needs every parameter on one device with one dtype")
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.fused = _fused_available(first.device) if fused is None else fused
        self.params = params
        self.flat = torch.cat([p.detach().reshape(-1) for p in params])
        self.grad = torch.zeros_like(self.flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.data = self.flat[offset : offset + n].view_as(p)
            p.grad = self.grad[offset : offset + n].view_as(p)
            offset += n
        self.exp_avg = torch.zeros_like(self.flat)
        self.exp_avg_sq = torch.zeros_like(self.flat)
        # A tensor, as the fused kernel wants it; float32 like torch.optim's step counters. The
        # unfused update reads the count from a Python int, not from the device.
        self.steps = torch.zeros((), dtype=torch.float32, device=first.device)
        self.step_number = 0

    def zero_grad(self) -> None:
        self.grad.zero_()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over every parameter: one norm of one buffer."""
        norm = torch.linalg.vector_norm(self.grad)
        self.grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        return norm

    @torch.no_grad()
    def step(self) -> None:
        first = self.params[0]
        if (
            first.data_ptr() != self.flat.data_ptr()
            or first.grad is None
            or first.grad.data_ptr() != self.grad.data_ptr()
        ):
            raise RuntimeError(
                "the parameters or their gradients no longer live in FlatAdamW's buffers "
                "(model.zero_grad(), .to() or a dtype change after the optimizer was built?)"
            )
        self.steps.add_(1)
        self.step_number += 1
        beta1, beta2 = self.betas
        if self.fused:
            torch._fused_adamw_(
                [self.flat],
                [self.grad],
                [self.exp_avg],
                [self.exp_avg_sq],
                [],
                [self.steps],
                lr=self.lr,
                beta1=beta1,
                beta2=beta2,
                weight_decay=self.weight_decay,
                eps=self.eps,
                amsgrad=False,
                maximize=False,
            )
            return
        # torch.optim.AdamW's single-tensor update, for devices without the fused kernel.
        step = self.step_number
        self.flat.mul_(1 - self.lr * self.weight_decay)
        self.exp_avg.lerp_(self.grad, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(self.grad, self.grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = math.sqrt(1 - beta2**step)
        denom = (self.exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
        self.flat.addcdiv_(self.exp_avg, denom, value=-self.lr / bias_correction1)

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": "flat_adamw",
            "steps": self.steps.clone(),
            "exp_avg": self.exp_avg.clone(),
            "exp_avg_sq": self.exp_avg_sq.clone(),
            "lr": self.lr,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Our own state, or ``torch.optim.AdamW``'s for the same parameters in the same order
        (what checkpoints written before this class hold)."""
        if state.get("format") != "flat_adamw":
            state = self._from_torch_adamw(state)
        if state["exp_avg"].shape != self.flat.shape:
            raise ValueError("the checkpoint's optimizer state does not fit this model")
        self.steps.copy_(state["steps"])
        self.step_number = int(state["steps"].item())
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])
        self.lr = state["lr"]

    def _from_torch_adamw(self, state: dict[str, Any]) -> dict[str, Any]:
        groups, per_param = state.get("param_groups"), state.get("state")
        ids = [i for group in groups or [] for i in group["params"]]
        if (
            per_param is None
            or len(ids) != len(self.params)
            or any(i not in per_param for i in ids)
        ):
            raise ValueError("the checkpoint's optimizer state does not fit this model")
        assert groups is not None
        return {
            "steps": torch.as_tensor(per_param[ids[0]]["step"], dtype=torch.float32),
            "exp_avg": torch.cat([per_param[i]["exp_avg"].reshape(-1) for i in ids]),
            "exp_avg_sq": torch.cat([per_param[i]["exp_avg_sq"].reshape(-1) for i in ids]),
            "lr": groups[0]["lr"],
        }
