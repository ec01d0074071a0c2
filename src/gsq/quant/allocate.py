"""Bit allocation by sensitivity (`--bpw X`): which bit width each linear gets so that the
average bits per parameter of the quantized linears is as close to X as tensor granularity
allows, never above it, with the least total sensitivity.

Pure arithmetic on measured numbers; the measurement is `gsq.calib.sensitivity`.

A linear `i` has `numel_i` weights and, per candidate width `b`, a storage cost `bpp_i(b)` (code
bits plus scale bits per weight, `QuantSpec.bpp`) and a measured sensitivity `err_i(b)` (how much
quantizing it alone at width `b` perturbs the model). The problem is a multiple-choice knapsack:

    minimise  sum_i err_i(b_i)   subject to   sum_i numel_i * bpp_i(b_i) <= X * sum_i numel_i

Solved greedily on each linear's lower convex hull of (bits, err) points (the classic
marginal-gain rule of bit allocation): every linear starts at its cheapest width; of the next
steps up, the one with the largest error drop per extra bit is taken if it fits the budget, and a
linear whose next step does not fit stays where it is (spending only grows). At the end no upgrade
left fits, so the unspent budget is smaller than the cheapest upgrade not taken: that is what
"exactly" means here (`Allocation.slack_bits < Allocation.min_upgrade_bits`).
"""

from __future__ import annotations

import dataclasses
import heapq
import math


@dataclasses.dataclass(frozen=True)
class LinearChoice:
    """One linear's options: width -> (storage bits per weight, measured sensitivity)."""
    name: str
    numel: int
    bpp: dict[int, float]
    err: dict[int, float]

    def __post_init__(self):
        if set(self.bpp) != set(self.err) or not self.bpp:
            raise ValueError(f"{self.name}: widths of bpp and err differ or are empty")
        if self.numel < 1:
            raise ValueError(f"{self.name}: numel must be >= 1")

    def cost(self, width: int) -> float:
        """Storage bits of the whole tensor at `width`."""
        return self.numel * self.bpp[width]


@dataclasses.dataclass(frozen=True)
class Allocation:
    widths: dict[str, int]       # linear name -> width
    target_bpw: float
    achieved_bpw: float
    total_err: float
    slack_bits: float            # target bits - spent bits (>= 0)
    min_upgrade_bits: float      # cheapest upgrade not taken (inf when all at their top width)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def convex_hull(choice: LinearChoice) -> list[int]:
    """Widths on the lower convex hull of (cost, err), cheapest first: widths that cost more and
    err no less than a cheaper one, or that lie above the chord of their neighbours, are never
    worth taking under the marginal-gain rule."""
    pts = sorted(choice.bpp, key=lambda w: (choice.bpp[w], choice.err[w]))
    hull: list[int] = []
    for w in pts:
        if hull and choice.err[w] >= choice.err[hull[-1]]:
            continue  # costs more, no better
        while len(hull) >= 2 and _slope(choice, hull[-2], hull[-1]) <= _slope(choice, hull[-2], w):
            hull.pop()  # hull[-1] above the chord hull[-2] -> w
        hull.append(w)
    return hull


def _slope(choice: LinearChoice, a: int, b: int) -> float:
    """Error drop per extra bit per weight from width a to width b (b costs more)."""
    return (choice.err[a] - choice.err[b]) / (choice.bpp[b] - choice.bpp[a])


def allocate_bits(choices: list[LinearChoice], target_bpw: float) -> Allocation:
    """Widths minimising the summed sensitivity with sum(numel * bpp) <= target_bpw * sum(numel).

    ValueError when even the cheapest widths exceed the target."""
    if len({c.name for c in choices}) != len(choices):
        raise ValueError("linear names must be unique")
    total = sum(c.numel for c in choices)
    budget = target_bpw * total
    hulls = {c.name: convex_hull(c) for c in choices}
    step = {c.name: 0 for c in choices}  # index into the hull
    spent = sum(c.cost(hulls[c.name][0]) for c in choices)
    if spent > budget * (1 + 1e-12):
        raise ValueError(f"--bpw {target_bpw} is below the cheapest allocation "
                         f"({spent / total:.4f} bits per weight): lower the bit widths or "
                         "raise the group size")
    by_name = {c.name: c for c in choices}

    def next_upgrade(name: str) -> tuple[float, float, str] | None:
        """(-gain per extra bit, extra bits, name) of the linear's next hull step."""
        hull, i, c = hulls[name], step[name], by_name[name]
        if i + 1 == len(hull):
            return None
        extra = c.cost(hull[i + 1]) - c.cost(hull[i])
        return -(c.err[hull[i]] - c.err[hull[i + 1]]) / extra, extra, name

    heap = [u for u in map(next_upgrade, step) if u is not None]
    heapq.heapify(heap)
    refused = []  # upgrades that did not fit: spending only grows, so they never will
    while heap:
        upgrade = heapq.heappop(heap)
        _, extra, name = upgrade
        if spent + extra > budget:
            refused.append(extra)
            continue
        step[name] += 1
        spent += extra
        following = next_upgrade(name)
        if following is not None:
            heapq.heappush(heap, following)
    widths = {name: hulls[name][i] for name, i in step.items()}
    return Allocation(
        widths=widths, target_bpw=target_bpw, achieved_bpw=spent / total,
        total_err=sum(by_name[n].err[w] for n, w in widths.items()),
        slack_bits=budget - spent, min_upgrade_bits=min(refused, default=math.inf))
