"""Reference implementations of the seed notes' computations, written the lecture's way (slow,
one module per head, no fusion), for the model tests to compare workbench's models against.

Not part of the package: tests import it as ``from reference import ...`` (pytest's default
'prepend' import mode puts this folder on ``sys.path``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def bag_of_words_v1(x: torch.Tensor) -> torch.Tensor:
    """Version 1: ``xbow[b, t] = mean(x[b, :t+1])`` with a double Python loop."""
    B, T, C = x.shape
    xbow = torch.zeros((B, T, C), dtype=x.dtype)
    for b in range(B):
        for t in range(T):
            xprev = x[b, : t + 1]  # (t+1, C)
            xbow[b, t] = torch.mean(xprev, 0)
    return xbow


def bag_of_words_v2(x: torch.Tensor) -> torch.Tensor:
    """Version 2: a lower-triangular matrix of row-normalised ones, multiplied in."""
    T = x.size(1)
    wei = torch.tril(torch.ones(T, T, dtype=x.dtype))
    wei = wei / wei.sum(1, keepdim=True)
    return wei @ x  # (T, T) @ (B, T, C) -> (B, T, C)


def bag_of_words_v3(x: torch.Tensor) -> torch.Tensor:
    """Version 3: zero affinities, the future masked to -inf, softmax."""
    T = x.size(1)
    tril = torch.tril(torch.ones(T, T))
    wei = torch.zeros((T, T), dtype=x.dtype)
    wei = wei.masked_fill(tril == 0, float("-inf"))
    wei = F.softmax(wei, dim=-1)
    return wei @ x


class Head(nn.Module):
    """Version 4: one head of self-attention, as in the lecture."""

    def __init__(self, n_embd: int, head_size: int, block_size: int) -> None:
        super().__init__()
        self.head_size = head_size
        self.key = nn.Linear(n_embd, head_size, bias=False)
        self.query = nn.Linear(n_embd, head_size, bias=False)
        self.value = nn.Linear(n_embd, head_size, bias=False)
        self.register_buffer("tril", torch.tril(torch.ones(block_size, block_size)))

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """The attention probabilities ``wei`` (B, T, T)."""
        T = x.size(1)
        k = self.key(x)  # (B, T, hs)
        q = self.query(x)  # (B, T, hs)
        wei = q @ k.transpose(-2, -1) * self.head_size**-0.5  # (B, T, T)
        tril: torch.Tensor = self.tril
        wei = wei.masked_fill(tril[:T, :T] == 0, float("-inf"))
        return F.softmax(wei, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wei = self.weights(x)
        v = self.value(x)  # (B, T, hs)
        return wei @ v  # (B, T, hs)


class MultiHeadAttention(nn.Module):
    """Several heads in parallel, their outputs concatenated along the channels (then, from
    rung 5 on, projected back to ``n_embd``)."""

    def __init__(
        self, n_embd: int, num_heads: int, head_size: int, block_size: int, proj: bool = False
    ) -> None:
        super().__init__()
        self.heads = nn.ModuleList(Head(n_embd, head_size, block_size) for _ in range(num_heads))
        self.proj = nn.Linear(num_heads * head_size, n_embd) if proj else None

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, num_heads, T, T) attention probabilities."""
        return torch.stack([h.weights(x) for h in self.heads], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat([h(x) for h in self.heads], dim=-1)
        if self.proj is not None:
            out = self.proj(out)
        return out


class FeedForward(nn.Module):
    """Per position: rung 4's ``Linear + ReLU``, or from rung 5 the 4x MLP projected back."""

    def __init__(self, n_embd: int, wide: bool, dropout: float = 0.0) -> None:
        super().__init__()
        if wide:
            self.net = nn.Sequential(
                nn.Linear(n_embd, 4 * n_embd),
                nn.ReLU(),
                nn.Linear(4 * n_embd, n_embd),
                nn.Dropout(dropout),
            )
        else:
            self.net = nn.Sequential(nn.Linear(n_embd, n_embd), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Block(nn.Module):
    """Communication then computation. Rung 4: ``x = sa(x); x = ffwd(x)``; rung 5:
    ``x = x + sa(x); x = x + ffwd(x)``; rung 6: ``x = x + sa(ln1(x)); x = x + ffwd(ln2(x))``."""

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        block_size: int,
        *,
        wide: bool,
        residual: bool,
        layernorm: bool,
        proj: bool,
    ) -> None:
        super().__init__()
        head_size = n_embd // n_head
        self.sa = MultiHeadAttention(n_embd, n_head, head_size, block_size, proj=proj)
        self.ffwd = FeedForward(n_embd, wide)
        self.ln1: nn.Module = nn.LayerNorm(n_embd) if layernorm else nn.Identity()
        self.ln2: nn.Module = nn.LayerNorm(n_embd) if layernorm else nn.Identity()
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.residual:
            x = x + self.sa(self.ln1(x))
            x = x + self.ffwd(self.ln2(x))
        else:
            x = self.sa(self.ln1(x))
            x = self.ffwd(self.ln2(x))
        return x


class GPTLanguageModel(nn.Module):
    """Token + position embeddings, ``n_layer`` blocks, (final LayerNorm), ``lm_head``."""

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        n_embd: int,
        n_head: int,
        n_layer: int,
        *,
        wide: bool = True,
        residual: bool = True,
        layernorm: bool = True,
        proj: bool = True,
    ) -> None:
        super().__init__()
        self.token_embedding_table = nn.Embedding(vocab_size, n_embd)
        self.position_embedding_table = nn.Embedding(block_size, n_embd)
        self.blocks = nn.Sequential(
            *[
                Block(
                    n_embd,
                    n_head,
                    block_size,
                    wide=wide,
                    residual=residual,
                    layernorm=layernorm,
                    proj=proj,
                )
                for _ in range(n_layer)
            ]
        )
        self.ln_f: nn.Module = nn.LayerNorm(n_embd) if layernorm else nn.Identity()
        self.lm_head = nn.Linear(n_embd, vocab_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)
        tok_emb = self.token_embedding_table(idx)  # (B, T, C)
        pos_emb = self.position_embedding_table(torch.arange(T))  # (T, C)
        x = tok_emb + pos_emb
        x = self.blocks(x)
        x = self.ln_f(x)
        return self.lm_head(x)  # (B, T, vocab)
