"""The EMA of the trained weights: outside the module tree (so DDP never broadcasts it), updated
with the same arithmetic as a per-tensor reference, saved by parameter name, old format refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vistok.common.ema import EMA, load_averages, restore_ema, save_ema


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    model[2].bias.requires_grad_(False)  # frozen: not averaged
    return model


def test_update_equals_the_per_tensor_reference_and_keeps_no_buffer():
    model = _model()
    ema = EMA(model, decay=0.9)
    reference = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for step in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        decay = min(0.9, (1 + step) / (10 + step))
        for n, p in model.named_parameters():
            if n in reference:
                reference[n] = reference[n] + (p.detach() - reference[n]) * (1 - decay)
    for name, shadow in zip(ema.names, ema.shadows):
        torch.testing.assert_close(shadow, reference[name])
    assert "2.bias" not in ema.names and ema.num_updates == 5
    # Nothing of the EMA is part of a module: DDP's per-step buffer broadcast cannot carry it.
    holder = nn.Module()
    holder.net, holder.ema = model, ema
    assert not any("ema" in k for k in holder.state_dict())
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.swapped():
        torch.testing.assert_close(model[0].weight, reference["0.weight"])
    assert all(torch.equal(p, live[n]) for n, p in model.named_parameters())


def test_checkpoint_round_trip_by_name_and_loading_into_a_fresh_model():
    model = _model()
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update()
    checkpoint = {"state_dict": {f"net.{k}": v for k, v in model.state_dict().items()}}
    save_ema(ema, checkpoint)
    assert {"ema.0.weight", "ema.num_updates"} <= set(checkpoint["state_dict"])

    other = EMA(_model(), decay=0.5)
    restore_ema(other, checkpoint)  # takes the averages out of the state dict
    assert not any(k.startswith("ema.") for k in checkpoint["state_dict"])
    assert other.num_updates == 1
    for a, b in zip(other.shadows, ema.shadows):
        assert torch.equal(a, b)

    save_ema(ema, checkpoint)
    fresh = _model()
    assert load_averages(fresh, checkpoint["state_dict"], "ckpt")
    torch.testing.assert_close(fresh[0].weight, ema.shadows[ema.names.index("0.weight")])
    assert torch.equal(fresh[2].bias, _model()[2].bias)  # untracked: as loaded
    # A run without EMA drops the averages instead of failing its strict load.
    restore_ema(None, checkpoint)
    assert not any(k.startswith("ema.") for k in checkpoint["state_dict"])
    assert not load_averages(fresh, checkpoint["state_dict"], "ckpt")


def test_old_numbered_format_is_refused_with_what_to_do():
    state = {"net.0.weight": torch.zeros(8, 4), "ema.shadow_0": torch.zeros(8, 4)}
    with pytest.raises(ValueError, match="old numbered format.*raw weights"):
        load_averages(_model(), state, "old.ckpt")
    with pytest.raises(ValueError, match="old numbered format"):
        restore_ema(EMA(_model()), {"state_dict": dict(state)})


def test_misfit_averages_are_refused_naming_the_weight():
    state = {"ema.0.weight": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match=r"0\.weight has shape \(3, 3\)"):
        load_averages(_model(), state, "x.ckpt")
    with pytest.raises(ValueError, match="matches no parameter"):
        load_averages(_model(), {"ema.nope": torch.zeros(1)}, "x.ckpt")
