"""Training speed options: per-accelerator defaults, each switch leaves the maths unchanged
(activation checkpointing, channels-last, fused AdamW give the same gradients / updates), the
precision fallback, and the speed/FSDP presets resolve to real objects."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from helpers import ROOT

from vistok.common.cli import _with_bases, native_precision
from vistok.common.speed import (
    compile_modules,
    fused_available,
    resolve,
    to_channels_last,
)
from vistok.generators.ar import GPT
from vistok.generators.layers import Block
from vistok.generators.training import GPTFSDPStrategy
from vistok.tokenizers.vq import VQTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_defaults_follow_the_accelerator_and_explicit_switches_win():
    assert resolve(None, "cpu") == {
        "compile": False,
        "fused_optimizer": False,
        "channels_last": False,
        "activation_checkpointing": False,
    }
    cuda = resolve({}, "cuda")
    assert cuda["compile"] and cuda["fused_optimizer"] and cuda["channels_last"]
    assert not cuda["activation_checkpointing"]
    mixed = resolve({"compile": None, "channels_last": True, "fused_optimizer": False}, "cpu")
    assert mixed["channels_last"] and not mixed["compile"] and not mixed["fused_optimizer"]
    assert not resolve({"compile": False}, "cuda")["compile"]
    with pytest.raises(ValueError, match="unknown speed options"):
        resolve({"complie": True}, "cpu")


def gpt() -> GPT:
    torch.manual_seed(0)
    space = {"kind": "index", "vocab_size": 16, "channels": 4}
    model = GPT(space, [4, 4], 3, preset="tiny", dropout=0.0, token_dropout=0.0, label_dropout=0.0)
    torch.nn.init.normal_(model.head.out.weight, std=0.1)
    return model.double().train()


def grads_and_saved(model: GPT, codes, labels) -> tuple[list[torch.Tensor], int]:
    saved = 0

    def pack(t):
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = model.loss(codes, labels)
    loss.backward()
    return [p.grad.clone() for p in model.parameters()], saved


def test_activation_checkpointing_gives_the_same_gradients_and_keeps_less():
    model = gpt()
    codes = torch.randint(16, (3, 4, 4), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2])
    plain, kept_plain = grads_and_saved(model, codes, labels)
    model.activation_checkpointing = True
    ckpt, kept_ckpt = grads_and_saved(model, codes, labels)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert kept_ckpt < 0.7 * kept_plain
    # Sampling (eval, KV cache) never goes through the checkpointed path.
    model.eval()
    with torch.no_grad():
        x = model.input_sequence(model.to_sequence(codes)[:, :3], labels)
        assert model.hidden(x).isfinite().all()


def test_channels_last_tokenizer_computes_the_same_reconstruction():
    torch.manual_seed(0)
    tok = VQTokenizer(
        resolution=16, channels=8, num_res_blocks=1, channel_mult=[1, 2], codebook_size=32
    ).eval()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        ref, _ = tok(images)
        fast = copy.deepcopy(tok)
        to_channels_last(fast)
        out, _ = fast(images.contiguous(memory_format=torch.channels_last))
    assert fast.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.contiguous(), ref, rtol=1e-4, atol=1e-4)


def test_fused_adamw_takes_the_same_step_where_available():
    model = gpt().float()
    params = list(model.parameters())
    if not fused_available(params):
        pytest.skip("this PyTorch has no fused AdamW for CPU tensors")
    twin = copy.deepcopy(model)
    for m, fused in ((model, False), (twin, True)):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, fused=fused)
        for _ in range(3):
            opt.zero_grad()
            m.loss(torch.zeros(2, 4, 4, dtype=torch.long), torch.tensor([0, 1]))[0].backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiling_in_place_keeps_the_checkpoint_keys():
    model = gpt()
    keys = list(model.state_dict())
    compile_modules(model, None)
    assert list(model.state_dict()) == keys  # nn.Module.compile wraps the call, not the module


def test_bf16_falls_back_where_it_is_not_native():
    cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if not torch.cuda.is_available():
        cpu_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
        expected = "bf16-mixed" if cpu_bf16 else "32-true"
        assert native_precision("bf16-mixed", "auto") == expected
        assert native_precision("bf16-mixed", "cpu") == "bf16-mixed"  # asked for explicitly
    elif cuda_bf16:
        assert native_precision("bf16-mixed", "auto") == "bf16-mixed"
    else:
        assert native_precision("bf16-mixed", "gpu") == "16-mixed"
        assert native_precision("bf16-mixed", "gpu", automatic_optimization=False) == "32-true"
    assert native_precision("32-true", "auto") == "32-true"
    assert native_precision("16-mixed", "gpu") == "16-mixed"


def test_speed_and_fsdp_presets_resolve_to_real_options():
    paths = _with_bases(ROOT / "configs/presets/fsdp.yaml")
    layers = [yaml.safe_load(p.read_text()) for p in paths]
    speed = {}
    for layer in layers:
        speed.update(layer["model"]["init_args"].get("speed", {}))
    resolved = resolve(speed, "cuda")
    assert resolved["activation_checkpointing"] and resolved["compile"]
    strategy = layers[-1]["trainer"]["strategy"]
    assert strategy["class_path"] == "vistok.generators.training.GPTFSDPStrategy"
    fsdp = GPTFSDPStrategy(**strategy["init_args"])
    assert fsdp.kwargs["use_orig_params"]
    assert Block in fsdp.kwargs["auto_wrap_policy"]._module_classes  # one shard unit per block
