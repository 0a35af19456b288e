"""Small nn helpers shared by tokenizers, generators and losses."""

from __future__ import annotations


def num_groups(channels: int) -> int:
    """GroupNorm groups: 32 at the usual widths (>= 128), fewer for tiny widths.

    The largest divisor of ``channels`` not above ``min(32, channels // 4)``, so each group keeps
    at least 4 channels (statistics over 1-2 channels make GroupNorm an unstable instance norm).
    """
    limit = max(1, min(32, channels // 4))
    return max(g for g in range(1, limit + 1) if channels % g == 0)
