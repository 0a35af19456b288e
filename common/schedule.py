"""The learning-rate factor both training modules use: linear warmup, then constant or cosine."""

from __future__ import annotations

import math
from collections.abc import Callable


def warmup_cosine(
    warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float
) -> Callable[[int], float]:
    """A ``LambdaLR`` factor: ramps to 1 over ``warmup_steps``, then stays (``constant``) or
    follows a cosine to ``min_lr_ratio`` at ``total_steps`` (``cosine``)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant" or total_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
