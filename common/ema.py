"""Exponential moving average of a module's trainable weights.

Written here rather than taken from Lightning's ``WeightAveraging`` callback because that averages
the whole LightningModule (discriminator included) while tokenizers want the EMA of the tokenizer
only, frozen parameters left out, kept in the checkpoint as ordinary buffers.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class EMA(nn.Module):
    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        super().__init__()
        self.decay, self.warmup = decay, warmup
        self._model = [model]  # a list keeps the tracked model out of this module's tree
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        for i, name in enumerate(self.names):
            self.register_buffer(f"shadow_{i}", model.get_parameter(name).detach().clone())
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def _pairs(self):
        model = self._model[0]
        for i, name in enumerate(self.names):
            yield getattr(self, f"shadow_{i}"), model.get_parameter(name)

    @torch.no_grad()
    def update(self) -> None:
        self.num_updates += 1
        decay = self.decay
        if self.warmup:  # short runs should not average in the random initialisation for long
            decay = min(decay, (1 + self.num_updates.item()) / (10 + self.num_updates.item()))
        for shadow, param in self._pairs():
            shadow.lerp_(param.detach().to(shadow.dtype), 1 - decay)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange live and averaged weights in place; calling it again swaps them back."""
        for shadow, param in self._pairs():
            live = param.detach().clone()
            param.copy_(shadow)
            shadow.copy_(live)

    @contextmanager
    def swapped(self):
        """Run the tracked model with the averaged weights inside the block."""
        self.swap()
        try:
            yield
        finally:
            self.swap()
