"""One hierarchical bootstrap for every interval `nslora compare`, `nslora sweep` and `nslora demo`
print: task instances, training seeds and held-out items are resampled together.

Data are nested as `{task_seed: {seed: {item_id: value}}}` (a value is 1/0 for a held-out row
that passed/failed, or any number). An interval for one arm resamples its values; an interval for
a *difference* of two arms resamples the pairs `a - b`, so both arms always get the same resampled
task instances, seeds and items (paired).

One draw:
1. task instances with replacement (each generated task is one unit);
2. within each drawn instance, its training seeds with replacement, and its held-out items with
   replacement — one item draw per instance, shared by every drawn seed: the items of an instance
   are the same rows under every training seed (crossed, not nested), so 24 items scored under 3
   seeds are 24 items, never 72 independent draws;
3. the statistic: the mean over drawn instances of the mean over drawn seeds and items.

The point estimate is the same statistic on the data as they are. The interval is the percentile
interval of the draws. With one instance, one seed or one item the level contributes no
variance (a single level degenerates to the plain bootstrap of the others; one instance, one seed
and one item give a zero-width interval at the point). Every interval carries the n of each
level (`Interval.levels`), printed next to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping

__all__ = ["Interval", "hierarchical_bootstrap", "nest", "levels_text"]

Data = Mapping[Any, Mapping[Any, Mapping[Any, float]]]


@dataclass(frozen=True)
class Interval:
    """A point estimate, its percentile interval and the n of each resampled level."""

    point: float
    low: float
    high: float
    task_seeds: int
    seeds: tuple[int, int]   # fewest and most training seeds of an instance
    items: tuple[int, int]   # fewest and most held-out items of an instance
    resamples: int
    confidence: float = 0.95

    def __iter__(self) -> Iterator[float]:  # `point, low, high = interval`
        return iter((self.point, self.low, self.high))

    @property
    def levels(self) -> str:
        """"3 task seeds × 3 seeds × 24 items" (a range where instances differ)."""
        return levels_text(self.task_seeds, self.seeds, self.items)

    def contains(self, value: float) -> bool:
        return self.low - 1e-12 <= value <= self.high + 1e-12

    def text(self, scale: float = 1.0, digits: int = 3, signed: bool = False) -> str:
        """"[-0.120, +0.050] (3 task seeds × 3 seeds × 24 items)"."""
        fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
        return (f"[{fmt.format(scale * self.low)}, {fmt.format(scale * self.high)}] "
                f"({self.levels})")

    def to_dict(self, scale: float = 1.0, digits: int = 4) -> dict[str, Any]:
        return {"point": round(scale * self.point, digits), "low": round(scale * self.low, digits),
                "high": round(scale * self.high, digits), "confidence": self.confidence,
                "levels": {"task_seeds": self.task_seeds, "seeds": _one(self.seeds),
                           "items": _one(self.items)},
                "levels_text": self.levels, "resamples": self.resamples,
                "method": "hierarchical bootstrap: task instances, then training seeds and "
                          "held-out items (crossed) within each; paired across arms"}


def _one(span: tuple[int, int]) -> int | list[int]:
    return span[0] if span[0] == span[1] else [span[0], span[1]]


def _span(values: list[int]) -> tuple[int, int]:
    return (min(values), max(values)) if values else (0, 0)


def levels_text(task_seeds: int, seeds: tuple[int, int] | int, items: tuple[int, int] | int) -> str:
    def part(span: tuple[int, int] | int, word: str) -> str:
        lo, hi = (span, span) if isinstance(span, int) else span
        n = f"{lo}" if lo == hi else f"{lo}–{hi}"
        return f"{n} {word if hi != 1 else word.rstrip('s')}"

    return " × ".join((part(task_seeds, "task seeds"), part(seeds, "seeds"), part(items, "items")))


def nest(rows: Mapping[Any, float], task_seed: Any = 0, seed: Any = 0) -> dict[Any, dict[Any, dict[Any, float]]]:
    """One run's `{item: value}` as the nested data of a single instance and seed."""
    return {task_seed: {seed: dict(rows)}}


def _matrices(a: Data, b: Data | None) -> list[Any]:
    """Per task instance: a seeds × items matrix of values (a - b when paired), over the items
    every seed of both arms scored."""
    import numpy as np

    out = []
    for task_seed in a:
        seeds_a = a[task_seed]
        seeds_b = b[task_seed] if b is not None else None
        seeds = [s for s in seeds_a if seeds_b is None or s in seeds_b]
        if not seeds:
            continue
        items = set(seeds_a[seeds[0]])
        for s in seeds:
            items &= set(seeds_a[s])
            if seeds_b is not None:
                items &= set(seeds_b[s])
        items_sorted = sorted(items, key=str)
        if not items_sorted:
            continue
        rows = []
        for s in seeds:
            row = [float(seeds_a[s][i]) - (float(seeds_b[s][i]) if seeds_b is not None else 0.0)
                   for i in items_sorted]
            rows.append(row)
        out.append(np.asarray(rows, dtype=float))
    return out


def hierarchical_bootstrap(a: Data, b: Data | None = None, n_boot: int = 2000, seed: int = 0,
                           confidence: float = 0.95) -> Interval:
    """Mean of `a` (or of `a - b`, paired) and its percentile interval; see the module docstring.
    Task instances missing from `b`, seeds missing in either arm and items not scored in every
    seed of both arms are left out."""
    import numpy as np

    mats = _matrices(a, b)
    if not mats:
        raise ValueError("no held-out values to bootstrap (no task instance has a seed and an "
                         "item scored in every arm)")
    point = float(np.mean([m.mean() for m in mats]))
    n_tasks = len(mats)
    rng = np.random.default_rng(seed)
    n_boot = max(int(n_boot), 1)
    # inner[j][t]: n_boot draws of task t's statistic for position j of the task draw (a task
    # drawn twice in one resample gets two independent inner draws)
    inner = np.empty((n_tasks, n_tasks, n_boot))
    for t, m in enumerate(mats):
        n_seeds, n_items = m.shape
        for j in range(n_tasks):
            ws = rng.multinomial(n_seeds, [1.0 / n_seeds] * n_seeds, size=n_boot)  # seed counts
            wi = rng.multinomial(n_items, [1.0 / n_items] * n_items, size=n_boot)  # item counts
            inner[j, t] = np.einsum("bs,si,bi->b", ws, m, wi) / (n_seeds * n_items)
    picks = rng.integers(n_tasks, size=(n_boot, n_tasks))
    draws = inner[np.arange(n_tasks)[None, :], picks, np.arange(n_boot)[:, None]].mean(axis=1)
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(draws, [alpha, 1.0 - alpha])
    low, high = float(low), float(high)
    if abs(low - point) < 1e-9:  # no variance: float noise of the weighted means is not a width
        low = min(low, point)
    if abs(high - point) < 1e-9:
        high = max(high, point)
    return Interval(point=point, low=low, high=high, task_seeds=n_tasks,
                    seeds=_span([m.shape[0] for m in mats]), items=_span([m.shape[1] for m in mats]),
                    resamples=n_boot, confidence=confidence)
