"""AdamW over one flat buffer.

Every trainable parameter becomes a view into one tensor and its gradient a view into another,
so a step is one call of PyTorch's fused AdamW kernel (a private API: ``workbench.compat``, with
the same update in public ops as its fallback) and zeroing the gradients is one fill.
Parameter groups with a learning rate each (one per member of a packed run) cost a few more
element-wise passes over the same buffer, never a call per group.
``torch.optim.AdamW(fused=True)`` runs the same kernel, but on the lecture's tiny models its
per-step Python bookkeeping costs more than the update itself: a whole training step of rung 2
takes 0.49 ms with this class against 0.60 ms with torch's (``benchmarks/bench_step.py``).
The update is ``torch.optim.AdamW``'s, to float rounding (a test checks it, fused and not).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn

from workbench import compat


def _as_groups(
    params: Sequence[nn.Parameter] | Sequence[Sequence[nn.Parameter]],
) -> list[list[nn.Parameter]]:
    """One list of parameters is one group."""
    items = list(params)
    if all(isinstance(item, torch.Tensor) for item in items):
        return [cast(list[nn.Parameter], items)]
    return [list(cast(Sequence[nn.Parameter], group)) for group in items]


class FusedUnavailable(ValueError):
    """``fused=True`` where torch's fused AdamW kernel is not available."""


class FlatAdamW:
    """AdamW (decoupled weight decay, torch's defaults) for parameters of one device and dtype.

    ``params`` is one list of parameters, or a list of groups (lists), each of which may have a
    learning rate of its own: ``lr`` is one float for every parameter, or a tensor, either 0-d
    (one rate, kept on the device: setting it never waits for the device) or with one rate per
    group. Groups lie one after another in the flat buffer. ``weight_decay`` is likewise one
    float, or a tensor with one decay per group (members of a pack that differ in it).

    The gradients are never ``None``: autograd accumulates into the views, so call
    :meth:`zero_grad` before each backward. ``model.zero_grad()`` (which sets gradients to
    ``None``) or moving the model after this is built would cut the parameters loose from the
    buffers; :meth:`step` checks for that and raises rather than train nothing.
    """

    def __init__(
        self,
        params: Sequence[nn.Parameter] | Sequence[Sequence[nn.Parameter]],
        lr: float | torch.Tensor,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float | torch.Tensor = 0.01,
        fused: bool | None = None,
    ) -> None:
        groups = _as_groups(params)
        flat_params = [p for group in groups for p in group]
        if not flat_params or any(not group for group in groups):
            raise ValueError("FlatAdamW needs at least one parameter in each group")
        first = flat_params[0]
        if any(p.device != first.device or p.dtype != first.dtype for p in flat_params):
            raise ValueError("FlatAdamW needs every parameter on one device with one dtype")
        if isinstance(weight_decay, torch.Tensor):
            if weight_decay.shape != (len(groups),):
                raise ValueError(
                    f"weight_decay must be a float or one decay per group ({len(groups)}), "
                    f"not a tensor of shape {tuple(weight_decay.shape)}"
                )
            weight_decay = weight_decay.detach().to(first.device, torch.float32)
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        # torch's fused kernel is private (workbench.compat): None takes the public update.
        self._kernel = compat.fused_adamw(first.device) if fused is not False else None
        if fused and self._kernel is None:
            raise FusedUnavailable(
                "FlatAdamW(fused=True): torch's fused AdamW kernel is not available here "
                "(or WORKBENCH_PUBLIC_APIS=1 turned it off)"
            )
        self.params = flat_params
        self.group_sizes = torch.tensor(
            [sum(p.numel() for p in group) for group in groups], device=first.device
        )
        self.flat = torch.cat([p.detach().reshape(-1) for p in flat_params])
        self.grad = torch.zeros_like(self.flat)
        offset = 0
        for p in flat_params:
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
        self.direction: torch.Tensor | None = None  # scratch for one rate per group
        self.lr = lr

    @property
    def fused(self) -> bool:
        """Whether a step is torch's fused kernel (else the same update in element-wise ops)."""
        return self._kernel is not None

    @property
    def lr(self) -> float | torch.Tensor:
        return self._lr

    @lr.setter
    def lr(self, value: float | torch.Tensor) -> None:
        if isinstance(value, torch.Tensor):
            if value.dim() > 1 or (value.dim() == 1 and len(value) != len(self.group_sizes)):
                raise ValueError(
                    f"lr must be a float, a 0-d tensor or one rate per group "
                    f"({len(self.group_sizes)}), not a tensor of shape {tuple(value.shape)}"
                )
            value = value.detach().to(self.flat.device, torch.float32)
        self._lr = value

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
        lr, weight_decay = self._lr, self.weight_decay
        one_rate = not isinstance(lr, torch.Tensor) or lr.dim() == 0
        if one_rate and not isinstance(weight_decay, torch.Tensor):
            self._update(self.flat, lr, weight_decay)  # one rate: one fused call
            return
        if one_rate:  # one rate, a decay per group
            lr = torch.as_tensor(lr, dtype=torch.float32, device=self.flat.device)
            lr = lr.expand(len(self.group_sizes))
        assert isinstance(lr, torch.Tensor)
        # One rate per group: the update at rate 1 without decay (AdamW's update is linear in
        # the rate), then each element scaled by its group's rate, decay included.
        if self.direction is None:
            self.direction = torch.empty_like(self.flat)
        self.direction.zero_()
        self._update(self.direction, 1.0, 0.0)
        numel = self.flat.numel()
        lr_each = torch.repeat_interleave(lr, self.group_sizes, output_size=numel)
        if isinstance(weight_decay, torch.Tensor):
            decay_each = torch.repeat_interleave(
                lr * weight_decay, self.group_sizes, output_size=numel
            )
            self.flat.addcmul_(decay_each, self.flat, value=-1.0)
        else:
            self.flat.addcmul_(lr_each, self.flat, value=-weight_decay)
        self.flat.addcmul_(lr_each, self.direction)

    def _update(self, param: torch.Tensor, lr: float | torch.Tensor, weight_decay: float) -> None:
        """AdamW's update of ``param`` from the gradient buffer, advancing the moments."""
        beta1, beta2 = self.betas
        if self._kernel is not None:
            self._kernel(
                [param],
                [self.grad],
                [self.exp_avg],
                [self.exp_avg_sq],
                [],
                [self.steps],
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                weight_decay=weight_decay,
                eps=self.eps,
                amsgrad=False,
                maximize=False,
            )
            return
        # torch.optim.AdamW's single-tensor update, for devices without the fused kernel.
        step = self.step_number
        param.mul_(1 - lr * weight_decay)
        self.exp_avg.lerp_(self.grad, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(self.grad, self.grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = math.sqrt(1 - beta2**step)
        denom = (self.exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
        if isinstance(lr, torch.Tensor):
            param.sub_(self.exp_avg / denom * (lr / bias_correction1))
        else:
            param.addcdiv_(self.exp_avg, denom, value=-lr / bias_correction1)

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": "flat_adamw",
            "steps": self.steps.clone(),
            "exp_avg": self.exp_avg.clone(),
            "exp_avg_sq": self.exp_avg_sq.clone(),
            "lr": self.lr.clone() if isinstance(self.lr, torch.Tensor) else self.lr,
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
