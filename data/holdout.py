"""A seeded, class-stratified hold-out split of a list of named items.

Which items go to validation depends only on their names, the seed and the per-class counts, never
on the order they were listed in: inside each class the items are ranked by a SHA-256 hash of
``"{seed}/{name}"`` and the lowest-ranked ones are held out, so adding or removing a few files
moves only a few others between the sides.

Per-class counts (``n_c`` images in class ``c``, ``C`` classes of at least 2 images):

- ``fraction=F``: ``k_c = floor(F * n_c + 0.5)`` (halves round up);
- ``count=N``: the proportional shares ``N * n_c / n`` rounded by largest remainder (ties to the
  lower class index), so they sum to exactly ``N``;

then each class of ``n_c >= 2`` keeps at least one image on each side (``1 <= k_c <= n_c - 1``), a
class of a single image stays in training, and with ``count`` the clamped total is brought back to
``N`` by taking from the classes holding out the most (or giving to those with the most left).
Without classes (label ``-1`` for all) the whole list is one class.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence


def holdout_counts(
    sizes: Sequence[int], fraction: float | None = None, count: int | None = None
) -> list[int]:
    """How many of each class to hold out (see the module docstring for the rounding)."""
    if (fraction is None) == (count is None):
        raise ValueError("give exactly one of fraction and count")
    total = sum(sizes)
    lo = [1 if n >= 2 else 0 for n in sizes]
    hi = [n - 1 if n >= 2 else 0 for n in sizes]
    if fraction is not None:
        if not 0 < fraction < 1:
            raise ValueError(f"the validation fraction must be in (0, 1), got {fraction}")
        return [min(max(math.floor(fraction * n + 0.5), a), b) for n, a, b in zip(sizes, lo, hi)]
    if not sum(lo) <= count <= sum(hi):
        raise ValueError(
            f"--val-count {count} is out of range for {total} images in {len(sizes)} class(es): "
            f"every class of 2+ images gives at least 1 and keeps at least 1, so the count must be "
            f"between {sum(lo)} and {sum(hi)}"
        )
    shares = [count * n / total for n in sizes]
    k = [math.floor(s) for s in shares]
    by_remainder = sorted(range(len(sizes)), key=lambda c: (-(shares[c] - k[c]), c))
    for c in by_remainder[: count - sum(k)]:
        k[c] += 1
    k = [min(max(x, a), b) for x, a, b in zip(k, lo, hi)]
    while sum(k) > count:  # the minimums pushed it over: take from the largest hold-outs
        c = max((c for c in range(len(k)) if k[c] > lo[c]), key=lambda c: (k[c], -c))
        k[c] -= 1
    while sum(k) < count:  # the maximums pulled it under: give to the classes with most room
        c = max((c for c in range(len(k)) if k[c] < hi[c]), key=lambda c: (hi[c] - k[c], -c))
        k[c] += 1
    return k


def split_holdout(
    items: Sequence[tuple[str, int]],
    names: Sequence[str],
    fraction: float | None = None,
    count: int | None = None,
    seed: int = 0,
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """``(train, val)`` lists of the ``(path, label)`` items, each in the input order.

    ``names[i]`` names ``items[i]`` for the hash (the path relative to the source folder).
    """
    if len(set(names)) != len(names):
        raise ValueError("item names must be unique")
    groups: dict[int, list[int]] = {}
    for i, (_, label) in enumerate(items):
        groups.setdefault(label, []).append(i)
    labels = sorted(groups)
    k = holdout_counts([len(groups[c]) for c in labels], fraction, count)

    def rank(i: int) -> bytes:
        return hashlib.sha256(f"{seed}/{names[i]}".encode()).digest()

    held: set[int] = set()
    for label, n_val in zip(labels, k):
        held.update(sorted(groups[label], key=rank)[:n_val])
    train = [item for i, item in enumerate(items) if i not in held]
    val = [item for i, item in enumerate(items) if i in held]
    return train, val
