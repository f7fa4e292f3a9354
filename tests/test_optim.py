"""FlatAdamW against torch.optim.AdamW: the same update, the same clipping, state that resumes."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from floats import assert_f32_close
from torch import nn

from workbench.train.optim import FlatAdamW


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(11, 6), nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 11))


def loss_of(net: nn.Module, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(step)
    idx = torch.randint(0, 11, (16,), generator=generator).to(next(net.parameters()).device)
    return nn.functional.cross_entropy(net(idx), torch.roll(idx, 1))


@pytest.mark.parametrize("fused", [pytest.param(True, marks=pytest.mark.private_api), False])
@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_flat_adamw_matches_torch_adamw(fused: bool, clip: float):
    ours, theirs = small_net(), small_net()
    flat = FlatAdamW(list(ours.parameters()), lr=3e-2, weight_decay=0.1, fused=fused)
    assert flat.fused is fused  # the path asked for, not a quiet fallback
    reference = torch.optim.AdamW(theirs.parameters(), lr=3e-2, weight_decay=0.1)
    for step in range(25):
        lr = 3e-2 * (1 - step / 50)  # a schedule, as the trainer sets one
        flat.lr = lr
        for group in reference.param_groups:
            group["lr"] = lr
        flat.zero_grad()
        loss_of(ours, step).backward()
        reference.zero_grad()
        loss_of(theirs, step).backward()
        if clip:
            ours_norm = flat.clip_grad_norm_(clip)
            theirs_norm = nn.utils.clip_grad_norm_(theirs.parameters(), clip)
            torch.testing.assert_close(ours_norm, theirs_norm)
        flat.step()
        reference.step()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert_f32_close(a, b, ulps=128, msg=name)
    assert not torch.equal(ours[1].weight, small_net()[1].weight)  # it did train


def test_parameters_and_gradients_are_views_of_the_flat_buffers():
    net = small_net()
    flat = FlatAdamW(list(net.parameters()), lr=1e-2)
    flat.zero_grad()
    loss_of(net, 0).backward()
    assert flat.grad.abs().sum() > 0
    storage = flat.grad.untyped_storage().data_ptr()
    for p in net.parameters():
        assert p.grad is not None and p.grad.untyped_storage().data_ptr() == storage
        assert p.untyped_storage().data_ptr() == flat.flat.untyped_storage().data_ptr()
    before = net[1].weight.detach().clone()
    flat.step()
    assert not torch.equal(net[1].weight, before)  # the step reached the module's own tensor
    flat.zero_grad()
    assert all(p.grad is not None and not p.grad.any() for p in net.parameters())


def test_state_dict_resumes_exactly():
    net = small_net()
    opt = FlatAdamW(list(net.parameters()), lr=1e-2)
    for step in range(5):
        opt.zero_grad()
        loss_of(net, step).backward()
        opt.step()
    saved_net, saved_opt = copy.deepcopy(net.state_dict()), opt.state_dict()

    fresh = small_net()
    fresh.load_state_dict(saved_net)
    resumed = FlatAdamW(list(fresh.parameters()), lr=1e-2)
    resumed.load_state_dict(saved_opt)
    for step in range(5, 10):
        for o, n in ((opt, net), (resumed, fresh)):
            o.zero_grad()
            loss_of(n, step).backward()
            o.step()
    for a, b in zip(net.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)  # a resume repeats the same arithmetic: bit for bit


def test_state_of_another_shape_is_refused():
    opt = FlatAdamW(list(small_net().parameters()), lr=1e-2)
    other = FlatAdamW([nn.Parameter(torch.zeros(3))], lr=1e-2)
    with pytest.raises(ValueError, match="does not fit"):
        opt.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="does not fit"):
        opt.load_state_dict(torch.optim.AdamW(small_net().parameters()).state_dict())


def test_mixed_dtypes_are_refused():
    with pytest.raises(ValueError, match="one device with one dtype"):
        FlatAdamW(
            [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, dtype=torch.float64))], lr=1
        )


def test_torch_adamw_state_from_older_checkpoints_resumes():
    """Checkpoints written before FlatAdamW hold torch.optim.AdamW's state; they still resume."""
    net = small_net()
    reference = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(5):
        reference.zero_grad()
        loss_of(net, step).backward()
        reference.step()
    fresh = small_net()
    fresh.load_state_dict(net.state_dict())
    flat = FlatAdamW(list(fresh.parameters()), lr=1e-3, weight_decay=0.1)
    flat.load_state_dict(reference.state_dict())
    assert flat.lr == 1e-2 and flat.step_number == 5
    for step in range(5, 10):
        reference.zero_grad()
        loss_of(net, step).backward()
        reference.step()
        flat.zero_grad()
        loss_of(fresh, step).backward()
        flat.step()
    for a, b in zip(fresh.parameters(), net.parameters(), strict=True):
        assert_f32_close(a, b, ulps=128)


def test_step_refuses_parameters_cut_loose_from_the_buffers():
    net = small_net()
    flat = FlatAdamW(list(net.parameters()), lr=1e-2)
    net.zero_grad()  # sets every .grad to None: the next backward would not reach flat.grad
    loss_of(net, 0).backward()
    with pytest.raises(RuntimeError, match="no longer live in FlatAdamW's buffers"):
        flat.step()

    moved = small_net()
    flat = FlatAdamW(list(moved.parameters()), lr=1e-2)
    moved.double()
    with pytest.raises(RuntimeError, match="no longer live"):
        flat.step()


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, CUDA])])
@pytest.mark.parametrize("fused", [pytest.param(True, marks=pytest.mark.private_api), False])
def test_two_groups_with_their_own_rates_step_like_two_torch_adamws(fused: bool, device: str):
    """One buffer, a rate per group (what a packed run gives each member): each group steps
    exactly as a torch.optim.AdamW of its own with that rate."""
    ours = [small_net().to(device), small_net().to(device)]
    theirs = [small_net().to(device), small_net().to(device)]
    flat = FlatAdamW(
        [list(net.parameters()) for net in ours],
        lr=torch.tensor([3e-2, 5e-3]),
        weight_decay=0.1,
        fused=fused,
    )
    references = [torch.optim.AdamW(net.parameters(), weight_decay=0.1) for net in theirs]
    for step in range(25):
        rates = [3e-2 * (1 - step / 50), 5e-3 * (1 + step / 50)]  # a schedule per member
        flat.lr = torch.tensor(rates)
        flat.zero_grad()
        sum(loss_of(net, step + 100 * i) for i, net in enumerate(ours)).backward()  # type: ignore[union-attr]
        flat.step()
        for i, (net, reference, rate) in enumerate(zip(theirs, references, rates, strict=True)):
            reference.param_groups[0]["lr"] = rate
            reference.zero_grad()
            loss_of(net, step + 100 * i).backward()
            reference.step()
    for mine, reference_net in zip(ours, theirs, strict=True):
        for (name, a), b in zip(mine.named_parameters(), reference_net.parameters(), strict=True):
            assert_f32_close(a, b, ulps=128, msg=name)
    # the rates told apart: the slower group moved less
    moved = [(net[1].weight.cpu() - small_net()[1].weight).abs().sum() for net in ours]
    assert moved[0] > 2 * moved[1]


@pytest.mark.private_api
def test_one_rate_or_a_rate_per_group_is_still_one_fused_call(monkeypatch: pytest.MonkeyPatch):
    calls = []
    kernel = torch._fused_adamw_

    def counted(*args: Any, **kwargs: Any) -> None:
        calls.append(kwargs["lr"])
        kernel(*args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adamw_", counted)
    nets = [small_net(), small_net(), small_net()]
    for lr in (1e-2, torch.tensor(1e-2), torch.tensor([1e-2, 2e-2, 3e-2])):
        calls.clear()
        flat = FlatAdamW([list(net.parameters()) for net in nets], lr=lr, fused=True)
        flat.zero_grad()
        sum(loss_of(net, 0) for net in nets).backward()  # type: ignore[union-attr]
        flat.step()
        assert len(calls) == 1


@pytest.mark.parametrize("fused", [pytest.param(True, marks=pytest.mark.private_api), False])
def test_a_tensor_rate_steps_like_the_same_float(fused: bool):
    nets = [small_net(), small_net()]
    float_rate = FlatAdamW(list(nets[0].parameters()), lr=3e-2, weight_decay=0.1, fused=fused)
    tensor_rate = FlatAdamW(
        list(nets[1].parameters()), lr=torch.tensor(3e-2), weight_decay=0.1, fused=fused
    )
    for step in range(10):
        for optimizer, net in ((float_rate, nets[0]), (tensor_rate, nets[1])):
            optimizer.zero_grad()
            loss_of(net, step).backward()
            optimizer.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        assert_f32_close(a, b, ulps=16)
    assert not torch.equal(nets[1][1].weight, small_net()[1].weight)


def test_rates_per_group_resume_and_a_misfit_rate_is_refused():
    nets = [small_net(), small_net()]
    opt = FlatAdamW([list(net.parameters()) for net in nets], lr=torch.tensor([1e-2, 2e-2]))
    saved = opt.state_dict()
    fresh = FlatAdamW([list(small_net().parameters()), list(small_net().parameters())], lr=0.5)
    fresh.load_state_dict(saved)
    assert isinstance(fresh.lr, torch.Tensor) and fresh.lr.tolist() == pytest.approx([1e-2, 2e-2])
    with pytest.raises(ValueError, match="one rate per group"):
        opt.lr = torch.tensor([1e-2, 2e-2, 3e-2])
    with pytest.raises(ValueError, match="at least one parameter in each group"):
        FlatAdamW([list(nets[0].parameters()), []], lr=1e-2)
