"""Causal self-attention, the one function the ladder calls, and the backends behind it.

A backend takes the fused projection ``qkv`` (B, T, 3 * n_head * hs) and returns the heads
concatenated (B, T, n_head * hs). Three compute the same math:

- ``sdpa``: ``F.scaled_dot_product_attention(is_causal=True)``, everywhere.
- ``torch``: :class:`TinyCausalAttention`, batched matmuls around a softmax with a hand-written
  backward: faster than SDPA's CPU kernel on blocks of a few dozen positions.
- ``native``: the C kernel of :mod:`workbench.models.native`, faster again on such blocks.

Which one a model uses is decided once, by :func:`resolve_attention` when a job starts
(``train.attention``), and handed to the model; nothing here reads settings during a forward.
The two CPU backends hand a call they cannot take (dropout in training, a tensor on another
device) to SDPA, as a model built on the CPU and moved to a GPU needs.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from workbench.errors import WorkbenchError, first_line
from workbench.models import native
from workbench.spec import AttentionSetting

# Up to this many positions, `auto` on a CPU picks the native kernel, else the torch path: both
# faster than SDPA's CPU flash kernel there, no faster on longer blocks (benchmarks/bench_step.py).
TINY_BLOCK = native.MAX_BLOCK


class AttentionUnavailable(WorkbenchError):
    """``train.attention`` names a backend that cannot run here (no C compiler, say)."""


class AttentionBackend(Protocol):
    """Causal attention of ``n_head`` heads: ``qkv`` (B, T, 3 * n_head * hs) in, (B, T,
    n_head * hs) out. ``causal_bias`` (at least T × T) is the causal mask as an additive bias
    (0 on and below the diagonal, -inf above), for the backends that add it themselves."""

    name: str

    def __call__(
        self, qkv: torch.Tensor, n_head: int, causal_bias: torch.Tensor, dropout_p: float
    ) -> torch.Tensor: ...


def causal_bias(block_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The causal mask as an additive bias: 0 on and below the diagonal, -inf above."""
    return torch.full((block_size, block_size), float("-inf"), dtype=dtype).triu(1)


def sdpa(qkv: torch.Tensor, n_head: int, dropout_p: float = 0.0) -> torch.Tensor:
    B, T, _ = qkv.shape
    q, k, v = qkv.view(B, T, 3, n_head, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, T, hs)
    y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    return y.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh * hs)


def _softmax_last(scores: torch.Tensor) -> torch.Tensor:
    # torch.softmax over rows shorter than one AVX-512 register (16 floats) takes a scalar path
    # on the CPU: 4x slower than these four ops on (128, 8, 8).
    if scores.size(-1) >= 16:
        return torch.softmax(scores, dim=-1)
    exp = (scores - scores.amax(dim=-1, keepdim=True)).exp_()
    return exp.div_(exp.sum(dim=-1, keepdim=True))


class TinyCausalAttention(torch.autograd.Function):
    """Causal attention for short blocks, forward and backward written out.

    Takes the fused ``qkv`` projection, (B, T, 3 * n_head * hs) or as rows (B * T, ...), and the
    causal ``bias`` (T, T); returns the heads concatenated in the same layout, (..., n_head *
    hs). Two batched matmuls around a softmax forward, four batched matmuls and the softmax's
    own backward back: the same math as SDPA (a test holds them to each other), without the
    flash kernel's per-(batch, head) bookkeeping, which dominates when a block is a few dozen
    positions long.
    """

    @staticmethod
    def forward(ctx: Any, qkv: torch.Tensor, n_head: int, bias: torch.Tensor) -> torch.Tensor:
        width = qkv.size(-1)
        T = bias.size(0)
        B, hs = qkv.numel() // (width * T), width // (3 * n_head)
        if n_head == 1:  # strided views are enough: no copy
            q, k, v = qkv.reshape(B, T, 3, hs).unbind(2)
        else:
            heads = qkv.reshape(B, T, 3, n_head, hs).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
            q, k, v = heads.reshape(3, B * n_head, T, hs)
        scale = hs**-0.5
        probs = _softmax_last(torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale))
        ctx.save_for_backward(q, k, v, probs)
        ctx.scale, ctx.shape = scale, qkv.shape
        y = torch.bmm(probs, v)  # (B * nh, T, hs)
        return y.view(B, n_head, T, hs).transpose(1, 2).reshape(*qkv.shape[:-1], n_head * hs)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        q, k, v, probs = ctx.saved_tensors
        N, T, hs = q.shape
        B = dy.numel() // (T * dy.size(-1))
        n_head = N // B
        dy = dy.reshape(B, T, n_head, hs).transpose(1, 2).reshape(N, T, hs)
        grads = q.new_empty(3, N, T, hs)
        dq, dk, dv = grads
        torch.bmm(probs.transpose(1, 2), dy, out=dv)
        dprobs = torch.bmm(dy, v.transpose(1, 2))
        # softmax backward, with the score scale folded in: p * (dp - sum(dp * p)) * scale
        dscores = dprobs.sub_((dprobs * probs).sum(dim=-1, keepdim=True)).mul_(probs)
        dscores.mul_(ctx.scale)
        torch.bmm(dscores, k, out=dq)
        torch.bmm(dscores.transpose(1, 2), q, out=dk)
        dqkv = grads.view(3, B, n_head, T, hs).permute(1, 3, 0, 2, 4)  # (B, T, 3, nh, hs)
        return dqkv.reshape(ctx.shape), None, None


class _Backend:
    """Shared by the backends: a name to tag runs with; one object per job, shared by every
    copy of a model (``copy.deepcopy`` keeps it)."""

    name = ""

    def __deepcopy__(self, memo: dict[int, Any]) -> _Backend:
        return self

    def __repr__(self) -> str:
        return f"<{self.name} attention>"


class SDPAttention(_Backend):
    name = "sdpa"

    def __call__(
        self, qkv: torch.Tensor, n_head: int, causal_bias: torch.Tensor, dropout_p: float
    ) -> torch.Tensor:
        return sdpa(qkv, n_head, dropout_p)


class TorchOpsAttention(_Backend):
    name = "torch"

    def __call__(
        self, qkv: torch.Tensor, n_head: int, causal_bias: torch.Tensor, dropout_p: float
    ) -> torch.Tensor:
        if dropout_p or qkv.device.type != "cpu":
            return sdpa(qkv, n_head, dropout_p)
        return torch_ops(qkv, n_head, causal_bias)


def torch_ops(qkv: torch.Tensor, n_head: int, causal_bias: torch.Tensor) -> torch.Tensor:
    T = qkv.size(1)
    bias = causal_bias  # its size is the block length the Function assumes
    if len(bias) != T:
        if len(bias) < T:
            raise ValueError(f"{T} positions, more than the block size {len(bias)}")
        bias = bias[:T, :T]
    out: torch.Tensor = TinyCausalAttention.apply(qkv, n_head, bias)  # type: ignore[no-untyped-call]
    return out


class NativeAttention(_Backend):
    name = "native"

    def __init__(self, kernel: native.TinyAttention) -> None:
        self.kernel = kernel

    def __call__(
        self, qkv: torch.Tensor, n_head: int, causal_bias: torch.Tensor, dropout_p: float
    ) -> torch.Tensor:
        if dropout_p or qkv.device.type != "cpu":
            return sdpa(qkv, n_head, dropout_p)
        if qkv.dtype != torch.float32:  # the kernel is float32 only (float64 in gradcheck)
            return torch_ops(qkv, n_head, causal_bias)
        return self.kernel.blocks(qkv, n_head)


class PackedAttention(_Backend):
    """``inner`` for a pack of models run under ``torch.func.vmap`` (workbench.train.packed):
    the pack dimension folded into the batch, so ``inner`` runs once for every member, and
    autograd records its own backward. vmap cannot see through the ``torch`` and ``native``
    backends (autograd Functions); this is their vmap rule. Outside vmap it is ``inner``."""

    def __init__(self, inner: AttentionBackend) -> None:
        self.inner = inner
        self.name = inner.name

    def __call__(
        self, qkv: torch.Tensor, n_head: int, causal_bias: torch.Tensor, dropout_p: float
    ) -> torch.Tensor:
        if dropout_p:
            raise ValueError("packed attention has no dropout: its masks would not be a solo run's")
        out: torch.Tensor = _FoldPack.apply(qkv, n_head, causal_bias, self.inner)  # type: ignore[no-untyped-call]
        return out


class _FoldPack(torch.autograd.Function):
    @staticmethod
    def forward(
        qkv: torch.Tensor, n_head: int, bias: torch.Tensor, inner: AttentionBackend
    ) -> torch.Tensor:
        return inner(qkv, n_head, bias, 0.0)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        qkv, n_head, bias, inner = inputs
        ctx.save_for_backward(qkv, bias)
        ctx.n_head, ctx.inner = n_head, inner

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        # Outside vmap only (under vmap, ``inner``'s own backward runs): recompute, differentiate.
        qkv, bias = ctx.saved_tensors
        with torch.enable_grad():
            leaf = qkv.detach().requires_grad_()
            (dqkv,) = torch.autograd.grad(ctx.inner(leaf, ctx.n_head, bias, 0.0), leaf, dy)
        return dqkv, None, None, None

    @staticmethod
    def vmap(
        info: Any,
        in_dims: tuple[int | None, ...],
        qkv: torch.Tensor,
        n_head: int,
        bias: torch.Tensor,
        inner: AttentionBackend,
    ) -> tuple[torch.Tensor, int | None]:
        qkv_dim, bias_dim = in_dims[0], in_dims[2]
        if bias_dim is not None:
            raise ValueError("packed attention needs one causal bias for every member")
        if qkv_dim is None:
            return inner(qkv, n_head, bias, 0.0), None
        qkv = qkv.movedim(qkv_dim, 0)  # (K, B, T, W)
        K, B, T, W = qkv.shape
        out = inner(qkv.reshape(K * B, T, W), n_head, bias, 0.0)  # (K * B, T, nh * hs)
        return out.view(K, B, T, -1), 0


SDPA = SDPAttention()
TORCH_OPS = TorchOpsAttention()


def resolve_attention(
    setting: AttentionSetting,
    device: torch.device,
    block_size: int,
    head_size: int,
    dropout: float = 0.0,
) -> AttentionBackend:
    """The backend a job's models use, chosen once when it starts (``train.attention``).

    ``auto``: on a CPU, for blocks of up to ``TINY_BLOCK`` positions, the native kernel where
    one can be built (a warning where it cannot), else the torch path; SDPA otherwise, and
    always with attention dropout (the CPU paths compute none: their training steps would be
    SDPA's, and the run's ``workbench.attention`` tag would name a path it did not take).
    ``native`` and ``torch`` where they cannot run raise :class:`AttentionUnavailable`.
    """
    cpu = device.type == "cpu"
    if setting == "sdpa":
        return SDPA
    if dropout > 0:
        if setting != "auto":
            raise AttentionUnavailable(
                f"train.attention={setting} computes no attention dropout "
                f"(model.dropout is {dropout}): use auto or sdpa"
            )
        return SDPA
    if setting == "torch":
        if not cpu:
            raise AttentionUnavailable(
                f"train.attention=torch runs on the CPU, not {device.type}: use auto or sdpa"
            )
        return TORCH_OPS
    if setting == "native":
        if not cpu or block_size > native.MAX_BLOCK:
            raise AttentionUnavailable(
                f"train.attention=native runs on the CPU for blocks of at most "
                f"{native.MAX_BLOCK} positions, not {block_size} on {device.type}: use auto"
            )
        try:
            return NativeAttention(native.load(head_size))
        except native.KernelUnavailable as error:
            raise AttentionUnavailable(
                f"train.attention=native: no native attention kernel ({first_line(error)})"
            ) from None
    if not cpu or block_size > TINY_BLOCK:
        return SDPA
    kernel = native.tiny_attention(head_size)
    return TORCH_OPS if kernel is None else NativeAttention(kernel)
