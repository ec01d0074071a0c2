"""τ/κ linear and cosine LR schedules, budget-aware logit LR (method §6, §21)."""

from __future__ import annotations

import itertools
import math

import pytest

from gsq.quant.schedule import PAPER_LOGIT_TRAVEL, Schedule, budget_aware_lr

STEPS = [2, 3, 7, 80, 1280, 2000]


@pytest.mark.parametrize("T", STEPS)
def test_first_step_runs_at_the_start_values(T):
    s = Schedule(T)
    assert s.tau_at(0) == 2.0
    assert s.kappa_at(0) == 100.0
    assert s.lr_factor(0) == 1.0


@pytest.mark.parametrize("T", STEPS)
def test_last_step_kappa_and_lr_exact(T):
    s = Schedule(T)
    assert s.kappa_at(T - 1) == 500.0
    assert s.lr_factor(T - 1) == 0.1


@pytest.mark.parametrize("T", [1, 80, 1280])
def test_last_step_tau_exact(T):
    assert Schedule(T).tau_at(T - 1) == 0.05


@pytest.mark.parametrize("T", STEPS)
def test_last_step_tau_within_rounding(T):
    assert Schedule(T).tau_at(T - 1) == pytest.approx(0.05, rel=1e-12)


def test_single_step_runs_at_the_end_values():
    s = Schedule(1)
    assert s.kappa_at(0) == 500.0
    assert s.lr_factor(0) == 0.1
    assert s.tau_at(0) == pytest.approx(0.05, rel=1e-12)


def test_linear_and_cosine_shapes():
    s = Schedule(101)
    assert s.tau_at(50) == pytest.approx(1.025)
    assert s.kappa_at(50) == pytest.approx(300.0)
    assert s.lr_factor(50) == pytest.approx(0.55)  # halfway down the cosine from 1 to 0.1
    taus = [s.tau_at(t) for t in range(101)]
    lrs = [s.lr_factor(t) for t in range(101)]
    assert all(a > b for a, b in itertools.pairwise(taus))
    assert all(a > b for a, b in itertools.pairwise(lrs))


def test_constant_lr_option():
    s = Schedule(10, cosine=False)
    assert [s.lr_factor(t) for t in range(10)] == [1.0] * 10
    assert s.lr_sum() == 10.0


def test_custom_endpoints():
    s = Schedule(5, tau=(4.0, 0.5), kappa=(10.0, 20.0), lr_final_frac=0.5)
    assert (s.tau_at(0), s.kappa_at(0), s.lr_factor(0)) == (4.0, 10.0, 1.0)
    assert (s.tau_at(4), s.kappa_at(4), s.lr_factor(4)) == (0.5, 20.0, 0.5)


def test_lr_sum():
    s = Schedule(80)
    expected = sum(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t / 79)) for t in range(80))
    assert s.lr_sum() == pytest.approx(expected, rel=1e-12)
    expected_travel = 1e-4 * Schedule(1280).lr_sum()
    assert PAPER_LOGIT_TRAVEL == pytest.approx(expected_travel, rel=1e-12)  # noqa: SIM300


def test_budget_aware_lr_is_base_lr_at_the_paper_budget():
    lr = budget_aware_lr(1e-4, Schedule(1280), PAPER_LOGIT_TRAVEL)
    assert lr == pytest.approx(1e-4, rel=1e-12)
    # larger budgets never lower the lr
    assert budget_aware_lr(1e-4, Schedule(5000), PAPER_LOGIT_TRAVEL) == 1e-4


def test_budget_aware_lr_is_larger_for_small_budgets():
    s = Schedule(80)
    lr = budget_aware_lr(1e-4, s, PAPER_LOGIT_TRAVEL)
    assert lr > 1e-4
    assert lr * s.lr_sum() == pytest.approx(PAPER_LOGIT_TRAVEL, rel=1e-12)  # same travel as paper
    assert lr == pytest.approx(1e-4 * 1280 / 80, rel=1e-2)  # the cosine shape is the same


def test_budget_aware_lr_off():
    assert budget_aware_lr(1e-4, Schedule(80), None) == 1e-4
    assert budget_aware_lr(1e-4, Schedule(0), PAPER_LOGIT_TRAVEL) == 1e-4


def test_default_train_config_travel_keeps_paper_lr_at_paper_budget():
    from gsq.quant.trainer import TrainConfig

    travel = TrainConfig().logit_travel
    assert travel is not None and 0 < travel <= PAPER_LOGIT_TRAVEL
    assert budget_aware_lr(1e-4, Schedule(1280), travel) == pytest.approx(1e-4, rel=1e-12)
    assert budget_aware_lr(1e-4, Schedule(80), travel) > 1e-4
