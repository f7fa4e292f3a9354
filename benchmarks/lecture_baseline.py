"""Baseline trainer in the style of the "Let's build GPT" lecture scripts.

A re-implementation (written from the lecture, not copied) of ``bigram.py`` and the intermediate
commits of ``gpt.py`` from the lecture, parametrised by rung (see ``docs/lecture.md``). It is
deliberately *not* optimised: per-head ``Head`` modules looped in Python inside
``MultiHeadAttention``, batches built with a list comprehension and ``torch.stack``, eval by
``eval_iters`` random batches per split, plain AdamW. It is the speed baseline that the faster
trainer is benchmarked against, so the lecture's style is the point.

Usage (smoke test)::

    python benchmarks/lecture_baseline.py --rung 3 --max-iters 200 \\
        --data "$WORKBENCH_DATA_DIR/tinyshakespeare.txt"

Torch threads are only set under ``__main__`` (``--threads``, default 1), never at import.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn as nn
from torch.nn import functional as F

# hyperparameters of each rung, as in the lecture's commits
RUNGS: dict[int, dict] = {
    # bigram.py
    0: {
        "batch_size": 32,
        "block_size": 8,
        "max_iters": 3000,
        "eval_interval": 300,
        "learning_rate": 1e-2,
        "eval_iters": 200,
        "n_embd": 0,
        "n_head": 0,
        "n_layer": 0,
        "dropout": 0.0,
    },
    # token + position embeddings -> lm_head
    1: {
        "batch_size": 32,
        "block_size": 8,
        "max_iters": 3000,
        "eval_interval": 300,
        "learning_rate": 1e-2,
        "eval_iters": 200,
        "n_embd": 32,
        "n_head": 0,
        "n_layer": 0,
        "dropout": 0.0,
    },
    # single self-attention head
    2: {
        "batch_size": 32,
        "block_size": 8,
        "max_iters": 5000,
        "eval_interval": 500,
        "learning_rate": 1e-3,
        "eval_iters": 200,
        "n_embd": 32,
        "n_head": 1,
        "n_layer": 0,
        "dropout": 0.0,
    },
    # multi-head attention, 4 heads of size 8
    3: {
        "batch_size": 32,
        "block_size": 8,
        "max_iters": 5000,
        "eval_interval": 500,
        "learning_rate": 1e-3,
        "eval_iters": 200,
        "n_embd": 32,
        "n_head": 4,
        "n_layer": 0,
        "dropout": 0.0,
    },
    # + feed-forward
    4: {
        "batch_size": 32,
        "block_size": 8,
        "max_iters": 5000,
        "eval_interval": 500,
        "learning_rate": 1e-3,
        "eval_iters": 200,
        "n_embd": 32,
        "n_head": 4,
        "n_layer": 0,
        "dropout": 0.0,
    },
    # + residual blocks (projection, 4x ffwd)
    5: {
        "batch_size": 32,
        "block_size": 8,
        "max_iters": 5000,
        "eval_interval": 500,
        "learning_rate": 1e-3,
        "eval_iters": 200,
        "n_embd": 32,
        "n_head": 4,
        "n_layer": 3,
        "dropout": 0.0,
    },
    # + layer norm (pre-norm, final ln_f)
    6: {
        "batch_size": 32,
        "block_size": 8,
        "max_iters": 5000,
        "eval_interval": 500,
        "learning_rate": 1e-3,
        "eval_iters": 200,
        "n_embd": 32,
        "n_head": 4,
        "n_layer": 3,
        "dropout": 0.0,
    },
    # scaled up: dropout, N(0, 0.02) init
    7: {
        "batch_size": 64,
        "block_size": 256,
        "max_iters": 5000,
        "eval_interval": 500,
        "learning_rate": 3e-4,
        "eval_iters": 200,
        "n_embd": 384,
        "n_head": 6,
        "n_layer": 6,
        "dropout": 0.2,
    },
}


class Head(nn.Module):
    """one head of self-attention"""

    def __init__(self, head_size, n_embd, block_size, dropout):
        super().__init__()
        self.key = nn.Linear(n_embd, head_size, bias=False)
        self.query = nn.Linear(n_embd, head_size, bias=False)
        self.value = nn.Linear(n_embd, head_size, bias=False)
        self.register_buffer("tril", torch.tril(torch.ones(block_size, block_size)))

        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        B, T, C = x.shape  # noqa: RUF059 (lecture style)
        k = self.key(x)  # (B,T,hs)
        q = self.query(x)  # (B,T,hs)
        # compute attention scores ("affinities")
        wei = q @ k.transpose(-2, -1) * k.shape[-1] ** -0.5  # (B,T,hs) @ (B,hs,T) -> (B,T,T)
        wei = wei.masked_fill(self.tril[:T, :T] == 0, float("-inf"))  # (B, T, T)
        wei = F.softmax(wei, dim=-1)  # (B, T, T)
        wei = self.dropout(wei)
        # perform the weighted aggregation of the values
        v = self.value(x)  # (B,T,hs)
        out = wei @ v  # (B, T, T) @ (B, T, hs) -> (B, T, hs)
        return out


class MultiHeadAttention(nn.Module):
    """multiple heads of self-attention in parallel"""

    def __init__(self, num_heads, head_size, n_embd, block_size, dropout, proj=True):
        super().__init__()
        self.heads = nn.ModuleList(
            [Head(head_size, n_embd, block_size, dropout) for _ in range(num_heads)]
        )
        # the output projection (and its dropout) arrives with the residual blocks (rung 5)
        self.use_proj = proj
        if proj:
            self.proj = nn.Linear(head_size * num_heads, n_embd)
            self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        out = torch.cat([h(x) for h in self.heads], dim=-1)
        if self.use_proj:
            out = self.dropout(self.proj(out))
        return out


class FeedFoward(nn.Module):
    """a simple linear layer followed by a non-linearity"""

    def __init__(self, n_embd, dropout, wide=True):
        super().__init__()
        if wide:  # rung 5+: 4x inner width, projection back, dropout
            self.net = nn.Sequential(
                nn.Linear(n_embd, 4 * n_embd),
                nn.ReLU(),
                nn.Linear(4 * n_embd, n_embd),
                nn.Dropout(dropout),
            )
        else:  # rung 4
            self.net = nn.Sequential(
                nn.Linear(n_embd, n_embd),
                nn.ReLU(),
            )

    def forward(self, x):
        return self.net(x)


class Block(nn.Module):
    """Transformer block: communication followed by computation"""

    def __init__(self, n_embd, n_head, block_size, dropout, layer_norm=True):
        # n_embd: embedding dimension, n_head: the number of heads we'd like
        super().__init__()
        head_size = n_embd // n_head
        self.sa = MultiHeadAttention(n_head, head_size, n_embd, block_size, dropout)
        self.ffwd = FeedFoward(n_embd, dropout)
        self.layer_norm = layer_norm
        if layer_norm:
            self.ln1 = nn.LayerNorm(n_embd)
            self.ln2 = nn.LayerNorm(n_embd)

    def forward(self, x):
        if self.layer_norm:  # rung 6+: pre-norm
            x = x + self.sa(self.ln1(x))
            x = x + self.ffwd(self.ln2(x))
        else:  # rung 5
            x = x + self.sa(x)
            x = x + self.ffwd(x)
        return x


class BigramLanguageModel(nn.Module):
    def __init__(self, rung, vocab_size, n_embd, n_head, n_layer, block_size, dropout):
        super().__init__()
        self.rung = rung
        self.block_size = block_size
        if rung == 0:
            # each token directly reads off the logits for the next token from a lookup table
            self.token_embedding_table = nn.Embedding(vocab_size, vocab_size)
            return
        self.token_embedding_table = nn.Embedding(vocab_size, n_embd)
        self.position_embedding_table = nn.Embedding(block_size, n_embd)
        if rung == 2:
            self.sa_head = Head(n_embd, n_embd, block_size, dropout)
        elif rung in (3, 4):
            self.sa_heads = MultiHeadAttention(
                n_head, n_embd // n_head, n_embd, block_size, dropout, proj=False
            )
            if rung == 4:
                self.ffwd = FeedFoward(n_embd, dropout, wide=False)
        elif rung >= 5:
            self.blocks = nn.Sequential(
                *[
                    Block(n_embd, n_head, block_size, dropout, layer_norm=rung >= 6)
                    for _ in range(n_layer)
                ]
            )
            if rung >= 6:
                self.ln_f = nn.LayerNorm(n_embd)  # final layer norm
        self.lm_head = nn.Linear(n_embd, vocab_size)

        if rung >= 7:
            # better init, not covered in the original GPT video, but important
            self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        B, T = idx.shape

        if self.rung == 0:
            logits = self.token_embedding_table(idx)  # (B,T,C)
        else:
            # idx and targets are both (B,T) tensor of integers
            tok_emb = self.token_embedding_table(idx)  # (B,T,C)
            pos_emb = self.position_embedding_table(torch.arange(T, device=idx.device))  # (T,C)
            x = tok_emb + pos_emb  # (B,T,C)
            if self.rung == 2:
                x = self.sa_head(x)  # apply one head of self-attention. (B,T,C)
            elif self.rung in (3, 4):
                x = self.sa_heads(x)  # apply multi-head self-attention. (B,T,C)
                if self.rung == 4:
                    x = self.ffwd(x)  # (B,T,C)
            elif self.rung >= 5:
                x = self.blocks(x)  # (B,T,C)
                if self.rung >= 6:
                    x = self.ln_f(x)  # (B,T,C)
            logits = self.lm_head(x)  # (B,T,vocab_size)

        if targets is None:
            loss = None
        else:
            B, T, C = logits.shape
            logits = logits.view(B * T, C)
            targets = targets.view(B * T)
            loss = F.cross_entropy(logits, targets)

        return logits, loss

    def generate(self, idx, max_new_tokens):
        # idx is (B, T) array of indices in the current context
        for _ in range(max_new_tokens):
            # crop idx to the last block_size tokens
            idx_cond = idx if self.rung == 0 else idx[:, -self.block_size :]
            # get the predictions
            logits, loss = self(idx_cond)  # noqa: RUF059 (lecture style)
            # focus only on the last time step
            logits = logits[:, -1, :]  # becomes (B, C)
            # apply softmax to get probabilities
            probs = F.softmax(logits, dim=-1)  # (B, C)
            # sample from the distribution
            idx_next = torch.multinomial(probs, num_samples=1)  # (B, 1)
            # append sampled index to the running sequence
            idx = torch.cat((idx, idx_next), dim=1)  # (B, T+1)
        return idx


def train_lecture_rung(
    rung: int,
    text: str,
    *,
    max_iters: int | None = None,
    eval_interval: int | None = None,
    eval_iters: int | None = None,
    seed: int = 1337,
    device: str = "cpu",
    verbose: bool = False,
) -> dict:
    """Train one rung of the lecture ladder the way the lecture's scripts do.

    Returns {"rung", "wall_time_s" (train+evals, excluding text encoding), "tokens_per_sec"
    (training tokens = iters*batch*block / wall), "final_val_loss", "final_train_loss",
    "params", "losses": [(step, train, val), ...]}
    """
    if rung not in RUNGS:
        raise ValueError(f"unknown rung {rung}; expected one of {sorted(RUNGS)}")
    hp = RUNGS[rung]
    # hyperparameters
    batch_size = hp["batch_size"]  # how many independent sequences will we process in parallel?
    block_size = hp["block_size"]  # what is the maximum context length for predictions?
    max_iters = hp["max_iters"] if max_iters is None else max_iters
    eval_interval = hp["eval_interval"] if eval_interval is None else eval_interval
    learning_rate = hp["learning_rate"]
    eval_iters = hp["eval_iters"] if eval_iters is None else eval_iters
    n_embd = hp["n_embd"]
    n_head = hp["n_head"]
    n_layer = hp["n_layer"]
    dropout = hp["dropout"]
    # ------------

    torch.manual_seed(seed)

    # here are all the unique characters that occur in this text
    chars = sorted(list(set(text)))
    vocab_size = len(chars)
    # create a mapping from characters to integers
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}
    # encoder: take a string, output a list of integers
    encode = lambda s: [stoi[c] for c in s]  # noqa: E731
    # decoder: take a list of integers, output a string (unused here: no sampling is timed)
    decode = lambda l: "".join([itos[i] for i in l])  # noqa: E731, E741, F841

    # Train and test splits
    data = torch.tensor(encode(text), dtype=torch.long)
    n = int(0.9 * len(data))  # first 90% will be train, rest val
    train_data = data[:n]
    val_data = data[n:]

    # data loading
    def get_batch(split):
        # generate a small batch of data of inputs x and targets y
        data = train_data if split == "train" else val_data
        ix = torch.randint(len(data) - block_size, (batch_size,))
        x = torch.stack([data[i : i + block_size] for i in ix])
        y = torch.stack([data[i + 1 : i + block_size + 1] for i in ix])
        x, y = x.to(device), y.to(device)
        return x, y

    @torch.no_grad()
    def estimate_loss():
        out = {}
        model.eval()
        for split in ["train", "val"]:
            losses = torch.zeros(eval_iters)
            for k in range(eval_iters):
                X, Y = get_batch(split)
                logits, loss = model(X, Y)  # noqa: RUF059 (lecture style)
                losses[k] = loss.item()
            out[split] = losses.mean()
        model.train()
        return out

    model = BigramLanguageModel(rung, vocab_size, n_embd, n_head, n_layer, block_size, dropout)
    m = model.to(device)
    params = sum(p.numel() for p in m.parameters())
    if verbose:
        print(params / 1e6, "M parameters", file=sys.stderr)

    # create a PyTorch optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)

    history = []
    t0 = time.perf_counter()
    for iter in range(max_iters):
        # every once in a while evaluate the loss on train and val sets
        if iter % eval_interval == 0 or iter == max_iters - 1:
            losses = estimate_loss()
            history.append((iter, float(losses["train"]), float(losses["val"])))
            if verbose:
                print(
                    f"step {iter}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}",
                    file=sys.stderr,
                )

        # sample a batch of data
        xb, yb = get_batch("train")

        # evaluate the loss
        logits, loss = model(xb, yb)  # noqa: RUF059 (lecture style)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    wall = time.perf_counter() - t0

    return {
        "rung": rung,
        "wall_time_s": wall,
        "tokens_per_sec": max_iters * batch_size * block_size / wall if wall > 0 else 0.0,
        "final_val_loss": history[-1][2] if history else float("nan"),
        "final_train_loss": history[-1][1] if history else float("nan"),
        "params": params,
        "losses": history,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rung", type=int, required=True, choices=sorted(RUNGS))
    parser.add_argument("--data", required=True, help="path to tinyshakespeare.txt")
    parser.add_argument("--max-iters", type=int, default=None)
    parser.add_argument("--eval-interval", type=int, default=None)
    parser.add_argument("--eval-iters", type=int, default=None)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--verbose", action="store_true", help="print eval steps to stderr")
    args = parser.parse_args(argv)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    with open(args.data, encoding="utf-8") as f:
        text = f.read()
    result = train_lecture_rung(
        args.rung,
        text,
        max_iters=args.max_iters,
        eval_interval=args.eval_interval,
        eval_iters=args.eval_iters,
        seed=args.seed,
        device=args.device,
        verbose=args.verbose,
    )
    result.pop("losses")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
