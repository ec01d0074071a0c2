import itertools
import math
import random

import pytest

from gsq.quant.allocate import LinearChoice, allocate_bits, convex_hull


def _choice(name, numel, errs, group=64):
    """Widths 2..4 with gsq's storage cost (code bits + a 16-bit scale per group)."""
    return LinearChoice(name, numel, {b: b + 16 / group for b in errs}, dict(errs))


def _random_choices(rng, n, equal_size=False):
    out = []
    for i in range(n):
        e2 = rng.uniform(1, 10)
        errs = {2: e2, 3: e2 * rng.uniform(0.1, 0.5)}
        errs[4] = errs[3] * rng.uniform(0.1, 0.5)
        numel = 4096 if equal_size else rng.choice([1024, 4096, 16384, 65536])
        out.append(_choice(f"l{i}", numel, errs))
    return out


@pytest.mark.parametrize("target", [2.25, 2.5, 2.8, 3.25, 3.6, 4.25])
def test_budget_is_met_and_no_upgrade_left_fits(target):
    choices = _random_choices(random.Random(0), 40)
    alloc = allocate_bits(choices, target)
    total = sum(c.numel for c in choices)
    spent = sum(c.cost(alloc.widths[c.name]) for c in choices)
    assert spent <= target * total + 1e-6
    assert math.isclose(alloc.achieved_bpw, spent / total)
    assert alloc.slack_bits >= -1e-6
    # "exactly": the unspent budget is less than any upgrade that was not taken
    for c in choices:
        w = alloc.widths[c.name]
        hull = convex_hull(c)
        if w != hull[-1]:
            assert c.cost(hull[hull.index(w) + 1]) - c.cost(w) > alloc.slack_bits
    assert alloc.slack_bits < alloc.min_upgrade_bits


def test_more_budget_never_more_error():
    choices = _random_choices(random.Random(1), 30)
    errs = [allocate_bits(choices, t).total_err for t in (2.25, 2.5, 2.75, 3.0, 3.25, 3.5, 4.25)]
    assert errs == sorted(errs, reverse=True)
    assert errs[0] > errs[-1]


def test_bounds_floor_and_ceiling():
    choices = _random_choices(random.Random(2), 10)
    low = allocate_bits(choices, 2.25)
    assert set(low.widths.values()) == {2}
    high = allocate_bits(choices, 9.0)
    assert set(high.widths.values()) == {4}
    assert high.min_upgrade_bits == math.inf
    with pytest.raises(ValueError, match="below the cheapest"):
        allocate_bits(choices, 2.2)


def test_greedy_is_optimal_for_equal_sizes_and_two_widths():
    """Equal sizes and one upgrade each: taking upgrades by error drop is the exact optimum."""
    rng = random.Random(3)
    for trial in range(5):
        choices = [_choice(c.name, c.numel, {2: c.err[2], 3: c.err[3]})
                   for c in _random_choices(rng, 8, equal_size=True)]
        target = rng.uniform(2.25, 3.25)
        alloc = allocate_bits(choices, target)
        budget = target * sum(c.numel for c in choices)
        best = min(sum(c.err[w] for c, w in zip(choices, ws, strict=True))
                   for ws in itertools.product((2, 3), repeat=len(choices))
                   if sum(c.cost(w) for c, w in zip(choices, ws, strict=True)) <= budget)
        assert math.isclose(alloc.total_err, best), trial


def test_sensitive_linears_get_the_bits():
    """Two linears of the same size, one 100x more sensitive: it is upgraded first."""
    a = _choice("robust", 4096, {2: 1.0, 3: 0.5})
    b = _choice("fragile", 4096, {2: 100.0, 3: 20.0})
    alloc = allocate_bits([a, b], 2.75)
    assert alloc.widths == {"robust": 2, "fragile": 3}
    assert alloc.achieved_bpw == pytest.approx(2.75)


def test_convex_hull_drops_dominated_and_concave_widths():
    dominated = _choice("d", 10, {2: 5.0, 3: 6.0, 4: 1.0})  # 3 costs more and errs more than 2
    assert convex_hull(dominated) == [2, 4]
    concave = _choice("c", 10, {2: 10.0, 3: 9.5, 4: 1.0})  # 3 above the chord 2 -> 4
    assert convex_hull(concave) == [2, 4]
    convex = _choice("v", 10, {2: 10.0, 3: 2.0, 4: 1.0})
    assert convex_hull(convex) == [2, 3, 4]


def test_bad_inputs_refused():
    with pytest.raises(ValueError, match="unique"):
        allocate_bits([_choice("x", 8, {2: 1.0}), _choice("x", 8, {2: 1.0})], 3)
    with pytest.raises(ValueError, match="differ"):
        LinearChoice("y", 8, {2: 2.25}, {3: 1.0})
