"""The data pipeline: tokenizer, corpus split, batch sampler, fixed eval set, and the
download/cache/checksum logic of known data sets (exercised against a real local HTTP server)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import shutil
import socket
import threading
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from workbench.corpus import BatchSampler, CharTokenizer, Corpus, eval_set
from workbench.datasets import (
    KNOWN_DATASETS,
    data_checksum,
    fetch_known,
    sha256_file,
    vocab_size,
)
from workbench.errors import DataError
from workbench.settings import load_settings

REAL_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
REAL_CHARS = 1_115_394
UNICODE_TEXT = "héllo wörld ✓ — naïve café, ünïcödé 😀\n\tΩ≈ç√∫µ≤≥÷ 日本語\x00"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def real_path(shakespeare_path: Path) -> Path:
    return shakespeare_path  # from WORKBENCH_DATA_DIR, checksum verified (conftest.py)


@pytest.fixture(scope="module")
def real_text(real_path: Path) -> str:
    return real_path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def real_corpus(real_text: str) -> Corpus:
    return Corpus.from_text(real_text)


class _Server:
    def __init__(self, root: Path) -> None:
        self.requests: list[str] = []
        requests = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                requests.append(self.path)
                super().do_GET()

            def log_message(self, format: str, *args: object) -> None:
                pass

        handler = functools.partial(Handler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server(tmp_path: Path, real_path: Path) -> Iterator[_Server]:
    """A real HTTP server on loopback serving the real file and a corrupted variant."""
    root = tmp_path / "served"
    root.mkdir()
    shutil.copyfile(real_path, root / "input.txt")
    (root / "corrupt.txt").write_bytes(real_path.read_bytes()[:-1] + b"?")
    srv = _Server(root)
    try:
        yield srv
    finally:
        srv.close()


def _closed_port() -> int:
    """A loopback port that was just free (nothing listens on it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- tokenizer


def test_real_file_is_the_expected_one(real_path: Path, real_text: str) -> None:
    assert hashlib.sha256(real_path.read_bytes()).hexdigest() == REAL_SHA256
    assert len(real_text) == REAL_CHARS
    assert len(set(real_text)) == 65


def test_tokenizer_vocabulary_is_sorted_and_unique() -> None:
    tok = CharTokenizer("banana cab!")
    assert tok.chars == " !abcn"
    assert tok.vocab_size == 6
    assert tok.encode(" !abcn") == [0, 1, 2, 3, 4, 5]


def test_tokenizer_vocabulary_on_real_text(real_text: str) -> None:
    tok = CharTokenizer.from_text(real_text)
    assert tok.chars == "".join(sorted(set(real_text)))
    assert list(tok.chars) == sorted(tok.chars)
    assert tok.vocab_size == 65


def test_tokenizer_round_trip_real_text(real_text: str) -> None:
    tok = CharTokenizer.from_text(real_text)
    ids = tok.encode(real_text)
    assert len(ids) == len(real_text)
    assert min(ids) == 0
    assert max(ids) == tok.vocab_size - 1
    assert tok.decode(ids) == real_text
    assert tok.decode(torch.tensor(ids[:5000])) == real_text[:5000]


def test_tokenizer_round_trip_unicode() -> None:
    tok = CharTokenizer.from_text(UNICODE_TEXT)
    assert tok.decode(tok.encode(UNICODE_TEXT)) == UNICODE_TEXT


def test_tokenizer_json_round_trip(tmp_path: Path, real_text: str) -> None:
    for text in (real_text, UNICODE_TEXT):
        tok = CharTokenizer.from_text(text)
        path = tmp_path / "tokenizer.json"
        tok.save(path)
        loaded = CharTokenizer.load(path)
        assert loaded.chars == tok.chars
        assert loaded.vocab_size == tok.vocab_size
        assert loaded.encode(text[:2000]) == tok.encode(text[:2000])
        assert CharTokenizer.from_json(tok.to_json()).chars == tok.chars


def test_tokenizer_from_json_rejects_other_types() -> None:
    with pytest.raises(ValueError, match="not a character tokenizer"):
        CharTokenizer.from_json('{"type": "bpe", "chars": "ab"}')


def test_tokenizer_unknown_character_raises_value_error() -> None:
    tok = CharTokenizer("abc")
    with pytest.raises(ValueError, match="'z'"):
        tok.encode("abz")


# --------------------------------------------------------------------------- corpus


def _naive(text: str) -> list[int]:
    stoi = {ch: i for i, ch in enumerate(sorted(set(text)))}
    return [stoi[c] for c in text]


def test_corpus_fast_encoding_matches_naive_real(real_text: str, real_corpus: Corpus) -> None:
    full = torch.cat([real_corpus.train, real_corpus.val])
    assert full.dtype == torch.int64
    assert full.tolist() == _naive(real_text)


@pytest.mark.parametrize("text", [UNICODE_TEXT, "héllo wörld ✓", "a", "zzzy\n"])
def test_corpus_fast_encoding_matches_naive_unicode(text: str) -> None:
    corpus = Corpus.from_text(text, val_fraction=0.0)
    full = torch.cat([corpus.train, corpus.val])
    assert full.tolist() == _naive(text)
    assert corpus.tokenizer.decode(full) == text
    assert int(full.min()) >= 0


def test_corpus_split_real(real_text: str, real_corpus: Corpus) -> None:
    n = len(real_text)
    n_train = n * 9 // 10
    assert len(real_corpus.train) == n_train == 1_003_854
    assert len(real_corpus.val) == n - n_train
    enc = _naive(real_text)
    assert real_corpus.train[:100].tolist() == enc[:100]
    assert real_corpus.train[-100:].tolist() == enc[n_train - 100 : n_train]
    assert real_corpus.val.tolist() == enc[n_train:]
    assert real_corpus.split("train") is real_corpus.train
    assert real_corpus.split("val") is real_corpus.val


@pytest.mark.parametrize("n", [10, 100, 101, 999, 12_345])
@pytest.mark.parametrize("val_fraction", [0.1, 0.25, 0.5])
def test_corpus_split_by_fraction(n: int, val_fraction: float) -> None:
    text = "".join("abcdefghij"[(i * 7) % 10] for i in range(n))
    corpus = Corpus.from_text(text, val_fraction=val_fraction)
    n_train = int(n * (1 - Fraction(str(val_fraction))))  # exact floor
    enc = _naive(text)
    assert corpus.train.tolist() == enc[:n_train]
    assert corpus.val.tolist() == enc[n_train:]


def test_corpus_vocab_size_real(real_corpus: Corpus) -> None:
    assert real_corpus.tokenizer.vocab_size == 65


def test_corpus_from_file(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text(UNICODE_TEXT, encoding="utf-8")
    corpus = Corpus.from_file(path, val_fraction=0.0)
    assert corpus.tokenizer.decode(corpus.train) == UNICODE_TEXT


# --------------------------------------------------------------------------- batch sampler


def test_sampler_shapes_and_shift_on_unique_data() -> None:
    data = torch.arange(1000)  # every window is identifiable from its first element
    sampler = BatchSampler(data, block_size=16, batch_size=8, seed=0)
    for _ in range(20):
        x, y = sampler.sample()
        assert x.shape == (8, 16)
        assert y.shape == (8, 16)
        assert x.dtype == y.dtype == torch.int64
        assert torch.equal(y[:, :-1], x[:, 1:])
        start = x[:, :1]
        assert torch.equal(x, start + torch.arange(16))
        assert torch.equal(y, start + 1 + torch.arange(16))


def test_sampler_rows_are_real_windows(real_text: str, real_corpus: Corpus) -> None:
    tok = real_corpus.tokenizer
    train_text = real_text[: len(real_corpus.train)]
    sampler = BatchSampler(real_corpus.train, block_size=32, batch_size=4, seed=7)
    x, y = sampler.sample()
    assert x.shape == (4, 32)
    assert torch.equal(y[:, :-1], x[:, 1:])
    for row_x, row_y in zip(x, y, strict=True):
        window = tok.decode(row_x) + tok.decode(row_y[-1:])
        assert window in train_text
        assert tok.decode(row_y) == window[1:]


def test_sampler_covers_every_start_including_last() -> None:
    data = torch.arange(20)
    block = 5
    sampler = BatchSampler(data, block_size=block, batch_size=64, seed=3)
    starts: set[int] = set()
    for _ in range(20):
        x, y = sampler.sample()
        starts.update(x[:, 0].tolist())
        assert int(y.max()) <= 19
    assert starts == set(range(len(data) - block))


def test_sampler_minimum_length_and_too_short() -> None:
    data = torch.arange(9)
    x, y = BatchSampler(data, block_size=8, batch_size=3, seed=0).sample()
    assert torch.equal(x, torch.arange(8).expand(3, 8))
    assert torch.equal(y, torch.arange(1, 9).expand(3, 8))
    with pytest.raises(ValueError, match="too few"):
        BatchSampler(torch.arange(8), block_size=8, batch_size=3, seed=0)
    with pytest.raises(ValueError):
        BatchSampler(torch.arange(3), block_size=8, batch_size=3, seed=0)


Batch = tuple[torch.Tensor, torch.Tensor]


def _batches(sampler: BatchSampler, k: int) -> list[Batch]:
    return [sampler.sample() for _ in range(k)]


def _same(a: list[Batch], b: list[Batch]) -> bool:
    pairs = zip(a, b, strict=True)
    return all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in pairs)


def test_sampler_deterministic_per_seed() -> None:
    data = torch.arange(10_000)
    first = _batches(BatchSampler(data, 32, 8, seed=123), 5)
    torch.manual_seed(999)  # the global RNG must not matter
    torch.rand(10)
    second = _batches(BatchSampler(data, 32, 8, seed=123), 5)
    other = _batches(BatchSampler(data, 32, 8, seed=124), 5)
    assert _same(first, second)
    assert not _same(first, other)
    # successive batches of one sampler differ too
    assert not torch.equal(first[0][0], first[1][0])


def test_sampler_state_resumes_exact_sequence() -> None:
    data = torch.arange(10_000)
    sampler = BatchSampler(data, 32, 8, seed=5)
    _batches(sampler, 3)
    state = sampler.state()
    expected = _batches(sampler, 4)

    resumed = BatchSampler(data, 32, 8, seed=77)  # a different seed, overridden by the state
    resumed.set_state(state)
    assert _same(_batches(resumed, 4), expected)

    # the saved state is a snapshot: sampling more did not change it
    sampler.set_state(state)
    assert _same(_batches(sampler, 4), expected)


# --------------------------------------------------------------------------- eval set


def test_eval_set_fixed_and_shaped() -> None:
    data = torch.arange(5_000)
    a = eval_set(data, block_size=16, batch_size=4, eval_iters=3, seed=1, split="val")
    torch.manual_seed(12345)
    b = eval_set(data, block_size=16, batch_size=4, eval_iters=3, seed=1, split="val")
    assert a[0].shape == a[1].shape == (12, 16)
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[1], b[1])
    assert torch.equal(a[1][:, :-1], a[0][:, 1:])
    assert torch.equal(a[0], a[0][:, :1] + torch.arange(16))
    c = eval_set(data, block_size=16, batch_size=4, eval_iters=3, seed=2, split="val")
    assert not torch.equal(a[0], c[0])


def test_eval_set_train_and_val_use_different_windows() -> None:
    data = torch.arange(5_000)
    train_x, _ = eval_set(data, 16, 4, 3, seed=1, split="train")
    val_x, _ = eval_set(data, 16, 4, 3, seed=1, split="val")
    assert not torch.equal(train_x[:, 0], val_x[:, 0])


def test_eval_set_on_real_splits(real_corpus: Corpus) -> None:
    tx, ty = eval_set(real_corpus.train, 64, 8, 2, seed=0, split="train")
    vx, vy = eval_set(real_corpus.val, 64, 8, 2, seed=0, split="val")
    assert tx.shape == vx.shape == (16, 64)
    assert torch.equal(ty[:, :-1], tx[:, 1:])
    assert torch.equal(vy[:, :-1], vx[:, 1:])
    assert not torch.equal(tx, vx)
    again = eval_set(real_corpus.val, 64, 8, 2, seed=0, split="val")
    assert torch.equal(again[0], vx)


def test_eval_set_too_short() -> None:
    with pytest.raises(ValueError, match="val"):
        eval_set(torch.arange(4), block_size=4, batch_size=2, eval_iters=1, seed=0, split="val")


# --------------------------------------------------------------------------- datasets


def test_fetch_known_uses_cached_file_without_network(tmp_path: Path, real_path: Path) -> None:
    data_dir = tmp_path / "cache"
    data_dir.mkdir()
    cached = data_dir / "tinyshakespeare.txt"
    shutil.copyfile(real_path, cached)
    calls: list[tuple[int, int | None]] = []

    got = fetch_known(
        "tinyshakespeare",
        data_dir,
        url="http://127.0.0.1:9/",
        progress=lambda done, total: calls.append((done, total)),
        timeout_s=2,
    )
    assert got == cached
    assert calls == []
    assert sha256_file(got) == REAL_SHA256
    assert sorted(p.name for p in data_dir.iterdir()) == ["tinyshakespeare.txt"]


def test_fetch_known_rejects_cached_file_with_wrong_checksum(tmp_path: Path) -> None:
    cached = tmp_path / "tinyshakespeare.txt"
    cached.write_text("not shakespeare\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        fetch_known("tinyshakespeare", tmp_path, url="http://127.0.0.1:9/", timeout_s=2)
    message = str(info.value)
    assert str(cached) in message
    assert REAL_SHA256 in message
    assert cached.read_text(encoding="utf-8") == "not shakespeare\n"  # left for the user


def test_fetch_known_offline_and_not_cached_says_where_to_put_the_file(tmp_path: Path) -> None:
    data_dir = tmp_path / "cache"
    url = f"http://127.0.0.1:{_closed_port()}/input.txt"
    with pytest.raises(DataError) as info:
        fetch_known("tinyshakespeare", data_dir, url=url, timeout_s=5)
    message = str(info.value)
    assert str(data_dir / "tinyshakespeare.txt") in message
    assert "WORKBENCH_DATA_DIR" in message
    assert url in message
    assert not (data_dir / "tinyshakespeare.txt").exists()
    assert list(data_dir.glob("*")) == []  # no leftover .part file


def test_fetch_known_downloads_and_verifies(tmp_path: Path, server: _Server) -> None:
    data_dir = tmp_path / "cache" / "nested"  # created on demand
    calls: list[tuple[int, int | None]] = []
    got = fetch_known(
        "tinyshakespeare",
        data_dir,
        url=server.url("input.txt"),
        progress=lambda done, total: calls.append((done, total)),
        timeout_s=10,
    )
    assert got == data_dir / "tinyshakespeare.txt"
    assert sha256_file(got) == REAL_SHA256
    assert server.requests == ["/input.txt"]
    assert sorted(p.name for p in data_dir.iterdir()) == ["tinyshakespeare.txt"]

    size = got.stat().st_size
    assert calls, "progress callback was never called"
    assert calls[-1] == (size, size)
    done = [d for d, _ in calls]
    assert done == sorted(done)
    assert all(total == size for _, total in calls)

    # a second call is served from the cache: no new request
    again = fetch_known("tinyshakespeare", data_dir, url=server.url("input.txt"), timeout_s=10)
    assert again == got
    assert server.requests == ["/input.txt"]


def test_fetch_known_download_with_wrong_checksum_leaves_nothing(
    tmp_path: Path, server: _Server
) -> None:
    data_dir = tmp_path / "cache"
    url = server.url("corrupt.txt")
    with pytest.raises(DataError) as info:
        fetch_known("tinyshakespeare", data_dir, url=url, timeout_s=10)
    assert REAL_SHA256 in str(info.value)
    assert server.requests == ["/corrupt.txt"]
    assert not (data_dir / "tinyshakespeare.txt").exists()
    assert list(data_dir.glob("*")) == []  # no .part file either


def test_fetch_known_http_error_is_data_error(tmp_path: Path, server: _Server) -> None:
    data_dir = tmp_path / "cache"
    with pytest.raises(DataError, match="WORKBENCH_DATA_DIR"):
        fetch_known("tinyshakespeare", data_dir, url=server.url("missing.txt"), timeout_s=10)
    assert list(data_dir.glob("*")) == []


def test_known_dataset_checksum_and_vocab_need_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # nothing to find here
    monkeypatch.setenv("WORKBENCH_DATA_DIR", str(tmp_path / "nowhere"))
    assert data_checksum("tinyshakespeare", None) == REAL_SHA256
    assert KNOWN_DATASETS["tinyshakespeare"].sha256 == REAL_SHA256
    assert vocab_size("tinyshakespeare", None) == 65
    assert not (tmp_path / "nowhere").exists()


def test_data_checksum_of_path_is_sha256_of_file(tmp_path: Path, real_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_bytes(UNICODE_TEXT.encode("utf-8"))
    assert data_checksum(None, str(path)) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert data_checksum(None, str(real_path)) == REAL_SHA256
    assert sha256_file(real_path) == REAL_SHA256
    assert vocab_size(None, str(path)) == len(set(UNICODE_TEXT))


def test_data_checksum_of_path_follows_changes(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("first version\n", encoding="utf-8")
    first = data_checksum(None, str(path))
    path.write_text("second version, longer\n", encoding="utf-8")
    second = data_checksum(None, str(path))
    assert first != second
    assert second == hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- settings


def test_load_settings_reads_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKBENCH_DATA_DIR", str(tmp_path / "data"))
    assert load_settings().data_dir == tmp_path / "data"


def test_load_settings_expands_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WORKBENCH_DATA_DIR", "~/shakespeare")
    assert load_settings().data_dir == tmp_path / "shakespeare"


def test_load_settings_default_without_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WORKBENCH_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert load_settings().data_dir == tmp_path / "xdg" / "workbench" / "data"
    monkeypatch.setenv("WORKBENCH_DATA_DIR", "")  # empty means unset
    assert load_settings().data_dir == tmp_path / "xdg" / "workbench" / "data"
