"""KL controllers for KL-in-reward: the coefficient beta of `losses.apply_kl_penalty`.

Design: verl's `FixedKLController` and `AdaptiveKLController` (`verl/trainer/ppo/core_algos.py`),
formula for formula:

    fixed:     beta constant; update is a no-op
    adaptive:  e = clip(current_kl / target_kl - 1, -0.2, 0.2)
               beta <- beta * (1 + e * n_steps / horizon)          (Ziegler et al. 2019)

The coefficient is the controller's whole state. The trainer keeps it in its `TrainState`
(`kl_coef`, checkpointed) and moves it with the pure `next_value(value, current_kl, n_steps)`;
`.value` / `.update` keep a controller object usable on its own (verl's interface).
"""

from __future__ import annotations

import numpy as np


class FixedKLController:
    """Constant KL coefficient; `.value` is beta, `.update` is a no-op."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def next_value(self, value: float, current_kl: float, n_steps: int) -> float:
        del current_kl, n_steps
        return value

    def update(self, current_kl: float, n_steps: int) -> None:
        self.value = self.next_value(self.value, current_kl, n_steps)


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, https://arxiv.org/abs/1909.08593).

    e = clip(current_kl / target_kl - 1, -0.2, 0.2);  beta <- beta * (1 + e * n_steps / horizon)
    """

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: int):
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = init_kl_coef
        self.target = target_kl
        self.horizon = horizon

    def next_value(self, value: float, current_kl: float, n_steps: int) -> float:
        proportional_error = float(np.clip(float(current_kl) / self.target - 1.0, -0.2, 0.2))
        return value * (1.0 + proportional_error * n_steps / self.horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        self.value = self.next_value(self.value, current_kl, n_steps)
