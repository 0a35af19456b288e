"""Training speed options shared by the tokenizer and generator modules.

Each option is a config switch (``speed: {...}`` in the module's ``init_args``) whose default
(``None``) is chosen per accelerator, because what pays on a GPU can cost on a CPU:

- ``compile``: ``torch.compile`` the networks in place (``nn.Module.compile``, so state-dict keys
  and checkpoints do not change). Default: on for CUDA, off elsewhere (on a CPU the compile time
  is not won back in short runs).
- ``fused_optimizer``: the fused (single-kernel) Adam/AdamW step. Default: on for CUDA.
- ``channels_last``: NHWC memory layout for the CNN tokenizers (tensor cores prefer it).
  Default: on for CUDA.
- ``activation_checkpointing``: recompute each transformer block in the backward pass instead
  of storing its activations (less memory, ~30% more compute). Default: off; the large presets
  turn it on (``presets/gpu_fast.yaml`` documents how).

Mixed precision (bf16 autocast) is the Trainer's ``precision`` (``bf16-mixed`` by default, see
``configs/defaults.yaml``; ``common/cli.py`` falls back where bf16 is not native).
"""

from __future__ import annotations

from typing import TypedDict

import torch
from torch import nn


class SpeedOptions(TypedDict, total=False):
    """Speed switches; a missing key (or None) means the accelerator's default."""

    compile: bool | None
    fused_optimizer: bool | None
    channels_last: bool | None
    activation_checkpointing: bool | None


def resolve(options: SpeedOptions | dict | None, device: torch.device | str) -> dict[str, bool]:
    """Every switch decided for ``device``: unset ones take the accelerator's default."""
    options = dict(options or {})
    known = set(SpeedOptions.__annotations__)
    if set(options) - known:
        raise ValueError(
            f"unknown speed options {sorted(set(options) - known)}; known: {sorted(known)}"
        )
    cuda = torch.device(device).type == "cuda"
    defaults = {
        "compile": cuda,
        "fused_optimizer": cuda,
        "channels_last": cuda,
        "activation_checkpointing": False,
    }
    return {k: bool(v if options.get(k) is None else options[k]) for k, v in defaults.items()}


def fused_available(params: list[torch.Tensor]) -> bool:
    """The fused Adam/AdamW kernels exist for CUDA (and, in recent PyTorch, CPU) tensors."""
    if not params:
        return False
    device = params[0].device.type
    return device == "cuda" or (device == "cpu" and _cpu_fused_supported())


def _cpu_fused_supported() -> bool:
    try:
        p = torch.zeros(1, requires_grad=True)
        torch.optim.AdamW([p], fused=True)
        return True
    except (RuntimeError, ValueError):
        return False


def compile_modules(*modules: nn.Module | None) -> None:
    """Compile each module in place (keys, hooks and ``.to()`` keep working)."""
    for module in modules:
        if module is not None:
            module.compile()


def to_channels_last(*modules: nn.Module | None) -> None:
    for module in modules:
        if module is not None:
            module.to(memory_format=torch.channels_last)
