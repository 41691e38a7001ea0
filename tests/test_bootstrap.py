"""The hierarchical bootstrap behind every interval of `nslora compare`, `sweep` and `demo`, on
constructed data: where seeds (or task instances) vary the interval must widen against the old
within-seed-only scheme; where items vary it follows the items, however many seeds repeat them;
a single level degenerates to the plain bootstrap, and no variance to a point."""

from __future__ import annotations

import random

import pytest

from nslora_plugin.apps.harness.bootstrap import hierarchical_bootstrap, levels_text, nest


def within_seed_only(a, b, n_boot=2000, seed=0):
    """The scheme `compare.paired_bootstrap` used before: held-out rows resampled independently
    within each seed, seeds never resampled. Returns (low, high)."""
    rng = random.Random(seed)
    pairs = [[(x[i], y[i]) for i in sorted(x)] for x, y in zip(a, b)]

    def diff(rows_per_seed):
        return sum(sum(p - q for p, q in rows) / len(rows) for rows in rows_per_seed) / len(rows_per_seed)

    draws = sorted(diff([[rows[rng.randrange(len(rows))] for _ in rows] for rows in pairs])
                   for _ in range(n_boot))
    return draws[int(0.025 * n_boot)], draws[min(int(0.975 * n_boot), n_boot - 1)]


def passes(n_items, n_pass, offset=0):
    """Items 0..n-1; `n_pass` of them pass, starting at `offset` (wrapping)."""
    return {i: int((i - offset) % n_items < n_pass) for i in range(n_items)}


def width(iv):
    return iv.high - iv.low


def test_seed_variance_widens_the_interval_against_the_within_seed_scheme():
    # arm a: 27, 15 and 3 of 30 right under three training seeds; arm b: 15 of 30 every time
    a_seeds = [passes(30, 27), passes(30, 15), passes(30, 3)]
    b_seeds = [passes(30, 15, offset=7)] * 3
    old_low, old_high = within_seed_only(a_seeds, b_seeds)
    new = hierarchical_bootstrap({0: dict(enumerate(a_seeds))}, {0: dict(enumerate(b_seeds))}, 2000)
    assert new.point == pytest.approx(0.0)
    assert new.low < 0 < new.high
    assert width(new) > 1.5 * (old_high - old_low)
    assert (new.task_seeds, new.seeds, new.items) == (1, (3, 3), (30, 30))
    assert new.levels == "1 task seed × 3 seeds × 30 items"


def test_task_instance_variance_widens_the_interval():
    # the same arm on three generated tasks: 0.9, 0.5 and 0.1 right; within a task no seed moves it
    tasks = {t: {s: passes(20, k) for s in range(3)} for t, k in enumerate((18, 10, 2))}
    across = hierarchical_bootstrap(tasks, None, 2000)
    # the same rows read as one task instance of 60 items (task instances never resampled)
    pooled = {0: {s: {(t, i): v for t in tasks for i, v in tasks[t][s].items()} for s in range(3)}}
    one_instance = hierarchical_bootstrap(pooled, None, 2000)
    assert across.point == pytest.approx(0.5) and one_instance.point == pytest.approx(0.5)
    assert width(across) > 1.5 * width(one_instance)
    assert across.levels == "3 task seeds × 3 seeds × 20 items"


def test_items_dominate_repeated_seeds_do_not_shrink_the_interval():
    # three seeds that score the same 24 items identically carry no more information than one:
    # the within-seed scheme counted them as 72 draws and narrowed the interval by about sqrt(3)
    a, b = passes(24, 14), passes(24, 8, offset=5)
    one = hierarchical_bootstrap(nest(a), nest(b), 4000, seed=1)
    three = hierarchical_bootstrap({0: {s: a for s in range(3)}}, {0: {s: b for s in range(3)}}, 4000, seed=1)
    assert three.point == pytest.approx(one.point)
    assert width(three) == pytest.approx(width(one), rel=0.2)
    old_low, old_high = within_seed_only([a] * 3, [b] * 3, 4000)
    assert old_high - old_low < 0.75 * width(three)
    # more items, the same rates: narrower
    a4 = {i: a[i % 24] for i in range(96)}
    b4 = {i: b[i % 24] for i in range(96)}
    assert width(hierarchical_bootstrap(nest(a4), nest(b4), 4000, seed=1)) < 0.7 * width(one)


def test_pairing_uses_the_same_items_for_both_arms():
    # a and b differ on no item: any interval that resampled their items apart would have width
    a = passes(16, 9)
    same = hierarchical_bootstrap(nest(a), nest(dict(a)), 500)
    assert (same.point, same.low, same.high) == (0.0, 0.0, 0.0)
    # a is b plus one item everywhere: the difference is 1/16 in every draw that keeps the item
    b = dict(a)
    b[0] = 0
    diff = hierarchical_bootstrap({0: {0: {i: 1 for i in range(16)}}}, {0: {0: {i: 1 for i in range(16)}}}, 100)
    assert width(diff) == 0.0
    shifted = hierarchical_bootstrap(nest(a), nest(b), 2000)
    assert shifted.low >= 0.0 and shifted.point == pytest.approx(1 / 16)


def test_a_single_level_degenerates_sensibly():
    # one task, one seed: the plain paired bootstrap over items
    a = {i: int(i < 6) for i in range(10)}
    b = {i: int(i < 3) for i in range(10)}
    iv = hierarchical_bootstrap(nest(a), nest(b), 1000)
    assert iv.point == pytest.approx(0.3) and iv.low < iv.point < iv.high and iv.low >= 0.0
    assert iv.levels == "1 task seed × 1 seed × 10 items"
    # one item per seed: only seeds (and tasks) vary
    seeds_only = hierarchical_bootstrap({0: {s: {0: v} for s, v in enumerate((1, 0, 1, 1))}}, None, 1000)
    assert seeds_only.point == pytest.approx(0.75) and seeds_only.low < 0.75 < seeds_only.high + 1e-9
    assert seeds_only.items == (1, 1) and seeds_only.levels.endswith("1 item")
    # one of everything: a point
    point = hierarchical_bootstrap(nest({0: 1}), None, 50)
    assert (point.point, point.low, point.high) == (1.0, 1.0, 1.0)
    # unpacks like the old (mean, low, high) tuple
    mean, low, high = iv
    assert (mean, low, high) == (iv.point, iv.low, iv.high)


def test_items_missing_in_a_seed_or_an_arm_are_left_out_and_levels_name_ranges():
    a = {0: {0: {"x": 1, "y": 0, "z": 1}, 1: {"x": 1, "y": 1}}, 1: {0: {"p": 1, "q": 0}}}
    b = {0: {0: {"x": 0, "y": 0, "z": 0}, 1: {"x": 0, "y": 0}}, 1: {0: {"p": 0, "q": 0}}}
    iv = hierarchical_bootstrap(a, b, 200)
    assert iv.items == (2, 2) and iv.seeds == (1, 2) and iv.task_seeds == 2
    assert iv.levels == "2 task seeds × 1–2 seeds × 2 items"
    assert iv.text(signed=True).endswith("(2 task seeds × 1–2 seeds × 2 items)")
    assert levels_text(3, (3, 3), (24, 24)) == "3 task seeds × 3 seeds × 24 items"
    with pytest.raises(ValueError, match="no held-out values"):
        hierarchical_bootstrap({}, None)


def test_the_bootstrap_is_seeded():
    tasks = {t: {s: passes(12, 3 + t + s) for s in range(2)} for t in range(2)}
    assert hierarchical_bootstrap(tasks, None, 300, seed=4) == hierarchical_bootstrap(tasks, None, 300, seed=4)
