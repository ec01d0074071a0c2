"""Per-step schedules: τ and κ linear, learning rate cosine to a fraction (method §6).

Everything advances per optimiser step, never per micro-batch, and the last step runs exactly at the
end values (τ = 0.05, κ = 500, lr = final_frac · lr).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    total_steps: int
    tau: tuple[float, float] = (2.0, 0.05)
    kappa: tuple[float, float] = (100.0, 500.0)
    lr_final_frac: float = 0.1  # cosine decay of the learning rate to this fraction
    cosine: bool = True  # False = constant learning rate (the Q/K warm-up)

    def _progress(self, step: int) -> float:
        return step / (self.total_steps - 1) if self.total_steps > 1 else 1.0

    @staticmethod
    def _linear(start: float, end: float, progress: float) -> float:
        # written so that progress 0 and 1 give start and end exactly
        return start * (1.0 - progress) + end * progress

    def tau_at(self, step: int) -> float:
        return self._linear(*self.tau, self._progress(step))

    def kappa_at(self, step: int) -> float:
        return self._linear(*self.kappa, self._progress(step))

    def lr_factor(self, step: int) -> float:
        if not self.cosine:
            return 1.0
        frac = self.lr_final_frac
        return frac + (1.0 - frac) * 0.5 * (1.0 + math.cos(math.pi * self._progress(step)))

    def lr_sum(self) -> float:
        """Σ_t lr_factor(t): how far (in units of lr) a Lion parameter can travel over the run."""
        return sum(self.lr_factor(t) for t in range(self.total_steps))


# Travel of a logit over the paper's budget: 1,280 Lion steps at 1e-4 with cosine decay to 0.1x
# (about 0.070).
PAPER_LOGIT_TRAVEL = 1e-4 * Schedule(1280).lr_sum()
# gsq's default travel target: half the paper's, i.e. about 1.2x the init prior's margin between
# the init code and its neighbours (σ_init·α·0.5 = 0.03). Enough to repair the init noise's flips
# (method §21) without the large first-epoch disruption a full-travel lr causes at small budgets
# (measured on SmolLM2 blocks: see benchmarks/RESULTS.md). At the paper's budget the lr stays 1e-4.
DEFAULT_LOGIT_TRAVEL = 0.5 * PAPER_LOGIT_TRAVEL


def budget_aware_lr(base_lr: float, schedule: Schedule, travel: float | None) -> float:
    """max(base_lr, travel / Σ lr factors): small budgets get a larger lr so logits can still
    move as far as at the paper's budget (method §21); at the paper's budget this is base_lr."""
    if travel is None or schedule.total_steps == 0:
        return base_lr
    return max(base_lr, travel / schedule.lr_sum())
