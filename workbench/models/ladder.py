"""The ladder of "Let's build GPT", top to bottom: bigram → averaging the past → one head of
self-attention → many heads → transformer blocks. Each model is built from its
:class:`~workbench.spec.ModelConfig`, the vocabulary size and the block size, and has
``forward(idx, targets=None) -> (logits, loss)`` and ``generate``.

Attention is computed the fast way, never one Python module per head: one fused QKV projection,
then ``scaled_dot_product_attention(is_causal=True)``, or on a CPU for blocks of up to
``TINY_BLOCK`` positions (the lecture's 8, the ablation's 8-32) a C kernel compiled on first use
(:mod:`workbench.models.native`), or where none can be built :class:`TinyCausalAttention`, the same
math in batched matmuls with a hand-written backward.

Between the embeddings and the head, activations are rows, one per position: ``(B * T, C)``,
with the block length ``T`` passed alongside to whatever mixes positions. Every ``Linear`` is
then one matmul in the autograd graph, without the two reshapes a ``(B, T, C)`` input adds
around it (tiny models are dispatch-bound: 2-3% of a rung-6 step, `benchmarks/ab_models.py`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from workbench.models import native as kernels
from workbench.spec import ModelConfig


class LanguageModel(nn.Module):
    """Shared plumbing: the loss, generation, and (for attention models) attention maps."""

    def __init__(self, config: ModelConfig, vocab_size: int, block_size: int) -> None:
        super().__init__()
        self.config = config
        self.vocab_size = vocab_size
        self.block_size = block_size

    def row_logits(self, idx: torch.Tensor) -> torch.Tensor:
        """(B * T, vocab): the next-token logits of every position of ``idx`` (B, T), a row each."""
        raise NotImplementedError

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T, vocab): ``row_logits`` in the shape of ``idx``."""
        return self.row_logits(idx).view(*idx.shape, -1)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.row_logits(idx)  # (B * T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float(), targets.reshape(-1))
        return logits.view(*idx.shape, -1), loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend ``idx`` (B, T) by ``max_new_tokens``, feeding at most ``block_size`` back."""
        for _ in range(max_new_tokens):
            context = idx[:, -self.block_size :]
            logits = self.logits(context)[:, -1, :].float() / max(temperature, 1e-8)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)
            next_id = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, next_id), dim=1)
        return idx

    def attention_weights(self, idx: torch.Tensor) -> torch.Tensor | None:
        """(n_layer, n_head, T, T) attention probabilities for one sequence, or None."""
        return None

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class Bigram(LanguageModel):
    """Rung 0: a vocab × vocab table, read straight off as the next character's logits."""

    def __init__(self, config: ModelConfig, vocab_size: int, block_size: int) -> None:
        super().__init__(config, vocab_size, block_size)
        self.token_embedding = nn.Embedding(vocab_size, vocab_size)

    def row_logits(self, idx: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(idx.reshape(-1))  # (B * T, vocab)


class Embedded(LanguageModel):
    """Token plus position embeddings in, ``lm_head`` out; subclasses mix positions between."""

    def __init__(self, config: ModelConfig, vocab_size: int, block_size: int) -> None:
        super().__init__(config, vocab_size, block_size)
        self.token_embedding = nn.Embedding(vocab_size, config.n_embd)
        self.position_embedding = nn.Embedding(block_size, config.n_embd)
        self.lm_head = nn.Linear(self.head_width(), vocab_size)

    def head_width(self) -> int:
        return self.config.n_embd

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        # Positions 0..T-1 are the table's first T rows: the same as an embedding lookup of
        # arange(T), with fewer ops per step (tiny models are dispatch-bound).
        table, T = self.position_embedding.weight, idx.size(1)
        positions = table if len(table) == T else table[:T]  # (T, C)
        return self.token_embedding(idx) + positions  # (B, T, C)

    def mix(self, x: torch.Tensor, T: int) -> torch.Tensor:
        """Rows (B * T, C) of blocks of ``T`` positions in, rows out; position t may only
        see positions up to t of its own block."""
        return x

    def row_logits(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        x = self.embed(idx).view(B * T, -1)  # (B * T, C)
        return self.lm_head(self.mix(x, T))


def causal_mask(block_size: int) -> torch.Tensor:
    return torch.tril(torch.ones(block_size, block_size, dtype=torch.bool))


def causal_bias(block_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The causal mask as an additive bias: 0 on and below the diagonal, -inf above."""
    return torch.full((block_size, block_size), float("-inf"), dtype=dtype).triu(1)


class UniformAverage(Embedded):
    """Each position takes the mean of positions ≤ t (the seeds' version 2: tril / rowsum)."""

    weights: torch.Tensor  # (block_size, block_size) buffer

    def __init__(self, config: ModelConfig, vocab_size: int, block_size: int) -> None:
        super().__init__(config, vocab_size, block_size)
        tril = torch.tril(torch.ones(block_size, block_size))
        self.register_buffer("weights", tril / tril.sum(1, keepdim=True), persistent=False)

    def mix(self, x: torch.Tensor, T: int) -> torch.Tensor:
        blocks = x.view(-1, T, x.size(-1))  # (B, T, C)
        return (self.weights[:T, :T] @ blocks).view_as(x)  # (T, T) @ (B, T, C)

    def attention_weights(self, idx: torch.Tensor) -> torch.Tensor | None:
        T = idx.size(-1)
        return self.weights[:T, :T][None, None].clone()


class SoftmaxAverage(Embedded):
    """The seeds' version 3: affinities, masked to the past, softmaxed. The affinities are a
    parameter that starts at zero (uniform averaging); position-dependent, not data-dependent."""

    mask: torch.Tensor  # (block_size, block_size) bool buffer

    def __init__(self, config: ModelConfig, vocab_size: int, block_size: int) -> None:
        super().__init__(config, vocab_size, block_size)
        affinity = torch.zeros(block_size, block_size)
        self.affinity = nn.Parameter(affinity, requires_grad=config.learnable)
        self.register_buffer("mask", causal_mask(block_size), persistent=False)

    def mixing_weights(self, T: int) -> torch.Tensor:
        wei = self.affinity[:T, :T].masked_fill(~self.mask[:T, :T], float("-inf"))
        return F.softmax(wei, dim=-1)  # (T, T)

    def mix(self, x: torch.Tensor, T: int) -> torch.Tensor:
        blocks = x.view(-1, T, x.size(-1))  # (B, T, C)
        return (self.mixing_weights(T) @ blocks).view_as(x)

    def attention_weights(self, idx: torch.Tensor) -> torch.Tensor | None:
        return self.mixing_weights(idx.size(-1))[None, None].detach()


def dropout_layer(p: float) -> nn.Module:
    """``nn.Dropout(p)``, or nothing to call when ``p`` is 0 (tiny models pay for every call)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


# Up to this many positions, attention on a CPU goes through the compiled kernel of
# workbench.models.native, or TinyCausalAttention where none can be built: both faster than
# SDPA's CPU flash kernel there (benchmarks/bench_step.py), no faster on longer blocks.
TINY_BLOCK = 32  # kernels.MAX_BLOCK is the C kernel's limit


def _softmax_last(scores: torch.Tensor) -> torch.Tensor:
    # torch.softmax over rows shorter than one AVX-512 register (16 floats) takes a scalar path
    # on the CPU: 4x slower than these four ops on (128, 8, 8).
    if scores.size(-1) >= 16:
        return torch.softmax(scores, dim=-1)
    exp = (scores - scores.amax(dim=-1, keepdim=True)).exp_()
    return exp.div_(exp.sum(dim=-1, keepdim=True))


class TinyCausalAttention(torch.autograd.Function):
    """Causal attention for short blocks on a CPU, forward and backward written out.

    Takes the fused ``qkv`` projection as rows (B * T, 3 * n_head * hs) and the causal ``bias``
    (T, T), and returns the heads concatenated as rows (B * T, n_head * hs). Two batched matmuls
    around a softmax forward, four batched matmuls and the softmax's own backward back: the same
    math as SDPA (a test holds them to each other), without the flash kernel's per-(batch, head)
    bookkeeping, which dominates when a block is a few dozen positions long.
    """

    @staticmethod
    def forward(ctx: Any, qkv: torch.Tensor, n_head: int, bias: torch.Tensor) -> torch.Tensor:
        rows, width = qkv.shape
        T = bias.size(0)
        B, hs = rows // T, width // (3 * n_head)
        if n_head == 1:  # strided views are enough: no copy
            q, k, v = qkv.reshape(B, T, 3, hs).unbind(2)
        else:
            heads = qkv.reshape(B, T, 3, n_head, hs).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
            q, k, v = heads.reshape(3, B * n_head, T, hs)
        scale = hs**-0.5
        probs = _softmax_last(torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale))
        ctx.save_for_backward(q, k, v, probs)
        ctx.scale = scale
        y = torch.bmm(probs, v)  # (B * nh, T, hs)
        return y.view(B, n_head, T, hs).transpose(1, 2).reshape(rows, n_head * hs)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        q, k, v, probs = ctx.saved_tensors
        N, T, hs = q.shape
        rows = dy.size(0)
        B = rows // T
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
        dqkv = grads.view(3, B, n_head, T, hs).permute(1, 3, 0, 2, 4)
        return dqkv.reshape(rows, 3 * n_head * hs), None, None


class CausalSelfAttention(nn.Module):
    """``n_head`` heads of ``head_size`` in one fused QKV projection, concatenated, optionally
    projected back to ``n_embd``."""

    causal_bias: torch.Tensor  # (block_size, block_size): 0 on and below the diagonal, -inf above

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        head_size: int,
        block_size: int,
        proj: bool,
        dropout: float,
    ) -> None:
        super().__init__()
        self.n_head, self.head_size, self.dropout = n_head, head_size, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_head * head_size, bias=False)
        self.proj = nn.Linear(n_head * head_size, n_embd) if proj else None
        self.resid_dropout = dropout_layer(dropout)
        self.register_buffer("causal_bias", causal_bias(block_size), persistent=False)

    def _qkv(self, x: torch.Tensor, T: int) -> tuple[torch.Tensor, ...]:
        """Queries, keys and values of rows ``x`` (B * T, C), each (B, nh, T, hs)."""
        qkv = self.qkv(x).view(-1, T, 3, self.n_head, self.head_size)  # (B, T, 3, nh, hs)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: torch.Tensor, T: int) -> torch.Tensor:
        """Rows (B * T, C) in, rows (B * T, n_head * head_size or n_embd) out."""
        dropout = self.dropout if self.training else 0.0
        if x.device.type == "cpu" and T <= TINY_BLOCK and dropout == 0.0:
            bias = self.causal_bias  # its size is the block length the Function assumes
            if len(bias) != T:
                if len(bias) < T:
                    raise ValueError(f"{T} positions, more than the block size {len(bias)}")
                bias = bias[:T, :T]
            qkv = self.qkv(x)
            kernel = kernels.tiny_attention(self.head_size) if qkv.dtype == torch.float32 else None
            if kernel is not None:
                y = kernel(qkv, self.n_head, T)
            else:
                y = TinyCausalAttention.apply(qkv, self.n_head, bias)  # type: ignore[no-untyped-call]
        else:
            q, k, v = self._qkv(x, T)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
            y = y.transpose(1, 2).reshape(x.size(0), -1)  # heads concatenated
        if self.proj is not None:
            y = self.resid_dropout(self.proj(y))
        return y

    def weights(self, x: torch.Tensor, T: int) -> torch.Tensor:
        """(B, nh, T, T) attention probabilities of rows ``x``, computed explicitly (for
        inspection only)."""
        q, k, _ = self._qkv(x, T)
        wei = (q @ k.transpose(-2, -1)) * self.head_size**-0.5
        return F.softmax(wei + self.causal_bias[:T, :T], dim=-1)


class SingleHead(Embedded):
    """Rung 2: one causal self-attention head of ``head_size`` (default ``n_embd``)."""

    def __init__(self, config: ModelConfig, vocab_size: int, block_size: int) -> None:
        super().__init__(config, vocab_size, block_size)
        self.attention = CausalSelfAttention(
            config.n_embd,
            1,
            self.head_width(),
            block_size,
            proj=False,
            dropout=config.dropout,
        )

    def head_width(self) -> int:
        return self.config.head_size or self.config.n_embd

    def mix(self, x: torch.Tensor, T: int) -> torch.Tensor:
        return self.attention(x, T)

    def attention_weights(self, idx: torch.Tensor) -> torch.Tensor | None:
        T = idx.size(-1)
        return self.attention.weights(self.embed(idx).flatten(0, 1), T)[0][None].detach()


class MultiHead(Embedded):
    """Rung 3: ``n_head`` heads of ``n_embd / n_head``, concatenated (projected if ``proj``)."""

    def __init__(self, config: ModelConfig, vocab_size: int, block_size: int) -> None:
        super().__init__(config, vocab_size, block_size)
        self.attention = CausalSelfAttention(
            config.n_embd,
            config.n_head,
            config.n_embd // config.n_head,
            block_size,
            proj=bool(config.proj),
            dropout=config.dropout,
        )

    def mix(self, x: torch.Tensor, T: int) -> torch.Tensor:
        return self.attention(x, T)

    def attention_weights(self, idx: torch.Tensor) -> torch.Tensor | None:
        T = idx.size(-1)
        return self.attention.weights(self.embed(idx).flatten(0, 1), T)[0][None].detach()


def feed_forward(kind: str, n_embd: int, dropout: float) -> nn.Module | None:
    """``linear``: the lecture's Linear + ReLU (rung 4); ``mlp``: 4× wide with projection."""
    if kind == "none":
        return None
    if kind == "linear":
        return nn.Sequential(nn.Linear(n_embd, n_embd), nn.ReLU(inplace=True))
    return nn.Sequential(
        nn.Linear(n_embd, 4 * n_embd),
        nn.ReLU(inplace=True),  # on the Linear's fresh output: one tensor fewer per call
        nn.Linear(4 * n_embd, n_embd),
        dropout_layer(dropout),
    )


class Block(nn.Module):
    """Attention then feed-forward, each optionally pre-normed and wrapped in a residual."""

    def __init__(self, config: ModelConfig, block_size: int) -> None:
        super().__init__()
        C = config.n_embd
        self.residual = config.residual
        self.attention = CausalSelfAttention(
            C,
            config.n_head,
            C // config.n_head,
            block_size,
            proj=config.proj is not False,
            dropout=config.dropout,
        )
        self.ffwd = feed_forward(config.ffwd, C, config.dropout)
        self.ln1 = nn.LayerNorm(C) if config.layernorm else None
        self.ln2 = nn.LayerNorm(C) if config.layernorm and self.ffwd is not None else None

    def _residual(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return x + out if self.residual else out

    def forward(self, x: torch.Tensor, T: int) -> torch.Tensor:
        """Rows (B * T, C) in and out."""
        x = self._residual(x, self.attention(self.ln1(x) if self.ln1 is not None else x, T))
        if self.ffwd is not None:
            x = self._residual(x, self.ffwd(self.ln2(x) if self.ln2 is not None else x))
        return x


class Transformer(Embedded):
    """Rungs 1-7 as configs: ``n_layer`` blocks (0: embeddings only) with switches for the
    feed-forward, residuals, layer norm, dropout and init."""

    def __init__(self, config: ModelConfig, vocab_size: int, block_size: int) -> None:
        super().__init__(config, vocab_size, block_size)
        self.blocks = nn.ModuleList(Block(config, block_size) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd) if config.layernorm else None
        if config.init == "normal":
            self.apply(_init_normal)

    def mix(self, x: torch.Tensor, T: int) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, T)
        return self.ln_f(x) if self.ln_f is not None else x

    def attention_weights(self, idx: torch.Tensor) -> torch.Tensor | None:
        if not self.blocks:
            return None
        T = idx.size(-1)
        x, maps = self.embed(idx).flatten(0, 1), []
        for block in self.blocks:
            assert isinstance(block, Block)
            norm = block.ln1 if block.ln1 is not None else nn.Identity()
            maps.append(block.attention.weights(norm(x), T)[0])
            x = block(x, T)
        return torch.stack(maps).detach()  # (n_layer, nh, T, T)


def _init_normal(module: nn.Module) -> None:
    """The lecture's rung 7 init: N(0, 0.02) weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)


MODELS: dict[str, type[LanguageModel]] = {
    "bigram": Bigram,
    "uniform_avg": UniformAverage,
    "softmax_avg": SoftmaxAverage,
    "single_head": SingleHead,
    "multi_head": MultiHead,
    "transformer": Transformer,
}


def build_model(config: ModelConfig, vocab_size: int, block_size: int) -> LanguageModel:
    if config.kind is None:
        raise ValueError("model.kind is not set")
    return MODELS[config.kind](config, vocab_size, block_size)


def count_params(config: ModelConfig, vocab_size: int, block_size: int) -> int:
    """Parameters of a model, without allocating its weights."""
    with torch.device("meta"):
        return build_model(config, vocab_size, block_size).num_params()
