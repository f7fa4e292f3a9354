"""A trained model as a ``torch.export`` program: token ids (B, T) in, logits (B, T, vocab) out.

What a run logs as its MLflow model. The program is traced from a model of the same shape built
with the SDPA backend (a C kernel cannot be traced), with a dynamic batch and a dynamic time
dimension: a prompt longer than the block size is cropped to its last ``block_size`` tokens,
as ``generate`` crops it.

Tracing costs a few hundred milliseconds, and the first trace of a process about a second more
(importing torch's compiler stack): more than a short run's training. What differs between two runs
of one model shape is only the weights, so the program's archive (``torch.export.save``'s pt2
file) is traced once per shape and kept, in the process and in the user's cache folder
(``<cache>/exports``, keyed by the torch version, the source of :mod:`workbench.models` as the
process loaded it, and the model's shape), and each run's archive is that one with the run's
weights in place of the traced model's. The archive's weights are raw tensor bytes listed in its
``model_weights_config.json``; a kept archive is used only when the weights it lists are the
model's, each once, with the model's shape, float32, contiguous and stored raw (else the model
is traced again), and nothing in it is unpickled. Reading and writing archive records takes
torch's private archive reader and writer (``workbench.compat``); without them the shape's
program is traced once per process and each run's archive is ``torch.export.save`` of it with
the run's weights copied in (about 0.2 s a run more).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim, ExportedProgram

from workbench import cache, compat
from workbench.models import LanguageModel, build_model
from workbench.models.attention import SDPA
from workbench.models.source import SOURCE_DIGEST

CACHED_SHAPES = 16  # archives kept per process (the ablation has 15 model shapes)
WEIGHTS_CONFIG = "data/weights/model_weights_config.json"
WRITER_RECORDS = (".data/",)  # written by torch's archive writer itself

_T = TypeVar("_T")
_templates: OrderedDict[str, _Template] = OrderedDict()
_programs: OrderedDict[str, ExportedProgram] = OrderedDict()  # the public route's


class NextTokenLogits(nn.Module):
    """``model.logits`` of the last ``block_size`` tokens of its input, as ``generate`` crops a
    prompt: (B, T) token ids in, any T ≥ 1, and the logits of the last min(T, block_size) tokens
    out. Inside, the ladder's code sees only its one static block length: the window is padded
    at the end (every model of the ladder is causal, so the first positions of a padded block
    are the logits of those tokens alone)."""

    def __init__(self, model: LanguageModel) -> None:
        super().__init__()
        self.model = model
        self.block_size = model.block_size

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) int64 token ids in; (B, min(T, block_size), vocab) logits out."""
        T, block = idx.size(1), self.block_size
        # index_select, not slices: a slice of a static length by a dynamic one makes
        # torch.export guard T against the block size, and crop nothing past it.
        start = torch.clamp(torch.tensor(T, device=idx.device) - block, min=0)
        window = F.pad(idx, (0, block)).index_select(
            1, start + torch.arange(block, device=idx.device)
        )  # (B, block): the last min(T, block) tokens, then padding
        logits = self.model.logits(window)  # (B, block, vocab)
        kept = torch.sym_min(T, block)  # type: ignore[no-untyped-call]
        return logits.index_select(1, torch.arange(kept, device=idx.device))


def example_input() -> torch.Tensor:
    """A (2, 2) batch to trace with: sizes 0 and 1 would be traced as constants."""
    return torch.zeros(2, 2, dtype=torch.int64)


def save_logits(model: LanguageModel, path: Path) -> None:
    """Write the logits program of ``model``, with its current weights, as a pt2 archive at
    ``path``: the file ``torch.export.save`` writes, from the shape's kept archive (torch's
    archive writer is private: without it, ``torch.export.save`` of the shape's program)."""
    archive = compat.archive_io()
    if archive is None:
        torch.export.save(_program(model), path)
        return
    template = _template(model)
    weights = {name: _raw(tensor) for name, tensor in model.state_dict().items()}
    writer = archive[1](str(path))
    writer.set_min_version(6)  # as torch.export.save
    for name, data in template.records:
        if name in template.weights:
            data = weights[template.weights[name]]
        writer.write_record(name, data, len(data))
    writer.write_end_of_file()


def _program(model: LanguageModel) -> ExportedProgram:
    """The public route: the shape's program, traced once per process, with ``model``'s
    weights copied into its state dict."""
    program = _recent(_programs, template_key(model), lambda: trace_logits(
        build_model(model.config, model.vocab_size, model.block_size, attention=SDPA)
    ))  # fmt: skip
    state = program.state_dict
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            state[f"model.{name}"].copy_(tensor)
    return program


@dataclass(frozen=True)
class _Template:
    """A pt2 archive's records, in order, and which of them hold which of the model's weights
    (record name → ``state_dict`` name)."""

    records: tuple[tuple[str, bytes], ...]
    weights: dict[str, str]


def _raw(tensor: torch.Tensor) -> bytes:
    """A float32 tensor's bytes as the archive stores a weight: contiguous, little-endian."""
    return tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()


def _template(model: LanguageModel) -> _Template:
    """The shape's archive: this process's, else the cache folder's, else traced (and kept)."""
    key = template_key(model)
    return _recent(_templates, key, lambda: _kept_or_traced(model, key))


def _kept_or_traced(model: LanguageModel, key: str) -> _Template:
    cached = _cache_file(key)
    if cached is not None and cache.verified(cached):  # else missing or changed: traced again
        with contextlib.suppress(Exception):  # unreadable, or not this model's: traced again
            return _read_template(cached, model)
    return _traced_template(model, cached)


def _recent(cache: OrderedDict[str, _T], key: str, make: Callable[[], _T]) -> _T:
    """``cache[key]``, made by ``make`` where it is missing; the ``CACHED_SHAPES`` most recently
    used are kept."""
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    value = cache[key] = make()
    if len(cache) > CACHED_SHAPES:
        cache.popitem(last=False)
    return value


def template_key(model: LanguageModel) -> str:
    """What the traced program depends on: the torch version, the model code this process
    loaded and the model's shape."""
    shape = (model.config.model_dump_json(), model.vocab_size, model.block_size)
    code = f"{torch.version.__version__}\0{SOURCE_DIGEST}"
    return hashlib.sha256(f"{code}\0{json.dumps(shape)}".encode()).hexdigest()


def _cache_file(key: str) -> Path | None:
    from workbench.settings import load_settings

    folder = load_settings().export_template_dir
    if folder is None:
        return None
    try:
        return cache.checked_folder(folder) / f"{key}.pt2"
    except (OSError, cache.CacheRefused):  # nowhere safe to keep it: traced in each process
        return None


def _traced_template(model: LanguageModel, keep: Path | None) -> _Template:
    """Trace the shape, save the program as an archive (kept at ``keep`` where it can be) and
    read it back. Its weights must be the traced model's, byte for byte: else the archive's
    layout is not the one :func:`save_logits` writes, and that is an error, not a guess."""
    fresh = build_model(model.config, model.vocab_size, model.block_size, attention=SDPA)
    with tempfile.TemporaryDirectory(prefix="workbench-export-") as scratch:
        saved = Path(scratch) / "model.pt2"
        torch.export.save(trace_logits(fresh), saved)
        template = _read_template(saved, fresh)
        records, state = dict(template.records), fresh.state_dict()
        for record, name in template.weights.items():
            if records[record] != _raw(state[name]):
                raise RuntimeError(f"torch.export.save stored {name} as workbench cannot write it")
        if keep is not None:
            _keep(saved, keep)
    return template


def _keep(archive: Path, keep: Path) -> None:
    """Copied whole or not at all (renamed into place); a cache that cannot be written is no
    error: the next process traces again."""
    partial = keep.with_name(f".{keep.name}.{uuid.uuid4().hex}.partial")
    try:
        keep.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(archive.read_bytes())
        os.replace(partial, keep)
        cache.record(keep)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)


def _read_template(path: Path, model: LanguageModel) -> _Template:
    """The archive at ``path`` as a template for ``model``: raises unless every weight it lists
    is one of the model's, stored raw as float32, contiguous, with the model's shape."""
    archive = compat.archive_io()
    assert archive is not None, "kept archives are read only where torch's reader is at hand"
    float32, strided = compat.archive_weight_schema()
    reader = archive[0](str(path))
    records = tuple(
        (name, bytes(reader.get_record(name)))
        for name in reader.get_all_records()
        if not name.startswith(WRITER_RECORDS)
    )
    stored = dict(records)
    config = json.loads(stored[WEIGHTS_CONFIG])["config"]
    state = model.state_dict()
    weights: dict[str, str] = {}
    for full_name, entry in config.items():
        name = full_name.removeprefix("model.")
        tensor = state[name]
        meta = entry["tensor_meta"]
        record = f"data/weights/{entry['path_name']}"
        sizes = [size["as_int"] for size in meta["sizes"]]
        strides = [stride["as_int"] for stride in meta["strides"]]
        if (
            entry["use_pickle"]
            or meta["dtype"] != float32
            or meta["layout"] != strided
            or sizes != list(tensor.shape)
            or strides != list(torch.empty(sizes).stride())
            or meta["storage_offset"]["as_int"] != 0
            or len(stored.get(record, b"")) != tensor.numel() * 4
            or record in weights
        ):
            raise ValueError(f"{path}: weight {full_name} is not stored as workbench writes it")
        weights[record] = name
    if set(weights.values()) != set(state):  # every weight of the model, and each once
        raise ValueError(f"{path}: its weights are not the model's")
    return _Template(records, weights)


def trace_logits(model: LanguageModel) -> ExportedProgram:
    """The logits program of ``model`` as it is, traced on the CPU; build it with SDPA
    attention (a C kernel cannot be traced)."""
    module = NextTokenLogits(model).eval()
    example = example_input()
    return torch.export.export(
        module, (example,), dynamic_shapes=({0: Dim("batch", min=1), 1: Dim("time", min=1)},)
    )
