"""Text to tensors: the character tokenizer, the train/val split, the batch sampler and the fixed
evaluation set."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


class CharTokenizer:
    """A sorted character vocabulary; saved as JSON so a run's text can be decoded later."""

    def __init__(self, chars: str) -> None:
        self.chars = "".join(sorted(set(chars)))
        self._index = {ch: i for i, ch in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._index[ch] for ch in text]
        except KeyError as exc:
            raise ValueError(f"character {exc.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return "".join(self.chars[i] for i in ids)

    def to_json(self) -> str:
        return json.dumps({"type": "char", "chars": self.chars}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> CharTokenizer:
        payload = json.loads(text)
        if payload.get("type") != "char":
            raise ValueError(f"not a character tokenizer: {payload.get('type')!r}")
        return cls(payload["chars"])

    def save(self, path: Path) -> None:
        path.write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> CharTokenizer:
        return cls.from_json(path.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Corpus:
    """A text, encoded and split: the first ``1 - val_fraction`` trains, the rest validates."""

    tokenizer: CharTokenizer
    train: torch.Tensor  # (N_train,) int64
    val: torch.Tensor  # (N_val,) int64

    @classmethod
    def from_text(cls, text: str, val_fraction: float = 0.1) -> Corpus:
        tokenizer = CharTokenizer.from_text(text)
        # The vocabulary is sorted, so a lookup table turns code points into ids in one pass.
        codes = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32)
        table = torch.full((max(map(ord, tokenizer.chars)) + 1,), -1, dtype=torch.int64)
        table[torch.tensor([ord(ch) for ch in tokenizer.chars])] = torch.arange(
            tokenizer.vocab_size
        )
        data = table[codes.long()]
        n_train = int(len(data) * (1 - val_fraction))
        return cls(tokenizer, data[:n_train], data[n_train:])

    @classmethod
    def from_file(cls, path: Path, val_fraction: float = 0.1) -> Corpus:
        return cls.from_text(path.read_text(encoding="utf-8"), val_fraction)

    def split(self, name: str) -> torch.Tensor:
        return {"train": self.train, "val": self.val}[name]


def _window_view(data: torch.Tensor, block_size: int) -> torch.Tensor:
    """Every window of ``block_size + 1`` characters, as a view (no copy)."""
    return data.unfold(0, block_size + 1, 1)


def _windows(windows: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (shifted by one character) for windows at ``starts``: one gather."""
    window = torch.index_select(windows, 0, starts)  # (B, T + 1)
    return window[:, :-1], window[:, 1:]


class BatchSampler:
    """Random training windows, a whole batch per indexing operation, from the run's own seed.

    Two samplers with the same seed yield the same batches; nothing global is touched.
    """

    def __init__(self, data: torch.Tensor, block_size: int, batch_size: int, seed: int) -> None:
        if len(data) <= block_size:
            raise ValueError(
                f"the split has {len(data)} characters, too few for block_size {block_size}"
            )
        self.data = data
        self.block_size = block_size
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.windows = _window_view(data, block_size)

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(
            len(self.data) - self.block_size, (self.batch_size,), generator=self.generator
        )
        return _windows(self.windows, starts)

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


EVAL_SEED_OFFSETS = {"train": 1_000_003, "val": 2_000_003}


def eval_set(
    data: torch.Tensor, block_size: int, batch_size: int, eval_iters: int, seed: int, split: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed evaluation windows of a split: ``eval_iters × batch_size`` windows chosen once
    from the seed, so losses compare across steps and across runs with the same seed."""
    if len(data) <= block_size:
        raise ValueError(
            f"the {split} split has {len(data)} characters, too few for block_size {block_size}"
        )
    generator = torch.Generator().manual_seed(seed + EVAL_SEED_OFFSETS[split])
    starts = torch.randint(len(data) - block_size, (eval_iters * batch_size,), generator=generator)
    return _windows(_window_view(data, block_size), starts)
