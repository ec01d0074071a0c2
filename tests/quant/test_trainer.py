"""The GSQ trainer on a toy objective: one linear layer y = x Wᵀ against its FP weight (method §6,
§18.3, §21)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gsq.quant import trainer as trainer_mod
from gsq.quant.gptq import gptq_quantize
from gsq.quant.quantizers import InitConfig, make_quantizer
from gsq.quant.rtn import rtn_quantize
from gsq.quant.schedule import Schedule, budget_aware_lr
from gsq.quant.trainer import TrainConfig, train_quantizers
from gsq.quant.types import QuantSpec

D, OUT, G = 64, 16, 16


def _ar_inputs(n_rows, rho, gen):
    Z = torch.randn(n_rows, D, generator=gen)
    X = torch.empty(n_rows, D)
    X[:, 0] = Z[:, 0]
    for j in range(1, D):
        X[:, j] = rho * X[:, j - 1] + (1 - rho**2) ** 0.5 * Z[:, j]
    return X


class LinearObjective:
    """MSE of x Wᵀ against x W_fᵀ; samples are sequences `(T, in)`."""

    def __init__(self, W_f, X_train, X_val, name="lin"):
        self.name = name
        self.n_train = X_train.shape[0]
        self.dtype = torch.float32
        self.X_train, self.X_val = X_train, X_val
        self.Y_train, self.Y_val = X_train @ W_f.T, X_val @ W_f.T
        self.seen: list[list[int]] = []

    def loss(self, weights, indices):
        self.seen.append(indices.tolist())
        return F.mse_loss(self.X_train[indices] @ weights[self.name].T, self.Y_train[indices])

    def val_loss(self, weights):
        return float(F.mse_loss(self.X_val @ weights[self.name].T, self.Y_val))


def _problem(n_train=64, T=32, seed=0, rho=0.9):
    """(W_f, GPTQ Hessian, objective): correlated inputs, disjoint train / val / GPTQ sequences."""
    gen = torch.Generator().manual_seed(seed)
    X = _ar_inputs((n_train + 16 + 32) * T, rho, gen).view(-1, T, D)
    X_train, X_val, X_gptq = X[:n_train], X[n_train:n_train + 16], X[n_train + 16:]
    W_f = torch.randn(OUT, D, generator=gen) * 0.05
    Xg = X_gptq.reshape(-1, D)
    H = 2.0 / Xg.shape[0] * Xg.T @ Xg
    return W_f, H, LinearObjective(W_f, X_train, X_val)


def _quantizers(init, gen_seed=1):
    return {"lin": make_quantizer(init, InitConfig(), torch.Generator().manual_seed(gen_seed))}


CFG = TrainConfig(epochs=10, batch_size=8, micro_batch_size=4)


@pytest.mark.parametrize("bits", [2, 3, "ternary"])
def test_training_beats_the_gptq_init_on_held_out_data(bits):
    W_f, H, objective = _problem()
    init = gptq_quantize(W_f, H, QuantSpec(bits, G))
    run = train_quantizers(_quantizers(init), objective, CFG, seed=0)
    assert run.init_val == pytest.approx(objective.val_loss({"lin": init.dequantize()}), rel=1e-6)
    assert run.best_epoch > 0
    assert run.best_val < 0.97 * run.init_val, (run.best_val, run.init_val)
    result = run.results["lin"]
    assert run.best_val == pytest.approx(objective.val_loss({"lin": result.dequantize()}), rel=1e-6)
    spec = result.spec
    assert spec.qmin <= int(result.codes.min()) <= int(result.codes.max()) <= spec.qmax


@pytest.mark.parametrize("bits", [2, 3, "ternary"])
def test_training_beats_the_rtn_init_on_held_out_data(bits):
    W_f, _, objective = _problem(n_train=32, T=16)
    init = rtn_quantize(W_f, QuantSpec(bits, G))
    run = train_quantizers(_quantizers(init), objective, CFG, seed=0)
    assert run.best_val < 0.5 * run.init_val, (run.best_val, run.init_val)


def _keep_best_case():
    """A case where no epoch beats the 2-bit GPTQ init on held-out data (small budget)."""
    W_f, H, objective = _problem(n_train=32, T=16)
    return gptq_quantize(W_f, H, QuantSpec(2, G)), objective


def test_keep_best_never_returns_a_loss_above_the_init():
    init, objective = _keep_best_case()
    run = train_quantizers(_quantizers(init), objective, CFG, seed=0)
    vals = [h["val_hard"] for h in run.history]
    assert len(vals) == CFG.epochs
    assert run.best_val <= run.init_val
    assert run.best_val == min([run.init_val, *vals])
    assert min(vals) > run.init_val, "the case is meant to exercise keeping the init"
    assert run.best_epoch == 0
    assert torch.equal(run.results["lin"].codes, init.codes)
    assert torch.equal(run.results["lin"].scale, init.scale)


def test_without_keep_best_the_last_epoch_is_returned():
    init, objective = _keep_best_case()
    cfg = TrainConfig(epochs=10, batch_size=8, micro_batch_size=4, keep_best=False)
    run = train_quantizers(_quantizers(init), objective, cfg, seed=0)
    assert run.best_epoch == cfg.epochs
    assert run.best_val == run.history[-1]["val_hard"] > run.init_val


@pytest.mark.parametrize("seed", [0, 3])
def test_keep_best_picks_the_minimum_epoch(seed):
    W_f, H, objective = _problem(n_train=32, T=16, seed=seed)
    run = train_quantizers(_quantizers(gptq_quantize(W_f, H, QuantSpec(3, G))), objective, CFG,
                           seed=seed)
    vals = [run.init_val] + [h["val_hard"] for h in run.history]
    assert run.best_val == min(vals) and vals.index(run.best_val) == run.best_epoch
    for h in run.history:
        assert math.isfinite(h["val_soft"]) and math.isfinite(h["train_loss"])


def test_same_seed_same_codes_other_seed_other_codes():
    W_f, H, objective = _problem(n_train=32, T=16)
    init = gptq_quantize(W_f, H, QuantSpec(3, G))
    cfg = TrainConfig(epochs=4, batch_size=8, micro_batch_size=4, keep_best=False)

    def run(seed, gen_seed=1):
        return train_quantizers(_quantizers(init, gen_seed), objective, cfg, seed=seed)

    a, b, c, d = run(0), run(0), run(1), run(0, gen_seed=2)
    assert torch.equal(a.results["lin"].codes, b.results["lin"].codes)
    assert torch.equal(a.results["lin"].scale, b.results["lin"].scale)
    assert [h["val_hard"] for h in a.history] == [h["val_hard"] for h in b.history]
    assert not torch.equal(a.results["lin"].codes, c.results["lin"].codes)  # other noise seed
    assert not torch.equal(a.results["lin"].codes, d.results["lin"].codes)  # other init noise


# ---------------------------------------------------------------------------------------------
# Steps, schedules, micro-batches


class _Spy:
    """Records every soft() call of a quantizer, optionally with the noise switched off."""

    def __init__(self, quantizer, noise=True):
        self.calls = []
        self._soft = quantizer.soft
        self.noise = noise
        quantizer.soft = self

    def __call__(self, tau, kappa, noise_seed, out_dtype):
        self.calls.append((tau, kappa, noise_seed))
        return self._soft(tau, kappa, noise_seed if self.noise else None, out_dtype)


class _RecordingLion(trainer_mod.Lion):
    steps: list = []

    def step(self, closure=None):
        type(self).steps.append({
            "lrs": [g["lr"] for g in self.param_groups],
            "grads": [p.grad.detach().clone() for g in self.param_groups for p in g["params"]],
        })
        return super().step(closure)


@pytest.fixture
def recording_lion(monkeypatch):
    _RecordingLion.steps = []
    monkeypatch.setattr(trainer_mod, "Lion", _RecordingLion)
    return _RecordingLion.steps


@pytest.mark.parametrize("n_train, batch, micro", [(32, 8, 4), (30, 8, 3), (20, 64, 8)])
def test_step_count_schedule_and_micro_batches(n_train, batch, micro, recording_lion):
    W_f, H, objective = _problem(n_train=n_train, T=4)
    quantizers = _quantizers(gptq_quantize(W_f, H, QuantSpec(2, G)))
    spy = _Spy(quantizers["lin"])
    cfg = TrainConfig(epochs=3, batch_size=batch, micro_batch_size=micro)
    run = train_quantizers(quantizers, objective, cfg, seed=0)

    eff_batch = min(batch, n_train)
    per_epoch = n_train // eff_batch
    total = cfg.epochs * per_epoch
    assert run.steps == total == len(recording_lion)
    n_micro = math.ceil(eff_batch / micro)
    assert len(objective.seen) == total * n_micro
    assert all(len(ix) <= micro for ix in objective.seen)
    steps = [sum(objective.seen[s * n_micro:(s + 1) * n_micro], []) for s in range(total)]
    assert all(len(ix) == eff_batch == len(set(ix)) for ix in steps)
    # per epoch, the steps use disjoint samples
    for e in range(cfg.epochs):
        ix = sum(steps[e * per_epoch:(e + 1) * per_epoch], [])
        assert len(ix) == len(set(ix))

    # soft() calls per epoch: n_micro per step, then one for the soft validation loss
    per_epoch_calls = n_micro * per_epoch + 1
    assert len(spy.calls) == cfg.epochs * per_epoch_calls
    train_calls = [c for i, c in enumerate(spy.calls) if i % per_epoch_calls < n_micro * per_epoch]
    taus = [train_calls[s * n_micro][0] for s in range(total)]
    kappas = [train_calls[s * n_micro][1] for s in range(total)]
    for s in range(total):  # τ and κ fixed within a step, fresh noise per micro-batch
        group = train_calls[s * n_micro:(s + 1) * n_micro]
        assert len({(t, k) for t, k, _ in group}) == 1
        assert len({seed for _, _, seed in group}) == n_micro
    assert len({c[2] for c in train_calls}) == len(train_calls)  # no noise reused anywhere
    sched = Schedule(total)
    assert taus[0] == 2.0 and kappas[0] == 100.0
    assert taus[-1] == sched.tau_at(total - 1) == pytest.approx(0.05, rel=1e-12)
    assert kappas[-1] == 500.0
    # learning rates: budget-aware logit lr, cosine to 0.1x, first and last step exact
    logit_lr = budget_aware_lr(cfg.logit_lr, sched, cfg.logit_travel)
    assert run.logit_lr == logit_lr
    assert recording_lion[0]["lrs"] == [logit_lr, cfg.scale_lr]
    final_lrs = [0.1 * logit_lr, 0.1 * cfg.scale_lr]
    assert recording_lion[-1]["lrs"] == pytest.approx(final_lrs, rel=1e-12)


def test_micro_batch_split_does_not_change_the_mean_gradient(recording_lion):
    """With the noise off, every split of a step into micro-batches gives the same gradient."""
    W_f, H, objective = _problem(n_train=8, T=4)
    init = gptq_quantize(W_f, H, QuantSpec(2, G))
    grads = []
    for micro in (1, 2, 3, 8):
        recording_lion.clear()
        quantizers = _quantizers(init)
        _Spy(quantizers["lin"], noise=False)
        train_quantizers(quantizers, objective,
                         TrainConfig(epochs=2, batch_size=8, micro_batch_size=micro), seed=0)
        assert len(recording_lion) == 2
        grads.append(recording_lion[0]["grads"])
    # the full-batch gradient of the first step (τ = 2, κ = 100) computed directly
    q = _quantizers(init)["lin"]
    W = q.soft(2.0, 100.0, None, torch.float32)
    objective.loss({"lin": W}, torch.arange(8)).backward()
    for g in grads:
        torch.testing.assert_close(g[0], q.logits.grad, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(g[1], q.scale.grad, rtol=1e-5, atol=1e-9)
    assert q.logits.grad.abs().sum() > 0 and q.scale.grad.abs().sum() > 0


def test_noise_differs_between_micro_batches_with_noise_on(recording_lion):
    W_f, H, objective = _problem(n_train=8, T=4)
    init = gptq_quantize(W_f, H, QuantSpec(2, G))
    grads = []
    for micro in (2, 8):
        recording_lion.clear()
        train_quantizers(_quantizers(init), objective,
                         TrainConfig(epochs=2, batch_size=8, micro_batch_size=micro), seed=0)
        grads.append(recording_lion[0]["grads"][0])
    assert not torch.equal(grads[0], grads[1])


def test_batching_chunks_keeps_fixed_chunks():
    W_f, H, objective = _problem(n_train=32, T=4)
    init = gptq_quantize(W_f, H, QuantSpec(2, G))
    cfg = TrainConfig(epochs=3, batch_size=8, micro_batch_size=8, batching="chunks")
    train_quantizers(_quantizers(init), objective, cfg, seed=0)
    chunks = {tuple(range(i, i + 8)) for i in range(0, 32, 8)}
    assert all(tuple(ix) in chunks for ix in objective.seen)
    assert objective.seen[:4] != objective.seen[4:8] or objective.seen[4:8] != objective.seen[8:]

    objective.seen.clear()
    train_quantizers(_quantizers(init), objective,
                     TrainConfig(epochs=3, batch_size=8, micro_batch_size=8), seed=0)
    assert not all(tuple(ix) in chunks for ix in objective.seen)  # reshuffled per sample


def test_batching_chunks_with_a_partial_chunk():
    W_f, H, objective = _problem(n_train=30, T=4)
    init = gptq_quantize(W_f, H, QuantSpec(2, G))
    cfg = TrainConfig(epochs=4, batch_size=8, micro_batch_size=8, batching="chunks")
    train_quantizers(_quantizers(init), objective, cfg, seed=0)
    chunks = {tuple(range(i, i + 8)) for i in range(0, 24, 8)}
    assert all(tuple(ix) in chunks for ix in objective.seen), objective.seen


def test_zero_epochs_returns_the_init():
    W_f, H, objective = _problem(n_train=8, T=4)
    init = gptq_quantize(W_f, H, QuantSpec(3, G))
    run = train_quantizers(_quantizers(init), objective, TrainConfig(epochs=0), seed=0)
    assert run.steps == 0 and run.best_epoch == 0 and run.history == []
    assert torch.equal(run.results["lin"].codes, init.codes)


def test_non_finite_loss_raises():
    W_f, H, objective = _problem(n_train=8, T=4)
    objective.Y_train = objective.Y_train.clone()
    objective.Y_train[0, 0, 0] = float("nan")
    init = gptq_quantize(W_f, H, QuantSpec(2, G))
    with pytest.raises(FloatingPointError, match="non-finite"):
        train_quantizers(_quantizers(init), objective,
                         TrainConfig(epochs=1, batch_size=8, micro_batch_size=8), seed=0)


@pytest.mark.parametrize("kwargs", [dict(epochs=-1), dict(batch_size=0), dict(micro_batch_size=0),
                                    dict(batching="random")])
def test_train_config_validation(kwargs):
    with pytest.raises(ValueError):
        TrainConfig(**kwargs)
