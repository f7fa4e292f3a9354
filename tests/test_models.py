"""The model ladder against the lecture's own computations: the averaging trick's three
versions, per-head attention modules versus the fused QKV, causality, generation, parameter
counts and attention maps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from floats import assert_f32_close
from reference import (
    GPTLanguageModel,
    MultiHeadAttention,
    bag_of_words_v1,
    bag_of_words_v2,
    bag_of_words_v3,
)
from torch import nn

from workbench.models import MODELS, build_model, count_params
from workbench.models.attention import (
    SDPA,
    TINY_BLOCK,
    TORCH_OPS,
    TinyCausalAttention,
    causal_bias,
)
from workbench.models.ladder import (
    CausalSelfAttention,
    LanguageModel,
    MultiHead,
    SingleHead,
    SoftmaxAverage,
    Transformer,
    UniformAverage,
)
from workbench.spec import MODEL_KINDS, ModelConfig

VOCAB = 11
BLOCK = 8
N_EMBD = 16


def make(config: ModelConfig, vocab: int = VOCAB, block: int = BLOCK, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(config, vocab, block).eval()


def copy_heads_into_fused(ref: MultiHeadAttention, attention: CausalSelfAttention) -> None:
    """Put the reference heads' key/query/value weights into the fused ``qkv`` Linear.

    Its output is split into q, k, v blocks of ``n_head * head_size`` channels each, and each
    block is viewed as (n_head, head_size): rows ``h*hs:(h+1)*hs`` of a block belong to head h.
    """
    n_head, hs = attention.n_head, attention.head_size
    assert len(ref.heads) == n_head
    with torch.no_grad():
        for h, head in enumerate(ref.heads):
            for block, linear in enumerate((head.query, head.key, head.value)):
                start = block * n_head * hs + h * hs
                attention.qkv.weight[start : start + hs] = linear.weight


def fused_slice(attention: CausalSelfAttention, t: torch.Tensor, block: int, h: int):
    n_head, hs = attention.n_head, attention.head_size
    start = block * n_head * hs + h * hs
    return t[start : start + hs]


def multi_head_with_reference(seed: int) -> tuple[MultiHead, MultiHeadAttention]:
    """Rung 3 (4 heads of 8) and per-head reference modules holding the same weights."""
    model = make(ModelConfig(kind="multi_head", n_embd=32, n_head=4))
    assert isinstance(model, MultiHead)
    torch.manual_seed(seed)
    ref = MultiHeadAttention(32, 4, 8, BLOCK)
    copy_heads_into_fused(ref, model.attention)
    return model, ref


# -- the averaging trick: versions 1-3 and the two averaging rungs ---------------------------


@pytest.mark.parametrize("T", [BLOCK, 5, 1])
def test_bag_of_words_versions_agree_with_averaging_models(T: int) -> None:
    torch.manual_seed(1)
    x = torch.randn(3, T, N_EMBD)
    v1, v2, v3 = bag_of_words_v1(x), bag_of_words_v2(x), bag_of_words_v3(x)
    assert_f32_close(v1, v2, ulps=32)
    assert_f32_close(v1, v3, ulps=32)

    uniform = make(ModelConfig(kind="uniform_avg", n_embd=N_EMBD))
    frozen = make(ModelConfig(kind="softmax_avg", n_embd=N_EMBD, learnable=False))
    assert isinstance(uniform, UniformAverage)
    assert isinstance(frozen, SoftmaxAverage)
    assert_f32_close(uniform.mix(x), v1, ulps=32)
    assert_f32_close(frozen.mix(x), v1, ulps=32)
    # The first position sees only itself.
    assert torch.equal(uniform.mix(x)[:, 0], x[:, 0])


def test_uniform_and_frozen_softmax_models_give_identical_logits() -> None:
    uniform = make(ModelConfig(kind="uniform_avg", n_embd=N_EMBD), seed=3)
    frozen = make(ModelConfig(kind="softmax_avg", n_embd=N_EMBD, learnable=False), seed=4)
    missing, unexpected = frozen.load_state_dict(uniform.state_dict(), strict=False)
    assert missing == ["affinity"]
    assert unexpected == []
    idx = torch.randint(0, VOCAB, (4, BLOCK), generator=torch.Generator().manual_seed(0))
    for T in (BLOCK, 3):
        a, _ = uniform(idx[:, :T])
        b, _ = frozen(idx[:, :T])
        assert a.shape == (4, T, VOCAB)
        assert_f32_close(a, b, ulps=32)


def test_frozen_softmax_average_has_no_trainable_affinity() -> None:
    frozen = make(ModelConfig(kind="softmax_avg", n_embd=N_EMBD, learnable=False))
    assert isinstance(frozen, SoftmaxAverage)
    assert not frozen.affinity.requires_grad
    assert "affinity" not in {n for n, p in frozen.named_parameters() if p.requires_grad}
    idx = torch.randint(0, VOCAB, (2, BLOCK))
    _, loss = frozen(idx, idx)
    assert loss is not None
    loss.backward()
    assert frozen.affinity.grad is None
    assert frozen.token_embedding.weight.grad is not None

    learnable = make(ModelConfig(kind="softmax_avg", n_embd=N_EMBD, learnable=True))
    assert isinstance(learnable, SoftmaxAverage)
    assert learnable.affinity.requires_grad
    # Starts at zero affinities, i.e. as uniform averaging.
    assert torch.count_nonzero(learnable.affinity) == 0
    x = torch.randn(2, BLOCK, N_EMBD)
    assert_f32_close(learnable.mix(x), bag_of_words_v2(x), ulps=32)


# -- attention: per-head reference modules versus the fused QKV ------------------------------


def _compare_attention(
    model: SingleHead | MultiHead, ref: MultiHeadAttention, T: int, seed: int = 0
) -> None:
    attention = model.attention
    copy_heads_into_fused(ref, attention)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, T, model.config.n_embd, generator=g)
    x_ref = x.clone().requires_grad_(True)
    x_fused = x.clone().requires_grad_(True)

    out_ref = ref(x_ref)
    out_fused = model.mix(x_fused)
    assert out_fused.shape == out_ref.shape == (2, T, attention.n_head * attention.head_size)
    assert_f32_close(out_fused, out_ref, ulps=128)

    grad_out = torch.randn(out_ref.shape, generator=g)
    (out_ref * grad_out).sum().backward()
    (out_fused * grad_out).sum().backward()
    assert x_ref.grad is not None and x_fused.grad is not None
    assert_f32_close(x_fused.grad, x_ref.grad, ulps=128)

    fused_grad = attention.qkv.weight.grad
    assert fused_grad is not None
    for h, head in enumerate(ref.heads):
        for block, linear in enumerate((head.query, head.key, head.value)):
            assert linear.weight.grad is not None
            got = fused_slice(attention, fused_grad, block, h)
            assert_f32_close(got, linear.weight.grad, ulps=128, msg=(h, block))


@pytest.mark.parametrize("T", [BLOCK, 5])
def test_multi_head_equals_per_head_reference(T: int) -> None:
    n_embd, n_head = 32, 4
    model = make(ModelConfig(kind="multi_head", n_embd=n_embd, n_head=n_head))
    assert isinstance(model, MultiHead)
    assert model.attention.proj is None  # rung 3: heads concatenated, no projection
    torch.manual_seed(10)
    ref = MultiHeadAttention(n_embd, n_head, n_embd // n_head, BLOCK)
    _compare_attention(model, ref, T)


@pytest.mark.parametrize("head_size", [None, 16])
def test_single_head_equals_reference_head(head_size: int | None) -> None:
    n_embd = 32
    model = make(ModelConfig(kind="single_head", n_embd=n_embd, head_size=head_size))
    assert isinstance(model, SingleHead)
    hs = head_size or n_embd
    assert model.attention.n_head == 1
    assert model.attention.head_size == hs
    assert model.lm_head.in_features == hs
    torch.manual_seed(11)
    ref = MultiHeadAttention(n_embd, 1, hs, BLOCK)
    _compare_attention(model, ref, BLOCK)


def test_multi_head_beyond_tiny_blocks_equals_per_head_reference() -> None:
    """Blocks longer than TINY_BLOCK take SDPA on the CPU; the same reference holds."""
    block = TINY_BLOCK + 8
    model = make(ModelConfig(kind="multi_head", n_embd=32, n_head=4), block=block)
    assert isinstance(model, MultiHead)
    torch.manual_seed(12)
    _compare_attention(model, MultiHeadAttention(32, 4, 8, block), block)


def _sdpa_heads(qkv: torch.Tensor, n_head: int) -> torch.Tensor:
    B, T, width = qkv.shape
    hs = width // (3 * n_head)
    q, k, v = (t.view(B, T, n_head, hs).transpose(1, 2) for t in qkv.split(n_head * hs, dim=2))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return y.transpose(1, 2).reshape(B, T, n_head * hs)


@pytest.mark.parametrize(
    ("n_head", "head_size", "T"),
    [(1, 32, 8), (4, 8, 8), (4, 8, 1), (2, 8, 5), (3, 4, 17), (4, 8, TINY_BLOCK)],
)
def test_tiny_attention_equals_sdpa_forward_and_backward(n_head: int, head_size: int, T: int):
    g = torch.Generator().manual_seed(T + n_head)
    qkv = (3 * torch.randn(6, T, 3 * n_head * head_size, generator=g)).requires_grad_(True)
    qkv_ref = qkv.detach().clone().requires_grad_(True)
    out = TinyCausalAttention.apply(qkv.view(6 * T, -1), n_head, causal_bias(T))  # rows
    ref = _sdpa_heads(qkv_ref, n_head).view(6 * T, -1)
    assert_f32_close(out, ref, ulps=128)
    # a non-contiguous incoming gradient, as a transpose downstream would hand back
    grad_out = torch.randn(ref.shape[::-1], generator=g).t()
    out.backward(grad_out)
    ref.backward(grad_out)
    assert qkv.grad is not None and qkv_ref.grad is not None
    assert_f32_close(qkv.grad, qkv_ref.grad, ulps=1024)


@pytest.mark.parametrize("T", [12, 5, 1])
def test_attention_module_tiny_and_sdpa_paths_agree(T: int) -> None:
    """The module's own causal mask, sliced to T of a block of 12, in both backends."""
    outputs = []
    for backend in (TORCH_OPS, SDPA):
        torch.manual_seed(3)
        attention = CausalSelfAttention(16, 2, 8, 12, proj=True, dropout=0.0, attention=backend)
        x = torch.randn(3, T, 16, requires_grad=True)
        y = attention(x)
        (grad,) = torch.autograd.grad(y.sum(), x)
        outputs.append((y, grad))
    (tiny, tiny_grad), (sdpa, sdpa_grad) = outputs
    assert_f32_close(tiny, sdpa, ulps=128)
    assert_f32_close(tiny_grad, sdpa_grad, ulps=1024)


def test_attention_module_refuses_blocks_longer_than_its_mask() -> None:
    """The torch path adds the module's causal mask: a block longer than it is refused, not
    broadcast into a wrong mask."""
    attention = CausalSelfAttention(16, 2, 8, 4, proj=False, dropout=0.0, attention=TORCH_OPS)
    with pytest.raises(ValueError, match="more than the block size 4"):
        attention(torch.randn(3, 8, 16))


@pytest.mark.parametrize(("n_head", "T"), [(1, 8), (2, 5), (2, 20)])  # manual and torch softmax
def test_tiny_attention_gradcheck(n_head: int, T: int):
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, T, 3 * n_head * 4, generator=g, dtype=torch.float64)
    bias = causal_bias(T, torch.float64)
    assert torch.autograd.gradcheck(
        lambda t: TinyCausalAttention.apply(t.view(2 * T, -1), n_head, bias),
        (qkv.requires_grad_(True),),
    )


def test_multi_head_whole_model_equals_reference_pipeline() -> None:
    """Embeddings -> reference heads -> lm_head gives the model's logits."""
    model, ref = multi_head_with_reference(seed=12)
    idx = torch.randint(0, VOCAB, (3, BLOCK), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tok = model.token_embedding(idx)
        pos = model.position_embedding(torch.arange(BLOCK))
        expected = model.lm_head(ref(tok + pos))
        logits, _ = model(idx)
    assert_f32_close(logits, expected, ulps=128)


def load_reference_gpt(ref: GPTLanguageModel, model: Transformer) -> None:
    """Copy every weight of the lecture-style model into workbench's transformer."""
    assert len(ref.blocks) == len(model.blocks)
    with torch.no_grad():
        model.token_embedding.weight.copy_(ref.token_embedding_table.weight)
        model.position_embedding.weight.copy_(ref.position_embedding_table.weight)
        model.lm_head.load_state_dict(ref.lm_head.state_dict())
        if model.ln_f is not None:
            model.ln_f.load_state_dict(ref.ln_f.state_dict())
        for ref_block, block in zip(ref.blocks, model.blocks, strict=True):
            copy_heads_into_fused(ref_block.sa, block.attention)
            if block.attention.proj is not None:
                block.attention.proj.load_state_dict(ref_block.sa.proj.state_dict())
            assert block.ffwd is not None
            block.ffwd.load_state_dict(ref_block.ffwd.net.state_dict())
            for norm, ref_norm in ((block.ln1, ref_block.ln1), (block.ln2, ref_block.ln2)):
                if norm is not None:
                    norm.load_state_dict(ref_norm.state_dict())
    # Everything the workbench model has was overwritten: nothing left unmatched.
    assert model.num_params() == sum(p.numel() for p in ref.parameters())


LADDER = {
    "r4_ffwd": dict(n_layer=1, ffwd="linear", residual=False, layernorm=False, proj=False),
    "r5_residual_blocks": dict(n_layer=3, ffwd="mlp", residual=True, layernorm=False, proj=True),
    "r6_layernorm": dict(n_layer=3, ffwd="mlp", residual=True, layernorm=True, proj=True),
    "r7_scaled_down": dict(n_layer=2, dropout=0.2, init="normal"),
}


@pytest.mark.parametrize("rung", list(LADDER))
@pytest.mark.parametrize("T", [BLOCK, 5])
def test_transformer_rungs_equal_lecture_style_reference(rung: str, T: int) -> None:
    n_embd, n_head = 32, 4
    config = ModelConfig(kind="transformer", n_embd=n_embd, n_head=n_head, **LADDER[rung])
    model = make(config)
    assert isinstance(model, Transformer)
    torch.manual_seed(14)
    ref = GPTLanguageModel(
        VOCAB,
        BLOCK,
        n_embd,
        n_head,
        config.n_layer,
        wide=config.ffwd == "mlp",
        residual=config.residual,
        layernorm=config.layernorm,
        proj=config.proj is not False,
    ).eval()
    with torch.no_grad():  # LayerNorm's default init is ones/zeros: make the copy count
        for name, p in ref.named_parameters():
            if "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    load_reference_gpt(ref, model)
    idx = torch.randint(0, VOCAB, (3, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, _ = model(idx)
        expected = ref(idx)
    assert_f32_close(logits, expected, ulps=128)


# -- causality -------------------------------------------------------------------------------

CAUSAL_CONFIGS = {
    "bigram": ModelConfig(kind="bigram"),
    "uniform_avg": ModelConfig(kind="uniform_avg", n_embd=N_EMBD),
    "softmax_avg": ModelConfig(kind="softmax_avg", n_embd=N_EMBD, learnable=True),
    "single_head": ModelConfig(kind="single_head", n_embd=N_EMBD),
    "multi_head": ModelConfig(kind="multi_head", n_embd=N_EMBD, n_head=4),
    "transformer": ModelConfig(kind="transformer", n_embd=N_EMBD, n_head=4),
    "transformer_r4": ModelConfig(
        kind="transformer",
        n_embd=N_EMBD,
        n_head=4,
        n_layer=1,
        ffwd="linear",
        residual=False,
        layernorm=False,
        proj=False,
    ),
    "transformer_r7": ModelConfig(
        kind="transformer", n_embd=N_EMBD, n_head=4, n_layer=2, dropout=0.2, init="normal"
    ),
}


@pytest.mark.parametrize("name", list(CAUSAL_CONFIGS))
def test_no_model_looks_at_the_future(name: str) -> None:
    model = make(CAUSAL_CONFIGS[name], seed=5)
    if isinstance(model, SoftmaxAverage):
        with torch.no_grad():  # every entry, future ones included: the mask must hide them
            model.affinity.normal_(0.0, 3.0, generator=torch.Generator().manual_seed(2))
    assert not model.training  # dropout off
    idx = torch.randint(0, VOCAB, (2, BLOCK), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base, _ = model(idx)
        again, _ = model(idx)
        assert torch.equal(base, again)  # deterministic in eval mode
        for t in range(BLOCK):
            changed = idx.clone()
            changed[:, t] = (idx[:, t] + 1 + t) % VOCAB
            logits, _ = model(changed)
            assert_f32_close(logits[:, :t], base[:, :t], ulps=32, msg=t)
            # The changed position itself always sees the new token.
            assert (logits[:, t] - base[:, t]).abs().amax() > 1e-4, t
            later = (logits[:, t + 1 :] - base[:, t + 1 :]).abs().amax(dim=-1)  # (B, T-t-1)
            if name == "bigram":
                assert torch.equal(logits[:, t + 1 :], base[:, t + 1 :])
            else:  # every later position mixes in the changed one
                assert bool((later > 1e-6).all()), (t, later)


def test_dropout_is_active_in_training_mode() -> None:
    model = make(CAUSAL_CONFIGS["transformer_r7"])
    idx = torch.randint(0, VOCAB, (2, BLOCK))
    model.train()
    a, _ = model(idx)
    b, _ = model(idx)
    assert not torch.equal(a, b)
    model.eval()
    c, _ = model(idx)
    d, _ = model(idx)
    assert torch.equal(c, d)


# -- generation ------------------------------------------------------------------------------

GEN_KINDS = ["bigram", "uniform_avg", "softmax_avg", "single_head", "multi_head", "transformer"]


@pytest.mark.parametrize("kind", GEN_KINDS)
def test_generate_shape_range_and_determinism(kind: str) -> None:
    model = make(ModelConfig(kind=kind, n_embd=N_EMBD, n_head=4, n_layer=1))  # type: ignore[arg-type]
    idx = torch.randint(0, VOCAB, (3, 4))
    out = model.generate(idx, 12, generator=torch.Generator().manual_seed(7))
    assert out.shape == (3, 4 + 12)
    assert out.dtype == torch.long
    assert torch.equal(out[:, :4], idx)
    assert int(out.min()) >= 0 and int(out.max()) < VOCAB
    again = model.generate(idx, 12, generator=torch.Generator().manual_seed(7))
    assert torch.equal(out, again)


@pytest.mark.parametrize("kind", GEN_KINDS)
def test_generate_crops_context_to_block_size(kind: str) -> None:
    model = make(ModelConfig(kind=kind, n_embd=N_EMBD, n_head=4, n_layer=1))  # type: ignore[arg-type]
    assert model.block_size == BLOCK
    prompt = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(4))
    if kind != "bigram":
        with pytest.raises((IndexError, RuntimeError)):  # position embedding: BLOCK rows only
            model(prompt)
    out = model.generate(prompt, 5, top_k=1)
    assert out.shape == (2, 25)
    # Each greedy token is the argmax of the logits on the last BLOCK tokens.
    for step in range(5):
        context = out[:, : 20 + step][:, -BLOCK:]
        with torch.no_grad():
            logits, _ = model(context)
        assert torch.equal(out[:, 20 + step], logits[:, -1].argmax(-1))


@pytest.mark.parametrize("kind", GEN_KINDS)
def test_generate_top_k_1_is_greedy(kind: str) -> None:
    model = make(ModelConfig(kind=kind, n_embd=N_EMBD, n_head=4, n_layer=1))  # type: ignore[arg-type]
    idx = torch.randint(0, VOCAB, (3, 2), generator=torch.Generator().manual_seed(5))
    greedy = idx
    with torch.no_grad():
        for _ in range(10):
            logits, _ = model(greedy[:, -BLOCK:])
            greedy = torch.cat((greedy, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    sampled = model.generate(idx, 10, top_k=1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sampled, greedy)
    # Different seeds cannot change a top_k=1 sample; near-zero temperature is greedy too.
    other = model.generate(idx, 10, top_k=1, generator=torch.Generator().manual_seed(2))
    assert torch.equal(other, greedy)
    cold = model.generate(idx, 10, temperature=1e-6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(cold, greedy)


def test_generate_sampling_differs_by_seed() -> None:
    model = make(ModelConfig(kind="bigram"))
    idx = torch.zeros((1, 1), dtype=torch.long)
    a = model.generate(idx, 50, generator=torch.Generator().manual_seed(0))
    b = model.generate(idx, 50, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a, b)


# -- parameter counts ------------------------------------------------------------------------


def _lecture_rung7_params() -> int:
    """The lecture's gpt.py, counted by hand: 10.788929 M."""
    C, V, T, L = 384, 65, 256, 6
    block = 3 * C * C + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C) + 2 * (2 * C)
    return V * C + T * C + L * block + 2 * C + (C * V + V)


def test_rung7_parameter_count_matches_lecture() -> None:
    config = ModelConfig(
        kind="transformer", n_embd=384, n_head=6, n_layer=6, dropout=0.2, init="normal"
    )
    assert _lecture_rung7_params() == 10_788_929
    assert count_params(config, 65, 256) == 10_788_929
    model = build_model(config, 65, 256)
    assert model.num_params() == 10_788_929


def test_lecture_rung_parameter_counts() -> None:
    V, T, C = 65, 8, 32
    emb = V * C + T * C + (C * V + V)  # token + position embeddings, lm_head
    rungs = {
        "r0": (ModelConfig(kind="bigram"), V * V),
        "r1": (ModelConfig(kind="transformer", n_layer=0, layernorm=False), emb),
        "r2": (ModelConfig(kind="single_head"), emb + 3 * C * C),
        "r3": (ModelConfig(kind="multi_head", n_head=4), emb + 3 * C * C),
        "r4": (
            ModelConfig(
                kind="transformer",
                n_layer=1,
                ffwd="linear",
                residual=False,
                layernorm=False,
                proj=False,
            ),
            emb + 3 * C * C + (C * C + C),
        ),
        "r5": (
            ModelConfig(kind="transformer", n_layer=3, layernorm=False, proj=True),
            emb + 3 * (3 * C * C + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)),
        ),
    }
    for name, (config, expected) in rungs.items():
        assert count_params(config, V, T) == expected, name
        assert build_model(config, V, T).num_params() == expected, name


COUNT_CONFIGS = [
    ModelConfig(kind="bigram"),
    ModelConfig(kind="uniform_avg", n_embd=24),
    ModelConfig(kind="softmax_avg", n_embd=24),
    ModelConfig(kind="softmax_avg", n_embd=24, learnable=False),
    ModelConfig(kind="single_head", n_embd=24),
    ModelConfig(kind="single_head", n_embd=24, head_size=12),
    ModelConfig(kind="multi_head", n_embd=24, n_head=3),
    ModelConfig(kind="multi_head", n_embd=24, n_head=3, proj=True),
    ModelConfig(kind="transformer", n_embd=24, n_head=3),
    ModelConfig(kind="transformer", n_embd=24, n_head=3, n_layer=0),
    ModelConfig(kind="transformer", n_embd=24, n_head=3, ffwd="none", layernorm=False),
    ModelConfig(kind="transformer", n_embd=24, n_head=3, init="normal", dropout=0.1),
]


@pytest.mark.parametrize("config", COUNT_CONFIGS, ids=lambda c: str(c.kind))
def test_count_params_on_meta_equals_real_model(config: ModelConfig) -> None:
    model = build_model(config, VOCAB, BLOCK)
    assert count_params(config, VOCAB, BLOCK) == model.num_params()
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_every_kind_is_counted_and_bigram_is_a_table() -> None:
    for kind in MODEL_KINDS:
        config = ModelConfig(kind=kind)  # type: ignore[arg-type]
        assert count_params(config, 65, 8) == build_model(config, 65, 8).num_params(), kind
    assert count_params(ModelConfig(kind="bigram"), 65, 8) == 65 * 65


# -- registry --------------------------------------------------------------------------------


def test_registry_covers_every_kind() -> None:
    for kind in MODEL_KINDS:
        assert kind in MODELS, kind
        model = build_model(ModelConfig(kind=kind), VOCAB, BLOCK)  # type: ignore[arg-type]
        assert isinstance(model, MODELS[kind])
        assert isinstance(model, LanguageModel)
    assert set(MODELS) == set(MODEL_KINDS)


def test_build_model_without_kind_fails() -> None:
    with pytest.raises(ValueError, match="kind"):
        build_model(ModelConfig(), VOCAB, BLOCK)


def test_forward_loss_is_cross_entropy() -> None:
    model = make(ModelConfig(kind="transformer", n_embd=N_EMBD, n_head=4, n_layer=1))
    idx = torch.randint(0, VOCAB, (2, BLOCK))
    targets = torch.randint(0, VOCAB, (2, BLOCK))
    logits, loss = model(idx, targets)
    assert loss is not None and loss.ndim == 0
    expected = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
    assert torch.allclose(loss, expected)
    assert model(idx)[1] is None


# -- attention maps --------------------------------------------------------------------------

MAP_CONFIGS = {
    "softmax_avg": (ModelConfig(kind="softmax_avg", n_embd=N_EMBD), 1, 1),
    "single_head": (ModelConfig(kind="single_head", n_embd=N_EMBD), 1, 1),
    "multi_head": (ModelConfig(kind="multi_head", n_embd=N_EMBD, n_head=4), 1, 4),
    "transformer": (ModelConfig(kind="transformer", n_embd=N_EMBD, n_head=2, n_layer=3), 3, 2),
    "transformer_r4": (CAUSAL_CONFIGS["transformer_r4"], 1, 4),
}


@pytest.mark.parametrize("name", list(MAP_CONFIGS))
@pytest.mark.parametrize("T", [BLOCK, 5])
def test_attention_weights_shape_rows_and_mask(name: str, T: int) -> None:
    config, n_layer, n_head = MAP_CONFIGS[name]
    model = make(config)
    if isinstance(model, SoftmaxAverage):
        with torch.no_grad():
            model.affinity.normal_(generator=torch.Generator().manual_seed(0))
    idx = torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(6))
    weights = model.attention_weights(idx)
    assert weights is not None
    assert weights.shape == (n_layer, n_head, T, T)
    assert not weights.requires_grad
    assert_f32_close(weights.sum(-1), torch.ones(n_layer, n_head, T), ulps=128)
    upper = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    assert torch.equal(weights[..., upper], torch.zeros_like(weights[..., upper]))
    assert bool((weights[..., ~upper] > 0).all())
    assert torch.allclose(weights[..., 0, 0], torch.ones(n_layer, n_head))


def test_models_without_attention_return_no_map() -> None:
    idx = torch.randint(0, VOCAB, (1, BLOCK))
    for config in (
        ModelConfig(kind="bigram"),
        ModelConfig(kind="transformer", n_layer=0, layernorm=False),
    ):
        assert make(config).attention_weights(idx) is None


def test_multi_head_attention_weights_equal_reference_wei() -> None:
    model, ref = multi_head_with_reference(seed=13)
    idx = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(8))
    weights = model.attention_weights(idx)
    assert weights is not None
    with torch.no_grad():
        expected = ref.weights(model.embed(idx))  # (1, n_head, T, T)
    assert weights.shape == (1, model.attention.n_head, 6, 6)
    assert_f32_close(weights, expected, ulps=32)
    for h, head in enumerate(ref.heads):
        with torch.no_grad():
            assert_f32_close(weights[0, h], head.weights(model.embed(idx))[0], ulps=32)


def test_transformer_attention_weights_match_what_forward_uses() -> None:
    """Each layer's map, applied to that layer's values, gives the attention output the block
    computes (before its projection)."""
    model = make(ModelConfig(kind="transformer", n_embd=N_EMBD, n_head=4, n_layer=2))
    assert isinstance(model, Transformer)
    idx = torch.randint(0, VOCAB, (1, BLOCK), generator=torch.Generator().manual_seed(9))
    maps = model.attention_weights(idx)
    assert maps is not None
    with torch.no_grad():
        x = model.embed(idx)
        for layer, block in enumerate(model.blocks):
            assert block.ln1 is not None
            h = block.ln1(x)
            attention = block.attention
            qkv = attention.qkv(h).view(1, BLOCK, 3, attention.n_head, attention.head_size)
            v = qkv[:, :, 2].transpose(1, 2)  # (1, nh, T, hs)
            y = (maps[layer][None] @ v).transpose(1, 2).reshape(1, BLOCK, N_EMBD)
            assert attention.proj is not None
            assert_f32_close(attention.proj(y), attention(h), ulps=128)
            x = block(x)


# --- which keys each kind reads (what its runs log as params) -----------------------------------

OTHER_VALUES = {
    "n_embd": 16,
    "n_head": 2,
    "head_size": 16,
    "n_layer": 1,
    "ffwd": "linear",
    "residual": False,
    "layernorm": False,
    "proj": True,
    "dropout": 0.5,
    "init": "normal",
    "learnable": False,
}


def _outputs(config: ModelConfig) -> torch.Tensor:
    torch.manual_seed(0)
    model = build_model(config, 65, 8)
    torch.manual_seed(1)
    idx = torch.randint(0, 65, (2, 8))
    model.train()  # dropout active, if the model has any
    logits, loss = model(idx, idx)
    assert loss is not None
    loss.backward()
    grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
    return torch.cat([logits.flatten(), *grads])


def test_other_values_cover_every_model_key() -> None:
    assert set(OTHER_VALUES) == set(ModelConfig.model_fields) - {"kind"}


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_keys_a_kind_does_not_read_do_not_change_its_model(kind: str) -> None:
    from workbench.spec import MODEL_FIELDS

    base = ModelConfig(kind=kind)  # type: ignore[arg-type]
    reference = _outputs(base)
    for key, value in OTHER_VALUES.items():
        if key == "proj" and kind == "transformer":  # unset means on there
            value = False
        changed = _outputs(base.model_copy(update={key: value}))
        same = changed.shape == reference.shape and torch.equal(changed, reference)
        assert same == (key not in MODEL_FIELDS[kind]), (kind, key)
