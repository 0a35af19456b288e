"""Generators: export -> load -> the same seeded samples, for every GPT preset and head kind."""

import pytest
import torch

from vistok.common.hub import load_pretrained, save_pretrained
from vistok.generators.ar import GPT, GPT_PRESETS
from vistok.generators.sampling import SamplingConfig, generate

SPACES = {
    "index": {"kind": "index", "channels": 8, "vocab_size": 64, "groups": 1, "bits": 0},
    "groups": {"kind": "groups", "channels": 8, "vocab_size": 16, "groups": 2, "bits": 8},
    "bits": {"kind": "bits", "channels": 6, "vocab_size": 2, "groups": 1, "bits": 6},
}
# Every preset's width and heads at depth 1 (the full depths of XL/XXL do not fit a CI machine);
# every head kind at the tiny preset.
CASES = [(p, "index") for p in GPT_PRESETS] + [("tiny", k) for k in ("groups", "bits")]


@pytest.mark.parametrize("preset, kind", CASES)
def test_exported_generator_samples_bit_identically(preset, kind, tmp_path):
    torch.manual_seed(0)
    depth = 1 if preset != "tiny" else None
    gpt = GPT(SPACES[kind], [3, 3], num_classes=4, preset=preset, depth=depth, head_layers=1)
    gpt.eval().requires_grad_(False)
    save_pretrained(gpt, tmp_path, "generator", {"tokenizer_identity": {}})
    loaded, config = load_pretrained(tmp_path, kind="generator")
    assert config["model"] == gpt.config
    labels = torch.tensor([0, 3])
    sampling = SamplingConfig(cfg_scale=2.0, temperature=1.0, top_k=10)
    a = generate(gpt, labels, sampling, torch.Generator().manual_seed(5))
    b = generate(loaded, labels, sampling, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
