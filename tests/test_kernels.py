"""The compiled attention kernel (workbench.models.native): the same results as SDPA and as
TinyCausalAttention, forward and backward; NaN and extreme scores as PyTorch handles them; the
build cache; and the fallback to PyTorch ops where no kernel can be built."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from floats import assert_f32_close

from workbench import cache
from workbench.errors import WorkbenchError
from workbench.models import attention_head_size, build_model
from workbench.models import native as kernels
from workbench.models.attention import (
    SDPA,
    TINY_BLOCK,
    AttentionBackend,
    AttentionUnavailable,
    TinyCausalAttention,
    causal_bias,
    resolve_attention,
)
from workbench.settings import load_settings
from workbench.spec import AttentionSetting, ModelConfig

COMPILER = next(filter(None, (shutil.which(name) for name in ("cc", "gcc", "clang"))), None)
HAS_COMPILER = COMPILER is not None
needs_compiler = pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine")


@pytest.fixture
def fresh_kernels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty kernel cache, and no kernel remembered from earlier tests (both ways)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kernels.tiny_attention.cache_clear()
    yield tmp_path / "workbench" / "kernels"
    kernels.tiny_attention.cache_clear()


def kernel(head_size: int) -> kernels.TinyAttention:
    built = kernels.tiny_attention(head_size)
    assert built is not None, "a C compiler is on the PATH, so the kernel must build"
    return built


def sdpa_rows(qkv: torch.Tensor, n_head: int, T: int) -> torch.Tensor:
    """The reference: rows (B * T, 3 * nh * hs) through SDPA, back to rows (B * T, nh * hs)."""
    hs = qkv.size(1) // (3 * n_head)
    q, k, v = qkv.view(-1, T, 3, n_head, hs).permute(2, 0, 3, 1, 4)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return y.transpose(1, 2).reshape(qkv.size(0), n_head * hs)


SHAPES = [(1, 32, 8), (4, 8, 8), (4, 8, 1), (2, 8, 5), (3, 4, 17), (1, 64, 3), (4, 8, TINY_BLOCK)]


@needs_compiler
@pytest.mark.parametrize(("n_head", "head_size", "T"), SHAPES)
def test_kernel_equals_sdpa_forward_and_backward(n_head: int, head_size: int, T: int) -> None:
    g = torch.Generator().manual_seed(T * 10 + n_head)
    rows = 6 * T
    qkv = (3 * torch.randn(rows, 3 * n_head * head_size, generator=g)).requires_grad_(True)
    reference = qkv.detach().double().requires_grad_(True)  # float64: the kernel's error alone
    out = kernel(head_size)(qkv, n_head, T)
    expected = sdpa_rows(reference, n_head, T)
    assert_f32_close(out, expected.float(), ulps=128)
    grad_out = torch.randn(rows, n_head * head_size, dtype=torch.float64, generator=g)
    out.backward(grad_out.float().t().contiguous().t())  # a non-contiguous incoming gradient
    expected.backward(grad_out)
    assert qkv.grad is not None and reference.grad is not None
    assert_f32_close(qkv.grad, reference.grad.float(), ulps=1024)


def within(got: torch.Tensor, exact: torch.Tensor) -> float:
    """The largest error of ``got`` against the float64 ``exact``, relative to 1 + |exact|."""
    return ((got.double() - exact).abs() / (1 + exact.abs())).max().item()


@functools.cache
def host_bmm_error() -> float:
    """How far this host's float32 ``bmm`` and ``baddbmm`` of 8x8 blocks are from float64: ~1e-7
    where they round as float32 should; 1e-5 and more from a BLAS that splits float32 into
    bfloat16 parts or rounds to TF32 (what one CI host's 9.5e-5 between the two paths looked
    like; the cause there was not pinned down)."""
    g = torch.Generator().manual_seed(5)
    a, b, c = (torch.randn(128, 8, 8, generator=g) for _ in range(3))
    a64, b64, c64 = a.double(), b.double(), c.double()
    return max(
        within(torch.bmm(a, b), torch.bmm(a64, b64)),
        within(torch.baddbmm(c, a, b, alpha=0.3), torch.baddbmm(c64, a64, b64, alpha=0.3)),
    )


@pytest.mark.parametrize("path", [pytest.param("kernel", marks=needs_compiler), "torch_ops"])
@pytest.mark.parametrize(
    ("n_head", "head_size", "T"), [(4, 8, 8), (1, 32, 8), (6, 4, 12), (2, 16, 32)]
)
def test_cpu_path_is_float32_exact_where_every_position_has_weight(
    path: str, n_head: int, head_size: int, T: int
) -> None:
    """Unit-variance q, k, v give scores of order 1, so every earlier position carries weight and
    the exponential is used over its whole working range (the 3x inputs above make most rows
    nearly one-hot). Both CPU paths must then be as close to float64 as float32 allows: measured
    here within 4.8e-7 forward and 1.1e-6 backward (relative to 1 + |x|, 20 seeds), held to 2e-6
    and 5e-6."""
    if path == "torch_ops" and (error := host_bmm_error()) > 1e-5:
        pytest.skip(f"this host's float32 bmm is {error:.1e} from float64, not float32-exact")
    g = torch.Generator().manual_seed(T * 7 + n_head)
    qkv = torch.randn(32 * T, 3 * n_head * head_size, generator=g, requires_grad=True)
    grad_out = torch.randn(32 * T, n_head * head_size, generator=g)
    exact_in = qkv.detach().double().requires_grad_(True)
    exact = sdpa_rows(exact_in, n_head, T)
    (exact_grad,) = torch.autograd.grad(exact, exact_in, grad_out.double())
    if path == "kernel":
        out = kernel(head_size)(qkv, n_head, T)
    else:
        out = TinyCausalAttention.apply(qkv, n_head, causal_bias(T))
    (grad,) = torch.autograd.grad(out, qkv, grad_out)
    assert within(out, exact) < 2e-6
    assert within(grad, exact_grad) < 5e-6


@needs_compiler
def test_kernel_without_grad_is_the_same_forward() -> None:
    qkv = torch.randn(4 * 8, 3 * 2 * 8, requires_grad=True)
    with_grad = kernel(8)(qkv, 2, 8)
    with torch.no_grad():
        without = kernel(8)(qkv, 2, 8)
    assert with_grad.grad_fn is not None and without.grad_fn is None
    assert torch.equal(with_grad.detach(), without)


@needs_compiler
def test_kernel_softmax_is_stable_for_extreme_scores() -> None:
    """Scores in the thousands: the max is subtracted first; weights that underflow are 0."""
    g = torch.Generator().manual_seed(1)
    qkv = 40 * torch.randn(3 * 8, 3 * 2 * 16, generator=g)
    out = kernel(16)(qkv, 2, 8)
    assert torch.isfinite(out).all()
    assert_f32_close(out, sdpa_rows(qkv.double(), 2, 8).float(), ulps=128)


@needs_compiler
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_kernel_propagates_nan_to_what_depends_on_it(where: str) -> None:
    """A diverging run must reach a NaN loss, not finite garbage: a NaN in position 3 of one
    head reaches that head's outputs from position 3 on (all of its channels, but for a NaN in
    v only the channel it is in), and nothing else. (SDPA's CPU kernel is no reference here:
    it drops a NaN query, and spreads a NaN value to earlier positions through 0 * NaN.)"""
    n_head, hs, T = 2, 8, 8
    qkv = torch.randn(2 * T, 3 * n_head * hs)
    part = {"q": 0, "k": 1, "v": 2}[where]
    qkv[T + 3, part * n_head * hs + hs + 5] = float("nan")  # sequence 1, position 3, head 1
    out = kernel(hs)(qkv, n_head, T)
    expected = torch.zeros_like(out, dtype=torch.bool)
    rows = slice(T + 3, T + 4) if where == "q" else slice(T + 3, 2 * T)
    columns = slice(hs + 5, hs + 6) if where == "v" else slice(hs, 2 * hs)
    expected[rows, columns] = True
    assert torch.equal(out.isnan(), expected)


@needs_compiler
def test_kernel_refuses_layouts_it_would_read_out_of_bounds() -> None:
    attention = kernel(8)
    qkv = torch.randn(16, 3 * 2 * 8)
    with pytest.raises(ValueError, match="do not fit"):
        attention(qkv, 3, 8)  # 3 heads of 8 need 72 columns
    with pytest.raises(ValueError, match="do not fit"):
        attention(qkv[:12], 2, 8)  # 12 rows are not whole blocks of 8
    with pytest.raises(ValueError, match="do not fit"):
        attention(torch.randn(64, 3 * 2 * 8), 2, TINY_BLOCK * 2)
    with pytest.raises(ValueError, match="do not fit"):  # checked before anything is allocated
        attention(qkv.requires_grad_(True), 2, 0)
    with pytest.raises(ValueError, match="contiguous float32"):
        attention(qkv.detach().double(), 2, 8)
    with pytest.raises(ValueError, match="contiguous float32"):
        attention(torch.randn(3 * 2 * 8, 16).t(), 2, 8)
    with pytest.raises(ValueError, match="contiguous float32"):
        attention(qkv.detach().view(2, 8, -1), 2, 8)


@needs_compiler
def test_kernel_refuses_probs_and_gradients_of_the_wrong_layout() -> None:
    """The public forward and backward check what they write to and read from: an assert
    would vanish under ``python -O``."""
    attention, qkv = kernel(8), torch.randn(16, 3 * 2 * 8)
    probs = torch.empty(2 * 2, 8, 8)
    attention.forward(qkv, 2, 8, probs)
    for bad in (torch.empty(1, 8, 8), probs.half(), torch.empty(2 * 2, 8, 16)[..., :8]):
        with pytest.raises(ValueError, match="probs"):
            attention.forward(qkv, 2, 8, bad)
        with pytest.raises(ValueError, match="probs"):
            attention.backward(qkv, bad, torch.randn(16, 16), 2)
    with pytest.raises(ValueError, match="dout"):
        attention.backward(qkv, probs, torch.randn(8, 16), 2)
    assert attention.backward(qkv, probs, torch.randn(16, 16).double(), 2).shape == qkv.shape


@needs_compiler
def test_kernel_takes_any_finite_score() -> None:
    """One position, one score of -3.24e38 (finite): its weight is 1, as in PyTorch."""
    q, k, v = -1.8e19, 1.8e19, 5.0
    out = kernel(1)(torch.tensor([[q, k, v]]), 1, 1)
    assert out.item() == 5.0


@needs_compiler
def test_loading_the_kernel_keeps_denormals() -> None:
    """The library is linked without -ffast-math's start-up code, which would flush denormals
    to zero in every thread of the process and so change PyTorch's own results."""
    kernel(8)
    tiny = torch.tensor(1e-40)  # a float32 denormal
    assert (tiny * 1.5).item() > 0


@needs_compiler
def test_build_is_cached_and_reused(fresh_kernels: Path) -> None:
    built = kernel(8)
    (library,) = fresh_kernels.glob("tiny_attention_h8_*.so")
    stamp = library.stat().st_mtime_ns
    kernels.tiny_attention.cache_clear()
    assert kernels.tiny_attention(8) is not built  # loaded again...
    assert library.stat().st_mtime_ns == stamp  # ...from the cache, not rebuilt
    # No scratch left behind: the library, and the record of its content (workbench.cache)
    assert sorted(p.name for p in fresh_kernels.iterdir()) == [
        library.name,
        library.name + ".sha256",
    ]


@pytest.mark.slow
@needs_compiler
def test_concurrent_builds_into_one_cache_both_succeed(fresh_kernels: Path) -> None:
    """Runs of a grid start together and share the cache: each may build, none may see a
    half-written library."""
    script = (
        "from workbench.models.native import tiny_attention\n"
        "import torch\n"
        "k = tiny_attention(12)\n"
        "assert k is not None\n"
        "print(k(torch.randn(8, 36), 1, 8).shape)\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0]
    assert all("torch.Size([8, 12])" in output for output in outputs)
    assert len(list(fresh_kernels.glob("tiny_attention_h12_*.so"))) == 1


def test_without_a_compiler_models_fall_back_to_pytorch_ops(
    fresh_kernels: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CC", str(fresh_kernels / "no-such-compiler"))
    with pytest.warns(RuntimeWarning, match="no native attention kernel"):
        assert kernels.tiny_attention(8) is None
    model = build_model(ModelConfig(kind="multi_head", n_embd=16, n_head=2), 11, 8)
    logits, loss = model(torch.randint(0, 11, (2, 8)), torch.randint(0, 11, (2, 8)))
    assert logits.shape == (2, 8, 11) and loss is not None
    loss.backward()  # through TinyCausalAttention
    assert model.attention.qkv.weight.grad is not None


@needs_compiler
def test_cc_may_carry_arguments(fresh_kernels: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``CC="ccache gcc"`` or ``CC="gcc -m64"`` is a command, split as a shell would."""
    compiler = next(filter(None, map(shutil.which, ("cc", "gcc", "clang"))))
    monkeypatch.setenv("CC", f"{compiler} -Wall")
    assert kernels.tiny_attention(8) is not None
    assert len(list(fresh_kernels.glob("tiny_attention_h8_*.so"))) == 1


def test_without_a_home_directory_models_fall_back(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A container with an arbitrary uid has no home: the data directory still comes from
    WORKBENCH_DATA_DIR, and the kernel, with nowhere to be cached, is not built."""

    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("WORKBENCH_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(Path, "home", no_home)
    kernels.tiny_attention.cache_clear()
    try:
        settings = load_settings()
        assert settings.data_dir == tmp_path and settings.kernel_dir is None
        with pytest.warns(RuntimeWarning, match="no cache directory"):
            assert kernels.tiny_attention(8) is None
    finally:
        kernels.tiny_attention.cache_clear()


def test_heads_too_large_for_the_kernel_keep_to_pytorch_quietly(fresh_kernels: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.tiny_attention(kernels.MAX_HEAD + 1) is None
    assert not fresh_kernels.exists()


def test_native_kernels_can_be_turned_off(
    fresh_kernels: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORKBENCH_NATIVE", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # turned off on purpose: no warning
        assert kernels.tiny_attention(8) is None
    assert not fresh_kernels.exists()


@needs_compiler
@pytest.mark.parametrize("config", [
    ModelConfig(kind="single_head", n_embd=16),
    ModelConfig(kind="transformer", n_embd=16, n_head=4, n_layer=2),
])  # fmt: skip
def test_models_train_the_same_with_and_without_the_kernel(
    config: ModelConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(0)
        model = build_model(config, 11, 8)
        idx = torch.randint(0, 11, (4, 8), generator=torch.Generator().manual_seed(1))
        _, loss = model(idx, idx.roll(-1, 1))
        assert loss is not None
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters() if p.grad is not None]

    assert kernels.tiny_attention(config.n_embd // config.n_head) is not None
    native_loss, native_grads = loss_and_grads()
    monkeypatch.setattr(kernels, "tiny_attention", lambda head_size: None)
    torch_loss, torch_grads = loss_and_grads()
    assert_f32_close(native_loss, torch_loss, ulps=16)
    assert len(native_grads) == len(torch_grads) > 0
    for native, torch_ops in zip(native_grads, torch_grads, strict=True):
        assert_f32_close(native, torch_ops, ulps=1024)


# -- the backends behind train.attention -----------------------------------------------------

# The ablation's attention models (experiments/ablation.yaml: n_embd 32, batch 32) at its block
# sizes, and the lecture's rung 6.
ABLATION_MODELS = {
    "single_head": ModelConfig(kind="single_head", n_embd=32),
    "multi_head": ModelConfig(kind="multi_head", n_embd=32, n_head=4),
    "rung6": ModelConfig(kind="transformer", n_embd=32, n_head=4, n_layer=3),
}


def logits_and_grads(
    config: ModelConfig, block: int, attention: AttentionBackend
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = build_model(config, 65, block, attention=attention)
    idx = torch.randint(0, 65, (32, block), generator=torch.Generator().manual_seed(1))
    logits, loss = model(idx, idx.roll(-1, 1))
    assert loss is not None
    loss.backward()
    return logits.detach(), [p.grad for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("setting", ["torch", pytest.param("native", marks=needs_compiler)])
@pytest.mark.parametrize("block", [8, 16, 32])
@pytest.mark.parametrize("name", list(ABLATION_MODELS))
def test_every_backend_gives_the_logits_and_grads_of_sdpa(
    setting: AttentionSetting, block: int, name: str
) -> None:
    config = ABLATION_MODELS[name]
    backend = resolve_attention(setting, torch.device("cpu"), block, attention_head_size(config))
    assert backend.name == setting
    logits, grads = logits_and_grads(config, block, backend)
    sdpa_logits, sdpa_grads = logits_and_grads(config, block, SDPA)
    assert_f32_close(logits, sdpa_logits, ulps=128)
    assert len(grads) == len(sdpa_grads) > 0
    for grad, sdpa_grad in zip(grads, sdpa_grads, strict=True):
        assert_f32_close(grad, sdpa_grad, ulps=1024)


def test_auto_resolves_as_before() -> None:
    """auto: native or torch on a CPU for blocks up to TINY_BLOCK, SDPA beyond and on a GPU."""
    cpu = torch.device("cpu")
    short = resolve_attention("auto", cpu, TINY_BLOCK, 8).name
    assert short == ("native" if kernels.tiny_attention(8) is not None else "torch")
    assert resolve_attention("auto", cpu, TINY_BLOCK + 1, 8).name == "sdpa"
    assert resolve_attention("auto", torch.device("cuda"), 8, 8).name == "sdpa"
    assert resolve_attention("sdpa", cpu, 8, 8).name == "sdpa"
    model = build_model(ModelConfig(kind="multi_head", n_embd=32, n_head=4), 11, 8)
    assert model.attention_backend is not None and model.attention_backend.name == short
    assert build_model(ModelConfig(kind="bigram"), 11, 8).attention_backend is None


def test_auto_without_a_compiler_falls_back_to_the_torch_path(
    fresh_kernels: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CC", str(fresh_kernels / "no-such-compiler"))
    with pytest.warns(RuntimeWarning, match="no native attention kernel"):
        assert resolve_attention("auto", torch.device("cpu"), 8, 8).name == "torch"


@pytest.mark.parametrize(
    ("environment", "message"),
    [
        ({"CC": "/no/such/compiler"}, r"no C compiler found \(/no/such/compiler\)"),
        ({"WORKBENCH_NATIVE": "0"}, "WORKBENCH_NATIVE=0 turns native kernels off"),
    ],
)
def test_native_where_no_kernel_can_be_had_is_one_clear_error(
    environment: dict[str, str],
    message: str,
    fresh_kernels: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an error, not a warning and a fallback
        with pytest.raises(AttentionUnavailable, match=message) as raised:
            resolve_attention("native", torch.device("cpu"), 8, 8)
    assert isinstance(raised.value, WorkbenchError)
    (line,) = raised.value.lines()
    assert "\n" not in line and line.startswith("train.attention=native: no native attention")


@pytest.mark.parametrize(
    ("setting", "device", "block"), [("native", "cpu", TINY_BLOCK + 1), ("native", "cuda", 8),
                                     ("torch", "cuda", 8)]
)  # fmt: skip
def test_cpu_backends_elsewhere_are_refused(
    setting: AttentionSetting, device: str, block: int
) -> None:
    with pytest.raises(AttentionUnavailable, match=f"train.attention={setting} runs on the CPU"):
        resolve_attention(setting, torch.device(device), block, 8)


@pytest.mark.parametrize("setting", ["sdpa", "torch", pytest.param("native", marks=needs_compiler)])
def test_forward_never_reads_settings(setting: AttentionSetting, monkeypatch: pytest.MonkeyPatch):
    """The backend is chosen when a job starts; a forward and backward read no setting and no
    environment variable, whatever the backend."""
    config = ABLATION_MODELS["rung6"]
    backend = resolve_attention(setting, torch.device("cpu"), 8, attention_head_size(config))
    model = build_model(config, 11, 8, attention=backend)
    built = build_model(config, 11, 8)  # the default: auto, resolved here

    def no_settings() -> None:
        raise AssertionError("settings read during a forward")

    monkeypatch.setattr("workbench.settings.load_settings", no_settings)
    monkeypatch.setattr("workbench.models.native.load_settings", no_settings)
    monkeypatch.setattr(os, "environ", {})  # a read of os.environ would find nothing
    monkeypatch.setattr(os, "getenv", no_settings)
    kernels.tiny_attention.cache_clear()  # no kernel from the cache behind auto's back
    idx = torch.randint(0, 11, (4, 8))
    for each in (model, built):
        _, loss = each(idx, idx)
        assert loss is not None
        loss.backward()
        each.eval()
        with torch.no_grad():
            each(idx)


def test_attention_dropout_always_takes_sdpa_and_the_tag_says_so() -> None:
    """The CPU paths compute no dropout: with it, auto is SDPA for every call, and torch or
    native are refused, so ``workbench.attention`` names the path every step took."""
    cpu = torch.device("cpu")
    assert resolve_attention("auto", cpu, 8, 8, dropout=0.2).name == "sdpa"
    for setting in ("torch", "native"):
        with pytest.raises(AttentionUnavailable, match="computes no attention dropout"):
            resolve_attention(setting, cpu, 8, 8, dropout=0.2)
    assert resolve_attention("auto", cpu, 8, 8, dropout=0.0).name in ("native", "torch")


PLANTED = """#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *marker = fopen("%s", "w");
    if (marker) fclose(marker);
}
void tiny_attention_forward(void) {}
void tiny_attention_backward(void) {}
"""


def load_in_a_new_process(cache_home: Path) -> subprocess.CompletedProcess[str]:
    """``native.load(8)`` and one call, in a fresh interpreter (a library this process loaded
    once is never read again from its path: dlopen hands back the one it holds)."""
    script = (
        "import torch\n"
        "from workbench.models.native import load\n"
        "print(tuple(load(8)(torch.randn(16, 24), 1, 8).shape))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
        env={**os.environ, "XDG_CACHE_HOME": str(cache_home)},
    )  # fmt: skip


def plant(library: Path, content: bytes) -> None:
    """``library`` replaced by ``content`` (a new file renamed over it, as an attacker would)."""
    swap = library.with_name("swap")
    swap.write_bytes(content)
    os.replace(swap, library)


@pytest.mark.slow
@needs_compiler
def test_a_kernel_replaced_in_the_cache_is_built_again_never_loaded(
    fresh_kernels: Path, tmp_path: Path
) -> None:
    """The second hostile round: a library swapped into the cache was loaded (its constructor
    ran). A kernel is loaded only while its content is what workbench built."""
    first = load_in_a_new_process(tmp_path)
    assert first.returncode == 0 and "(16, 8)" in first.stdout, first.stderr
    (library,) = fresh_kernels.glob("tiny_attention_h8_*.so")
    marker = tmp_path / "constructor-ran"
    source = tmp_path / "planted.c"
    source.write_text(PLANTED % marker)
    out = tmp_path / "planted.so"
    assert COMPILER is not None
    compiled = subprocess.run(
        [COMPILER, "-shared", "-fPIC", str(source), "-o", str(out)], capture_output=True, text=True
    )
    assert compiled.returncode == 0, compiled.stderr
    plant(library, out.read_bytes())
    again = load_in_a_new_process(tmp_path)
    assert again.returncode == 0 and "(16, 8)" in again.stdout, again.stderr
    assert not marker.exists()
    assert library.read_bytes() != out.read_bytes() and cache.verified(library)


@pytest.mark.slow
@needs_compiler
def test_a_broken_kernel_is_built_again_not_a_verdict(fresh_kernels: Path, tmp_path: Path) -> None:
    """A library that does not load, even with a record that matches it (written by someone
    else): built again, once; what asked for it gets a kernel."""
    assert load_in_a_new_process(tmp_path).returncode == 0
    (library,) = fresh_kernels.glob("tiny_attention_h8_*.so")
    plant(library, b"\x7fELF broken")
    cache.record(library)
    again = load_in_a_new_process(tmp_path)
    assert again.returncode == 0 and "(16, 8)" in again.stdout, again.stderr
    assert cache.verified(library) and len(library.read_bytes()) > 1000
