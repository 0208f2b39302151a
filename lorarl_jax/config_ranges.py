"""The natural range of every numeric config key (`RANGES`) and its check (`check_range`).

`config.from_config_dict` checks each numeric key against its entry when the config is read;
tests/test_faults.py fails if a numeric key of a config group has no entry here.
"""

from __future__ import annotations

import math
import re

# The natural range of every numeric key, checked when the config is validated (before anything
# is built): "[lo, hi]" with "(" / ")" for open ends and "inf" for no bound; "int" marks integer
# keys. Keys with a cross-key rule (e.g. algo.micro_batch_size divides the mini-batch) are
# checked again where both values are known.
RANGES = {
    ("lora", "r"): "int [0, inf)",
    ("lora", "lora_alpha"): "(0, inf)",
    ("lora", "lora_dropout"): "[0, 1)",
    ("rollout", "num_generations"): "int [1, inf)",
    ("rollout", "temperature"): "(0, inf)",
    ("rollout", "top_p"): "(0, 1]",
    ("rollout", "top_k"): "int [0, inf)",
    ("rollout", "max_prompt_length"): "int [1, inf)",
    ("rollout", "max_new_tokens"): "int [1, inf)",
    ("rollout", "response_bucket"): "int [0, inf)",
    ("rollout", "max_logp_gap"): "[0, inf)",
    ("algo", "gamma"): "[0, 1]",
    ("algo", "lam"): "[0, 1]",
    ("algo", "clip_ratio_low"): "[0, 1)",
    ("algo", "clip_ratio_high"): "[0, inf)",
    ("algo", "clip_ratio_c"): "(1, inf)",
    ("algo", "gspo_clip_ratio_low"): "[0, 1)",
    ("algo", "gspo_clip_ratio_high"): "[0, inf)",
    ("algo", "cispo_clip_ratio_low"): "[0, 1]",
    ("algo", "cispo_clip_ratio_high"): "[0, inf)",
    ("algo", "loss_scale_factor"): "[0, inf)",
    ("algo", "rollout_is_threshold"): "[1, inf)",
    ("algo", "kl_loss_coef"): "[0, inf)",
    ("algo", "kl_coef"): "[0, inf)",
    ("algo", "target_kl"): "(0, inf)",
    ("algo", "kl_horizon"): "int [1, inf)",
    ("algo", "entropy_coeff"): "[0, inf)",
    ("algo", "ppo_epochs"): "int [1, inf)",
    ("algo", "ppo_mini_batch_size"): "int [0, inf)",
    ("algo", "micro_batch_size"): "int [0, inf)",
    ("algo", "logprob_chunk"): "int [1, inf)",
    ("algo", "max_skipped_steps"): "int [0, inf)",
    ("algo", "max_adapter_absmax"): "[0, inf)",
    ("algo", "max_num_gen_batches"): "int [0, inf)",
    ("algo", "overlong_buffer_len"): "int [0, inf)",
    ("algo", "overlong_penalty_factor"): "[0, inf)",
    ("critic", "lr"): "(0, inf)",
    ("critic", "cliprange_value"): "(0, inf)",
    ("critic", "warmup_steps"): "int [0, inf)",
    ("critic", "grad_clip"): "[0, inf)",
    ("optim", "lr"): "(0, inf)",
    ("optim", "warmup_steps"): "int [0, inf)",
    ("optim", "min_lr_ratio"): "[0, 1]",
    ("optim", "weight_decay"): "[0, inf)",
    ("optim", "grad_clip"): "[0, inf)",
    ("optim", "b1"): "[0, 1)",
    ("optim", "b2"): "[0, 1)",
    ("optim", "eps"): "(0, inf)",
    ("data", "batch_size"): "int [1, inf)",
    ("data", "val_batch_size"): "int [1, inf)",
    ("data", "max_val_samples"): "int [0, inf)",
    ("data", "pad_multiple"): "int [1, inf)",
    ("data", "reward_timeout_s"): "(0, inf)",
    ("data", "arith_n_train"): "int [1, inf)",
    ("data", "arith_n_val"): "int [0, inf)",
    ("data", "arith_max_operand"): "int [1, inf)",
    ("data", "max_failed_reward_steps"): "int [0, inf)",
    ("trainer", "steps"): "int [1, inf)",
    ("trainer", "seed"): "int [0, inf)",
    ("trainer", "log_interval"): "int [1, inf)",
    ("trainer", "eval_interval"): "int [0, inf)",
    ("trainer", "ckpt_interval"): "int [0, inf)",
    ("trainer", "max_to_keep"): "int [1, inf)",
    ("trainer", "num_processes"): "int [0, inf)",
    ("trainer", "process_id"): "int [-1, inf)",
}
_RANGE_RE = re.compile(r"(int )?([\[(])(-?[\d.e]+|-inf), (-?[\d.e]+|inf)([\])])$")


def check_range(key: str, value, spec: str) -> None:
    """Raises ValueError naming `key` unless `value` is a number inside `spec` (see RANGES)."""
    m = _RANGE_RE.match(spec)
    is_int, lo_b, lo, hi, hi_b = m.groups()
    lo, hi = float(lo), float(hi)
    ok_type = isinstance(value, int) if is_int else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        kind = "an integer" if is_int else "a number"
        raise ValueError(f"config key {key}={value!r}: must be {kind} in {spec.split()[-1]}")
    v = float(value)
    above = v > lo if lo_b == "(" else v >= lo
    inside = not math.isnan(v) and above and (v < hi if hi_b == ")" else v <= hi)
    if not inside:
        raise ValueError(f"config key {key}={value!r}: must be in {spec.removeprefix('int ')}")
