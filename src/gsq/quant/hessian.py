"""Layer Hessian H = (2/n) Σ x xᵀ and its damping (method §2, §7).

The accumulators keep the sum Σ x xᵀ (fp32) and the count n, and divide when H is read: partial
sums over disjoint token sets (e.g. the windows of several processes, `gsq.dist`) then add up to
the whole, and adding two partial sums is exactly what one process does with the same two chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

Reduce = Callable[[list[Tensor]], None]  # sums over processes, in place, on every rank
ReduceTo = Callable[[list[Tensor], int], None]  # sums over processes, in place, on one rank


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

    def reduce(self, owner: int | None, all_reduce: Reduce, reduce_to: ReduceTo) -> None:
        """Sum summed over processes to rank `owner` alone (`reduce_to`), or to every rank
        (`all_reduce`, owner None); the count to every rank."""
        n = torch.tensor([self.n_samples], dtype=torch.long)
        all_reduce([n])
        self.n_samples = int(n)
        if owner is None:
            all_reduce([self.S])
        else:
            reduce_to([self.S], owner)


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

    def reduce(self, owners: Mapping[int, int | None], all_reduce: Reduce,
               reduce_to: ReduceTo) -> None:
        """Counts summed over processes to every rank; the sum `S[g]` of each group g in `owners`
        to rank `owners[g]` alone (None: to every rank), the groups of one owner packed into one
        reduce. Groups left out of `owners` are not read and not reduced."""
        all_reduce([self.n_samples])
        by_owner: dict[int | None, list[int]] = {}
        for g, owner in sorted(owners.items()):
            by_owner.setdefault(owner, []).append(g)
        for owner, groups in by_owner.items():
            idx = torch.tensor(groups, device=self.S.device)
            part = self.S[idx]  # (len(groups), n, n) this process's partial sums, packed
            if owner is None:
                all_reduce([part])
            else:
                reduce_to([part], owner)  # `part` unchanged on the other ranks
            self.S[idx] = part

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


def reduce_accumulators(accs: Mapping[str, Any], owners: Mapping[str, int],
                        all_reduce: Reduce, reduce_to: ReduceTo) -> None:
    """Sum the accumulators behind `accs` (linear name -> HessianAccumulator or GroupMember)
    over processes, in place: a linear's sum to its owner alone (`owners[name]`, a rank: MoE
    experts under expert parallelism, `gsq.dist`), to every rank where it has none or where it
    shares its accumulator with linears of another owner (the pooled inputs of starved experts);
    counts to every rank. An accumulator shared by several linears, or a grouped one, is reduced
    once. Every rank must call this with the same names and owners (the collectives match up)."""
    bases: dict[int, tuple[Any, dict]] = {}  # id -> (accumulator, group or None -> owner)
    for name, acc in accs.items():
        base, key = (acc.grouped, acc.g) if isinstance(acc, GroupMember) else (acc, None)
        keys = bases.setdefault(id(base), (base, {}))[1]
        owner = owners.get(name)
        keys[key] = owner if keys.get(key, owner) == owner else None
    for base, keys in bases.values():
        if isinstance(base, GroupedHessianAccumulator):
            base.reduce(keys, all_reduce, reduce_to)
        else:
            base.reduce(keys[None], all_reduce, reduce_to)


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
