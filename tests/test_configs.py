"""Every shipped config parses and validates into a RunConfig; bad values name their key."""

import glob
import importlib.util
import os

import pytest

from lorarl_jax.config import default_config, from_config_dict
from lorarl_jax.config_batches import batch_sizes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(path):
    spec = importlib.util.spec_from_file_location("cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))))
def test_config_validates_and_documents_its_command(path):
    mod = _load(path)
    cfg = from_config_dict(mod.get_config())
    assert "python -m lorarl_jax.main --config configs/" in mod.__doc__
    assert cfg.trainer.steps > 0 and cfg.lora.r > 0


@pytest.mark.parametrize(
    "group,key,value,needle",
    [
        ("algo", "loss_agg_mode", "mean", "algo.loss_agg_mode"),
        ("algo", "clip_ratio_c", 1.0, "algo.clip_ratio_c"),
        ("rollout", "num_generations", 0, "rollout.num_generations"),
        ("optim", "schedule", "linear", "optim.schedule"),
        ("algo", "reference", "init_adapter", "init_adapter_path"),
        ("algo", "rollout_is", "seq", "algo.rollout_is"),
        ("algo", "rollout_is_mode", "clip", "algo.rollout_is_mode"),
        ("algo", "rollout_is_threshold", 0.5, "algo.rollout_is_threshold"),
        ("algo", "loss_scale_factor", -1.0, "algo.loss_scale_factor"),
        ("rollout", "logp_gap_action", "raise", "rollout.logp_gap_action"),
        ("rollout", "max_logp_gap", -0.1, "rollout.max_logp_gap"),
        ("model", "dtype", "float8", "model.dtype"),
    ],
)
def test_bad_values_name_the_key(group, key, value, needle):
    c = default_config()
    c[group][key] = value
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        from_config_dict(c)


def test_unknown_key_in_dict_suggests():
    d = default_config().to_dict()
    d["algo"]["kl_loss_coeff"] = 0.1
    with pytest.raises(ValueError, match="did you mean 'algo.kl_loss_coef'"):
        from_config_dict(d)


def test_derived_defaults_are_resolved_once():
    """loss_scale_factor defaults to max_new_tokens (a constant, not this batch's length) and
    max_logp_gap to the value measured for the compute dtype; explicit values are kept."""
    from lorarl_jax.config import LOGP_GAP_DEFAULTS

    c = default_config()
    c.rollout.max_new_tokens = 48
    cfg = from_config_dict(c)
    assert cfg.algo.loss_scale_factor == 48.0
    assert cfg.rollout.max_logp_gap == LOGP_GAP_DEFAULTS["float32"]
    c.model.update(dtype="bfloat16", param_dtype="bfloat16")
    c.algo.loss_scale_factor = 100.0
    c.rollout.max_logp_gap = 0.5
    cfg = from_config_dict(c)
    assert cfg.algo.loss_scale_factor == 100.0 and cfg.rollout.max_logp_gap == 0.5
    c.rollout.max_logp_gap = 0.0
    assert from_config_dict(c).rollout.max_logp_gap == LOGP_GAP_DEFAULTS["bfloat16"]


@pytest.mark.parametrize(
    "group,key,value,needle",
    [
        ("algo", "ppo_mini_batch_size", 3, "algo.ppo_mini_batch_size=3 must divide"),
        ("algo", "micro_batch_size", 12, "algo.micro_batch_size=12 must divide or be a multiple"),
        ("algo", "micro_batch_size", 3, "algo.micro_batch_size=3 must divide or be a multiple"),
    ],
)
def test_batch_arithmetic_is_checked_with_the_config(group, key, value, needle):
    """data.batch_size=4 prompts × 8 generations: mini-batches and micro-batches must divide."""
    c = default_config()
    c[group][key] = value
    with pytest.raises(ValueError, match=needle):
        from_config_dict(c)
    c[group][key] = 0
    sizes = batch_sizes(from_config_dict(c))
    assert (sizes.prompts_per_update, sizes.rows_per_micro, sizes.n_micro) == (4, 32, 1)
    assert sizes.group_split == 1
    c.algo.micro_batch_size = 4  # half a group: each group runs as two sub-groups of 4 rows
    sizes = batch_sizes(from_config_dict(c))
    assert (sizes.rows_per_micro, sizes.n_micro, sizes.group_split) == (4, 8, 2)
