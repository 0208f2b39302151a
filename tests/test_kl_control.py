"""Golden tests for lorarl_jax.rl.kl_control: every number below is worked out by hand."""

import pytest

from lorarl_jax.rl import kl_control


def test_kl_controllers():
    fixed = kl_control.FixedKLController(0.1)
    fixed.update(5.0, 100)
    assert fixed.value == 0.1
    ctl = kl_control.AdaptiveKLController(init_kl_coef=0.1, target_kl=0.05, horizon=1000)
    # .1/.05 - 1 = 1 -> clipped to .2; mult = 1 + .2 * 100/1000 = 1.02 -> .102
    ctl.update(0.1, n_steps=100)
    assert ctl.value == pytest.approx(0.102)
    # .045/.05 - 1 = -.1; mult = 1 - .1 * 100/1000 = .99 -> .10098
    ctl.update(0.045, n_steps=100)
    assert ctl.value == pytest.approx(0.10098)
    # far below target: error clipped to -.2 -> mult .98 -> .0989604
    ctl.update(0.0, n_steps=100)
    assert ctl.value == pytest.approx(0.0989604)
    assert isinstance(ctl.value, float)
