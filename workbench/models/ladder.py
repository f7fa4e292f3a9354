"""The ladder of "Let's build GPT", top to bottom: bigram → averaging the past uniformly →
softmax over masked affinities → one head of self-attention → many heads → transformer blocks.

Each model is built from its :class:`~workbench.spec.ModelConfig`, the vocabulary size and the
block size, and has nanoGPT's ``forward(idx, targets=None) -> (logits, loss)`` and ``generate``.
Activations between modules are ``(B, T, C)``. Attention is one fused QKV projection and one call
of the attention backend the model is handed (:mod:`workbench.models.attention`, chosen once when
a job starts); what runs inside that call is not this file's business.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from workbench.models.attention import SDPA, AttentionBackend, causal_bias
from workbench.spec import ModelConfig


@dataclass(frozen=True)
class Setup:
    """What a model is built for besides its config: the vocabulary, the longest context, and
    the attention backend its attention calls (None for the kinds without attention)."""

    vocab_size: int
    block_size: int
    attention: AttentionBackend | None = None


class LanguageModel(nn.Module):
    """Shared plumbing: the loss, generation, and (for attention models) attention maps."""

    def __init__(self, config: ModelConfig, setup: Setup) -> None:
        super().__init__()
        self.config = config
        self.vocab_size, self.block_size = setup.vocab_size, setup.block_size
        self.attention_backend = setup.attention  # None: this kind has no attention

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T, vocab): the next-token logits of every position of ``idx`` (B, T)."""
        raise NotImplementedError

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.logits(idx)  # (B, T, vocab)
        loss = None
        if targets is not None:
            rows = logits.view(-1, logits.size(-1))  # (B * T, vocab)
            loss = F.cross_entropy(rows.float(), targets.reshape(-1))
        return logits, loss

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
            logits = self.logits(context)[:, -1, :].float() / max(temperature, 1e-8)  # (B, vocab)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)
            next_id = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, next_id), dim=1)
        return idx

    def attention_weights(self, idx: torch.Tensor) -> torch.Tensor | None:
        """(n_layer, n_head, T, T) attention probabilities for one sequence, or None."""
        return None

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class Bigram(LanguageModel):
    """Rung 0: a vocab × vocab table, read straight off as the next character's logits."""

    def __init__(self, config: ModelConfig, setup: Setup) -> None:
        super().__init__(config, setup)
        self.token_embedding = nn.Embedding(setup.vocab_size, setup.vocab_size)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(idx)  # (B, T, vocab)


class Embedded(LanguageModel):
    """Token plus position embeddings in, ``lm_head`` out; subclasses mix positions between."""

    def __init__(self, config: ModelConfig, setup: Setup) -> None:
        super().__init__(config, setup)
        self.token_embedding = nn.Embedding(setup.vocab_size, config.n_embd)
        self.position_embedding = nn.Embedding(setup.block_size, config.n_embd)
        self.lm_head = nn.Linear(self.head_width(), setup.vocab_size)

    def head_width(self) -> int:
        return self.config.n_embd

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        # Positions 0..T-1 are the table's first T rows: the same as an embedding lookup of
        # arange(T), with fewer ops per step (tiny models are dispatch-bound).
        table, T = self.position_embedding.weight, idx.size(1)
        positions = table if len(table) == T else table[:T]  # (T, C)
        return self.token_embedding(idx) + positions  # (B, T, C)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) in, (B, T, head_width) out; position t sees only positions up to t."""
        return x

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.mix(self.embed(idx)))  # (B, T, vocab)


def causal_mask(block_size: int) -> torch.Tensor:
    return torch.tril(torch.ones(block_size, block_size, dtype=torch.bool))


class UniformAverage(Embedded):
    """Each position takes the mean of positions ≤ t (the seeds' version 2: tril / rowsum)."""

    weights: torch.Tensor  # (block_size, block_size) buffer

    def __init__(self, config: ModelConfig, setup: Setup) -> None:
        super().__init__(config, setup)
        tril = torch.tril(torch.ones(setup.block_size, setup.block_size))
        self.register_buffer("weights", tril / tril.sum(1, keepdim=True), persistent=False)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        T = x.size(1)
        return self.weights[:T, :T] @ x  # (T, T) @ (B, T, C) -> (B, T, C)

    def attention_weights(self, idx: torch.Tensor) -> torch.Tensor | None:
        T = idx.size(-1)
        return self.weights[:T, :T][None, None].clone()


class SoftmaxAverage(Embedded):
    """The seeds' version 3: affinities, masked to the past, softmaxed. The affinities are a
    parameter that starts at zero (uniform averaging); position-dependent, not data-dependent."""

    mask: torch.Tensor  # (block_size, block_size) bool buffer

    def __init__(self, config: ModelConfig, setup: Setup) -> None:
        super().__init__(config, setup)
        affinity = torch.zeros(setup.block_size, setup.block_size)
        self.affinity = nn.Parameter(affinity, requires_grad=config.learnable)
        self.register_buffer("mask", causal_mask(setup.block_size), persistent=False)

    def mixing_weights(self, T: int) -> torch.Tensor:
        wei = self.affinity[:T, :T].masked_fill(~self.mask[:T, :T], float("-inf"))
        return F.softmax(wei, dim=-1)  # (T, T)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        return self.mixing_weights(x.size(1)) @ x  # (T, T) @ (B, T, C) -> (B, T, C)

    def attention_weights(self, idx: torch.Tensor) -> torch.Tensor | None:
        return self.mixing_weights(idx.size(-1))[None, None].detach()


def dropout_layer(p: float) -> nn.Module:
    """``nn.Dropout(p)``, or nothing to call when ``p`` is 0 (tiny models pay for every call)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


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
        attention: AttentionBackend = SDPA,
    ) -> None:
        super().__init__()
        self.n_head, self.head_size, self.dropout = n_head, head_size, dropout
        self.attend = attention
        self.qkv = nn.Linear(n_embd, 3 * n_head * head_size, bias=False)
        self.proj = nn.Linear(n_head * head_size, n_embd) if proj else None
        self.resid_dropout = dropout_layer(dropout)
        self.register_buffer("causal_bias", causal_bias(block_size), persistent=False)

    @classmethod
    def of(
        cls, config: ModelConfig, setup: Setup, n_head: int, head_size: int, proj: bool
    ) -> CausalSelfAttention:
        """The attention of a model of ``config`` built for ``setup``."""
        backend = setup.attention or SDPA
        return cls(
            config.n_embd, n_head, head_size, setup.block_size, proj, config.dropout, backend
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) in, (B, T, n_head * head_size) out, or (B, T, n_embd) with ``proj``."""
        dropout = self.dropout if self.training else 0.0
        y = self.attend(self.qkv(x), self.n_head, self.causal_bias, dropout)  # (B, T, nh * hs)
        if self.proj is not None:
            y = self.resid_dropout(self.proj(y))
        return y

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, nh, T, T) attention probabilities of ``x`` (B, T, C), computed explicitly (for
        inspection only)."""
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, self.head_size)
        q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, T, hs)
        wei = (q @ k.transpose(-2, -1)) * self.head_size**-0.5  # (B, nh, T, T)
        return F.softmax(wei + self.causal_bias[:T, :T], dim=-1)


class SingleHead(Embedded):
    """Rung 2: one causal self-attention head of ``head_size`` (default ``n_embd``)."""

    def __init__(self, config: ModelConfig, setup: Setup) -> None:
        super().__init__(config, setup)
        self.attention = CausalSelfAttention.of(config, setup, 1, self.head_width(), proj=False)

    def head_width(self) -> int:
        return self.config.head_size or self.config.n_embd

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x)  # (B, T, hs)

    def attention_weights(self, idx: torch.Tensor) -> torch.Tensor | None:
        return self.attention.weights(self.embed(idx))[0][None].detach()  # (1, 1, T, T)


class MultiHead(Embedded):
    """Rung 3: ``n_head`` heads of ``n_embd / n_head``, concatenated (projected if ``proj``)."""

    def __init__(self, config: ModelConfig, setup: Setup) -> None:
        super().__init__(config, setup)
        heads, size = config.n_head, config.n_embd // config.n_head
        self.attention = CausalSelfAttention.of(config, setup, heads, size, bool(config.proj))

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x)  # (B, T, C)

    def attention_weights(self, idx: torch.Tensor) -> torch.Tensor | None:
        return self.attention.weights(self.embed(idx))[0][None].detach()  # (1, nh, T, T)


def feed_forward(kind: str, n_embd: int, dropout: float) -> nn.Module | None:
    """``linear``: the lecture's Linear + ReLU (rung 4); ``mlp``: 4× wide with projection."""
    if kind == "none":
        return None
    if kind == "linear":
        return nn.Sequential(nn.Linear(n_embd, n_embd), nn.ReLU())
    return nn.Sequential(
        nn.Linear(n_embd, 4 * n_embd),
        nn.ReLU(),  # not in place: a Linear's (B, T, C) output is a view, and autograd copies
        # a view changed in place (CopySlices)
        nn.Linear(4 * n_embd, n_embd),
        dropout_layer(dropout),
    )


class Block(nn.Module):
    """Attention then feed-forward, each optionally pre-normed and wrapped in a residual."""

    def __init__(self, config: ModelConfig, setup: Setup) -> None:
        super().__init__()
        C, heads = config.n_embd, config.n_head
        self.residual = config.residual
        proj = config.proj is not False
        self.attention = CausalSelfAttention.of(config, setup, heads, C // heads, proj)
        self.ffwd = feed_forward(config.ffwd, C, config.dropout)
        self.ln1 = nn.LayerNorm(C) if config.layernorm else None
        self.ln2 = nn.LayerNorm(C) if config.layernorm and self.ffwd is not None else None

    def _residual(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return x + out if self.residual else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) in and out."""
        x = self._residual(x, self.attention(self.ln1(x) if self.ln1 is not None else x))
        if self.ffwd is not None:
            x = self._residual(x, self.ffwd(self.ln2(x) if self.ln2 is not None else x))
        return x


class Transformer(Embedded):
    """Rungs 1-7 as configs: ``n_layer`` blocks (0: embeddings only) with switches for the
    feed-forward, residuals, layer norm, dropout and init."""

    def __init__(self, config: ModelConfig, setup: Setup) -> None:
        super().__init__(config, setup)
        self.blocks = nn.ModuleList(Block(config, setup) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd) if config.layernorm else None
        if config.init == "normal":
            self.apply(_init_normal)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)  # (B, T, C)
        return self.ln_f(x) if self.ln_f is not None else x

    def attention_weights(self, idx: torch.Tensor) -> torch.Tensor | None:
        if not self.blocks:
            return None
        x, maps = self.embed(idx), []  # (1, T, C)
        for block in self.blocks:
            assert isinstance(block, Block)
            norm = block.ln1 if block.ln1 is not None else nn.Identity()
            maps.append(block.attention.weights(norm(x))[0])  # (nh, T, T)
            x = block(x)
        return torch.stack(maps).detach()  # (n_layer, nh, T, T)


def _init_normal(module: nn.Module) -> None:
    """The lecture's rung 7 init: N(0, 0.02) weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
