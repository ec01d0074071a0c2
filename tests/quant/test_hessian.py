"""Running-mean Hessian H = (2/n) Σ x xᵀ and its damping (method §2, §7)."""

from __future__ import annotations

import torch

from gsq.quant.hessian import HessianAccumulator, damp_hessian


def test_running_mean_equals_one_shot():
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 7, 16, generator=gen), torch.randn(1, 1, 16, generator=gen),
               torch.randn(40, 16, generator=gen), torch.randn(2, 5, 16, generator=gen)]
    acc = HessianAccumulator(16)
    for b in batches:
        acc.add(b)
    X = torch.cat([b.reshape(-1, 16) for b in batches]).double()
    expected = 2.0 / X.shape[0] * X.T @ X
    assert acc.n_samples == X.shape[0] == 21 + 1 + 40 + 10
    assert acc.H.dtype == torch.float32
    torch.testing.assert_close(acc.H.double(), expected, rtol=1e-5, atol=1e-6)


def test_accumulates_bf16_inputs_in_fp32():
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    acc = HessianAccumulator(8)
    acc.add(x)
    xf = x.float()
    torch.testing.assert_close(acc.H, 2.0 / 64 * xf.T @ xf, rtol=1e-5, atol=1e-6)


def test_damping_and_dead_columns():
    H = torch.diag(torch.tensor([2.0, 0.0, 4.0, 0.0]))
    H[0, 2] = H[2, 0] = 1.0
    H_d, dead = damp_hessian(H, percdamp=0.1)
    assert dead.tolist() == [False, True, False, True]
    # dead columns get H_ii = 1, then 0.1 * mean(diag) = 0.1 * (2 + 1 + 4 + 1) / 4 = 0.2 is added
    assert torch.equal(torch.diag(H_d), torch.tensor([2.0, 1.0, 4.0, 1.0]) + torch.tensor(0.2))
    off_diag = H_d - torch.diag(torch.diag(H_d))
    assert torch.equal(off_diag, H - torch.diag(torch.diag(H)))  # only the diagonal changes
    assert H_d[0, 2] == 1.0 and H_d[2, 0] == 1.0
    assert H[1, 1] == 0.0  # the input is not modified


def test_grouped_accumulator_equals_one_accumulator_per_group():
    """Batches routed to 3 groups (one never hit, one hit only in the second batch): each group's
    running mean equals `HessianAccumulator` fed that group's rows; `groups` updates a subset."""
    from gsq.quant.hessian import GroupedHessianAccumulator, gather_rows, group_rows

    gen = torch.Generator().manual_seed(3)
    grouped, single = GroupedHessianAccumulator(4, 8), [HessianAccumulator(8) for _ in range(4)]
    for n, ids in ((9, (0, 1)), (13, (0, 1, 2))):
        x = torch.randn(n, 8, generator=gen)
        group = torch.tensor(ids)[torch.randint(0, len(ids), (n,), generator=gen)]
        index, counts = group_rows(group, 4)
        padded = gather_rows(x, index)
        assert padded.shape == (4, int(counts.max()), 8) and counts.sum() == n
        for g in range(4):
            assert torch.equal(padded[g, : counts[g]], x[group == g])  # order kept, rest zero
            assert not padded[g, counts[g]:].any()
            if counts[g]:
                single[g].add(x[group == g])
        subset = torch.tensor([2, 0, 1])  # any order of a subset of the groups
        grouped.add_padded(padded[subset], counts[subset], subset)
    for g in range(4):
        torch.testing.assert_close(grouped.member(g).H, single[g].H, rtol=1e-5, atol=1e-6)
        assert grouped.member(g).n_samples == single[g].n_samples
    assert grouped.member(3).n_samples == 0 and not grouped.member(3).H.any()


def test_batched_damping_equals_damp_hessian():
    from gsq.quant.hessian import damp_hessians

    gen = torch.Generator().manual_seed(4)
    H = torch.randn(3, 6, 6, generator=gen)
    H = H @ H.transpose(1, 2)
    H[1, 2, :] = 0
    H[1, :, 2] = 0
    damped, dead = damp_hessians(H, 0.05)
    for b in range(3):
        ref, ref_dead = damp_hessian(H[b], 0.05)
        torch.testing.assert_close(damped[b], ref)
        assert torch.equal(dead[b], ref_dead)
    assert dead[1, 2] and int(dead.sum()) == 1


def test_reduce_accumulators_sends_each_expert_to_its_owner():
    """Expert parallel (`gsq.dist`): a linear's sums go to its owner alone (`reduce_to`), packed
    per owner; an accumulator shared by linears of two owners (the pooled input of starved
    experts) and every count go to every rank (`all_reduce`); unreferenced groups stay put.
    The fake collectives double what they reduce, as if two ranks held the same partial sums."""
    from gsq.quant.hessian import GroupedHessianAccumulator, reduce_accumulators

    gen = torch.Generator().manual_seed(0)
    grouped = GroupedHessianAccumulator(4, 3)
    grouped.add_padded(torch.randn(4, 5, 3, generator=gen), torch.full((4,), 5))
    pooled, down = HessianAccumulator(3), HessianAccumulator(3)
    pooled.add(torch.randn(6, 3, generator=gen))
    down.add(torch.randn(6, 3, generator=gen))
    S0 = grouped.S.clone()
    accs = {"e0.gate": grouped.member(0), "e0.up": grouped.member(0), "e1.gate": grouped.member(1),
            "e3.gate": grouped.member(3), "e2.gate": pooled, "e5.gate": pooled, "e2.down": down}
    owners = {"e0.gate": 0, "e0.up": 0, "e1.gate": 1, "e3.gate": 1, "e2.gate": 0, "e5.gate": 1,
              "e2.down": 0}
    calls = []

    def all_reduce(ts):
        calls.append(("all", [tuple(t.shape) for t in ts]))
        for t in ts:
            t.mul_(2)

    def reduce_to(ts, dst):
        calls.append((dst, [tuple(t.shape) for t in ts]))
        for t in ts:
            t.mul_(2)

    reduce_accumulators(accs, owners, all_reduce, reduce_to)
    assert calls == [("all", [(4,)]), (0, [(1, 3, 3)]), (1, [(2, 3, 3)]),  # groups 0 | 1, 3
                     ("all", [(1,)]), ("all", [(3, 3)]),  # pooled: count, sum to every rank
                     ("all", [(1,)]), (0, [(3, 3)])]  # expert 2's down: count, sum to rank 0
    assert torch.equal(grouped.S[[0, 1, 3]], 2 * S0[[0, 1, 3]])
    assert torch.equal(grouped.S[2], S0[2])  # expert 2 (starved) is read from `pooled`
    assert pooled.n_samples == down.n_samples == 12
