"""Layer Hessian H = (2/n) Σ x xᵀ and its damping (method §2, §7).

The accumulators keep the sum Σ x xᵀ (fp32) and the count n, and divide when H is read: partial
sums over disjoint token sets (e.g. the windows of several processes, `gsq.dist`) then add up to
the whole, and adding two partial sums is exactly what one process does with the same two chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor


class HessianAccumulator:
    """Accumulates Σ x xᵀ over batches of layer inputs `(..., in)` in fp32; `H` = (2/n) Σ x xᵀ."""

    def __init__(self, n_features: int, device: torch.device | str = "cpu") -> None:
        self.S = torch.zeros(n_features, n_features, dtype=torch.float32, device=device)
        self.n_samples = 0

    def add(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.S.device, torch.float32)  # (tokens, in)
        self.S += x.T @ x  # the chunk's sum first, then one addition (see the module doc)
        self.n_samples += x.shape[0]

    @property
    def H(self) -> Tensor:
        return self.S * (2.0 / max(self.n_samples, 1))

    def all_reduce(self, reduce: Callable[[list[Tensor]], None]) -> None:
        """Sum and count summed by `reduce` (in place, e.g. over processes)."""
        n = torch.tensor([self.n_samples], dtype=torch.long)
        reduce([self.S, n])
        self.n_samples = int(n)


def damp_hessian(H: Tensor, percdamp: float = 0.1) -> tuple[Tensor, Tensor]:
    """Return (damped H, dead-column mask): dead columns get H_ii = 1,
    then H += percdamp·mean(diag)·I."""
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    damp = percdamp * torch.mean(torch.diag(H))
    H.diagonal().add_(damp)
    return H, dead



def damp_hessians(H: Tensor, percdamp: float = 0.1) -> tuple[Tensor, Tensor]:
    """`damp_hessian` of a batch `(B, n, n)`: (damped copies, dead-column masks `(B, n)`)."""
    H = H.clone()
    diag = H.diagonal(dim1=-2, dim2=-1)  # (B, n), a view of H
    dead = diag == 0
    diag.masked_fill_(dead, 1.0)
    diag.add_(percdamp * diag.mean(-1, keepdim=True))
    return H, dead

class GroupedHessianAccumulator:
    """Hessians of `n_groups` input streams at once (MoE experts): sums `S` `(G, n, n)`.

    Group g's Hessian is (2/n_g) Σ x xᵀ over the rows sent to it, exactly as `HessianAccumulator`
    on those rows alone; the groups are updated together by one batched matmul per chunk.
    """

    def __init__(self, n_groups: int, n_features: int,
                 device: torch.device | str = "cpu") -> None:
        self.S = torch.zeros(n_groups, n_features, n_features, dtype=torch.float32, device=device)
        self.n_samples = torch.zeros(n_groups, dtype=torch.long)

    def add_padded(self, x: Tensor, counts: Tensor, groups: Tensor | None = None) -> None:
        """Rows `x` `(S, M, n)` of the groups `groups` `(S,)` (default: all G, in order): group
        `groups[s]`'s first `counts[s]` rows, the rest zero (padding adds nothing to Σ x xᵀ)."""
        groups = torch.arange(len(self.n_samples)) if groups is None else groups.cpu()
        x = x.to(self.S.device, torch.float32)
        gram = torch.bmm(x.transpose(1, 2), x)  # (S, n, n)
        idx = groups.to(self.S.device)
        self.S[idx] = self.S[idx] + gram
        self.n_samples[groups] += counts.to("cpu", torch.long)

    @property
    def H(self) -> Tensor:
        return self.S * (2.0 / self.n_samples.clamp(min=1).to(self.S.device))[:, None, None]

    def all_reduce(self, reduce: Callable[[list[Tensor]], None]) -> None:
        """Sums and counts summed by `reduce` (in place, e.g. over processes)."""
        reduce([self.S, self.n_samples])

    def member(self, g: int) -> GroupMember:
        """Group g seen as one accumulator (`.H`, `.n_samples`), read when asked."""
        return GroupMember(self, g)


class GroupMember:
    """One group of a `GroupedHessianAccumulator`, with the attributes of a `HessianAccumulator`."""

    def __init__(self, grouped: GroupedHessianAccumulator, g: int) -> None:
        self.grouped, self.g = grouped, g

    @property
    def H(self) -> Tensor:
        return self.grouped.S[self.g] * (2.0 / max(self.n_samples, 1))

    @property
    def n_samples(self) -> int:
        return int(self.grouped.n_samples[self.g])


def all_reduce_accumulators(accs: Iterable, reduce: Callable[[list[Tensor]], None]) -> None:
    """`reduce` the sums and counts of the accumulators behind `accs` (HessianAccumulator or
    GroupMember; a grouped accumulator or one shared by several linears is reduced once)."""
    seen: dict[int, object] = {}
    for acc in accs:
        base = acc.grouped if isinstance(acc, GroupMember) else acc
        seen.setdefault(id(base), base)
    for base in seen.values():
        base.all_reduce(reduce)


def group_rows(group: Tensor, n_groups: int) -> tuple[Tensor, Tensor]:
    """Rows of each group: group ids `(N,)` -> (row indices `(G, M)`, -1 past a group's end;
    counts `(G,)`). Rows keep their order inside a group; M is the largest group's size."""
    counts = torch.bincount(group, minlength=n_groups)  # (G,)
    order = torch.argsort(group, stable=True)
    sorted_group = group[order]
    starts = torch.cumsum(counts, 0) - counts  # (G,) first sorted row of each group
    pos = torch.arange(len(group), device=group.device) - starts[sorted_group]
    width = int(counts.max()) if len(group) else 0
    index = torch.full((n_groups, width), -1, dtype=torch.long, device=group.device)
    index[sorted_group, pos] = order
    return index, counts


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """`x` `(N, n)` gathered by `index` `(..., M)` -> `(..., M, n)`, zero rows where index < 0."""
    rows = x[index.clamp(min=0)]
    return rows * (index >= 0).unsqueeze(-1).to(rows.dtype)
