"""Exponential moving average of a module's trainable weights.

Written here rather than taken from Lightning's ``WeightAveraging`` callback because that averages
the whole LightningModule (discriminator included) while tokenizers want the EMA of the tokenizer
only, frozen parameters left out.

The averages are deliberately NOT buffers of the LightningModule: DDP broadcasts every buffer from
rank 0 before each forward, which for an EMA would be a model-sized broadcast per step (the
averages are identical on every rank anyway, being updated from all-reduced weights). They are
written into the checkpoint's ``state_dict`` as ``ema.<parameter name>`` (plus
``ema.num_updates``) by the training module's ``on_save_checkpoint`` and taken back out in
``on_load_checkpoint``, so checkpoints keep one flat state dict keyed by name. Updates are one
multi-tensor ``torch._foreach_lerp_`` with the step count kept on the host (no device sync).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

PREFIX = "ema."
COUNT = "num_updates"


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.model = model
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.shadows = [model.get_parameter(n).detach().clone() for n in self.names]
        self.num_updates = 0

    def _params(self) -> list[Tensor]:
        params = [self.model.get_parameter(n) for n in self.names]
        if self.shadows and self.shadows[0].device != params[0].device:
            # The module moved (to the GPU, or back): the averages follow it once.
            self.shadows = [s.to(p.device) for s, p in zip(self.shadows, params)]
        return params

    @torch.no_grad()
    def update(self) -> None:
        self.num_updates += 1
        decay = self.decay
        if self.warmup:  # short runs should not average in the random initialisation for long
            decay = min(decay, (1 + self.num_updates) / (10 + self.num_updates))
        params = [p.detach().to(s.dtype) for p, s in zip(self._params(), self.shadows)]
        if params:
            torch._foreach_lerp_(self.shadows, params, 1 - decay)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange live and averaged weights in place; calling it again swaps them back."""
        for shadow, param in zip(self.shadows, self._params()):
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

    # --- checkpoints -----------------------------------------------------------------------------
    def save_into(self, state_dict: dict[str, Tensor]) -> None:
        """Add ``ema.<name>`` and ``ema.num_updates`` to a checkpoint's state dict."""
        for name, shadow in zip(self.names, self.shadows):
            state_dict[PREFIX + name] = shadow.detach().clone()
        state_dict[PREFIX + COUNT] = torch.tensor(self.num_updates)

    def load_from(self, state_dict: dict[str, Tensor], source: str = "checkpoint") -> None:
        """Take the averages back out of a checkpoint's state dict (they are removed from it, so
        the module's own strict loading sees only its parameters and buffers)."""
        found = pop_averages(state_dict, source)
        if found is None:
            raise ValueError(f"{source} has no EMA weights, but this run keeps an EMA")
        missing = [n for n in self.names if n not in found]
        if missing:
            raise ValueError(f"{source}: no EMA weight for {missing[0]} ({len(missing)} missing)")
        self.shadows = [found[n].to(s.device, s.dtype) for n, s in zip(self.names, self.shadows)]
        self.num_updates = int(found[COUNT])


def pop_averages(state_dict: dict[str, Tensor], source: str) -> dict[str, Tensor] | None:
    """Remove and return the ``ema.*`` entries of a checkpoint's state dict, keyed by parameter
    name (``num_updates`` included); None when it has none. Checkpoints of vistok 0.1.0 stored
    them as ``ema.shadow_<i>`` buffers in an order that depended on the training stage: they are
    refused with what to do."""
    keys = [k for k in state_dict if k.startswith(PREFIX)]
    if not keys:
        return None
    found = {k[len(PREFIX) :]: state_dict.pop(k) for k in keys}
    if any(k.startswith("shadow_") for k in found):
        raise ValueError(
            f"{source} stores its EMA weights in the old numbered format (ema.shadow_<i>), which "
            "this vistok no longer reads: load its raw weights (ema=False / --no-ema), or resume "
            "it with vistok 0.1.0 and save it again"
        )
    return found


@torch.no_grad()
def load_averages(module: nn.Module, state_dict: dict[str, Tensor], source: str) -> bool:
    """Copy a checkpoint's EMA weights into ``module`` (whose parameters they average, by name);
    parameters the EMA did not track (frozen in that training stage) keep the loaded weights.
    Returns False when the checkpoint has no EMA weights."""
    found = pop_averages(dict(state_dict), source)
    if found is None:
        return False
    found.pop(COUNT, None)
    params = dict(module.named_parameters())
    unknown = sorted(set(found) - set(params))
    if unknown:
        raise ValueError(f"{source}: EMA weight {unknown[0]} matches no parameter of the model")
    for name, value in found.items():
        if params[name].shape != value.shape:
            raise ValueError(
                f"{source}: EMA weight {name} has shape {tuple(value.shape)}, the model's "
                f"{tuple(params[name].shape)}"
            )
        params[name].copy_(value)
    return True


def save_ema(ema: EMA | None, checkpoint: dict) -> None:
    """``on_save_checkpoint`` side of a training module that may keep an EMA."""
    if ema is not None:
        ema.save_into(checkpoint["state_dict"])


def restore_ema(ema: EMA | None, checkpoint: dict) -> None:
    """``on_load_checkpoint`` side (runs before the module's strict state-dict load): the
    averages go back into the EMA, or are dropped by a run that keeps none."""
    state = checkpoint.get("state_dict")
    if state is None:  # a hyper-parameter check only: no weights to restore
        return
    if ema is not None:
        ema.load_from(state)
    else:
        pop_averages(state, "checkpoint")
