"""Builds everything a run needs, once: model, adapter, optimizer, data, rewards, ckpt, logger.

`build(cfg)` returns a `Run` (a plain mutable record the loop updates: adapter, optimizer state,
step). Resuming restores adapter, optimizer state, step, PRNG key, data-iterator position and the
KL controller from the latest orbax checkpoint; the frozen base is always re-read from the model
path and is never saved.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp

from lorarl_jax import data as data_lib
from lorarl_jax import datasets, distributed, run_dir
from lorarl_jax import mesh as mesh_lib
from lorarl_jax.checkpoint import Checkpointer, restore_or_none
from lorarl_jax.config import RunConfig
from lorarl_jax.metrics import MetricsLogger, plot_metrics
from lorarl_jax.model import hf, quant
from lorarl_jax.model.load import LoadedModel, load_model
from lorarl_jax.model.lora import LoraConfig, init_lora, lora_logical_axes
from lorarl_jax.model.transformer import abstract_params
from lorarl_jax.rl import kl_control
from lorarl_jax.rl import sharding as shard_lib
from lorarl_jax.rl import step as step_lib
from lorarl_jax.rl.guards import RunStopped, adapter_absmax
from lorarl_jax.rl.rewards import RewardManager
from lorarl_jax.sampling import rollout_weights
from lorarl_jax.sampling.sampler import SamplingParams


@dataclasses.dataclass
class Run:
    cfg: RunConfig
    model_cfg: Any
    lcfg: LoraConfig
    model_dir: str
    tokenizer: Any
    base: Any
    lora: Any
    ref_lora: Any
    opt_state: Any
    lr_schedule: Any
    policy_step: Any
    merge: Any  # rollout_weights.make_rollout_weights: (base, lora) → DecodeWeights
    generate: Any  # sharding.make_generate: host prompts → host Rollout
    logprobs: Any  # sharding.make_logprobs: (base, lora | None, host batch) → host arrays
    place: shard_lib.Placement
    sampling: SamplingParams
    stop_ids: tuple[int, ...]
    pad_id: int
    reward: RewardManager
    val_reward: RewardManager
    reward_columns: tuple[str, ...]
    dataset: Any
    data_iter: Any
    val_examples: list
    num_overlong: int
    keys: dict
    kl_ctl: Any
    critic: Any
    ckpt: Checkpointer | None
    logger: MetricsLogger
    updates_per_step: int
    step: int = 0

    @property
    def off_policy(self) -> bool:
        """More than one update per rollout: π_old must be computed before the first update."""
        return self.updates_per_step > 1

    def opt_steps(self) -> int:
        return self.step * self.updates_per_step


def _rows(files: str, split: str, cfg: RunConfig):
    if files:
        key, rows = f"data.{split}_files", []
        for f in (f.strip() for f in files.split(",")):
            if not os.path.isfile(f):
                raise FileNotFoundError(f"{key}: {f!r} does not exist")
            got = data_lib.load_rows(f)
            if not got:
                raise ValueError(f"{key}: {f!r} holds no rows")
            rows += got
        return rows
    d = cfg.data  # no files: the synthetic arithmetic task, deterministic from the seed
    rows = datasets.arith_rows(
        d.arith_n_train + d.arith_n_val, cfg.trainer.seed, tuple(d.arith_ops), d.arith_max_operand
    )
    return rows[: d.arith_n_train] if split == "train" else rows[d.arith_n_train :]


def _load_model(cfg: RunConfig, mesh) -> LoadedModel:
    m = cfg.model
    return load_model(
        m.path,
        mesh=mesh,
        dtype=m.dtype,
        param_dtype=m.param_dtype,
        remat=m.gradient_checkpointing,
        scan_layers=m.scan_layers,
        quantization=m.quantization,  # NF4 kernels are quantized as they are read
        double_quant=m.double_quant,
    )


def _init_adapter(cfg: RunConfig, model_cfg, base, key, mesh):
    lcfg = cfg.lora
    if cfg.init_adapter_path:
        lora, lcfg = hf.load_peft_adapter(cfg.init_adapter_path)
        lora = jax.tree.map(jnp.asarray, lora)
    else:
        lora = init_lora(base, lcfg, key)
    axes = lora_logical_axes(mesh_lib.logical_axes(abstract_params(model_cfg)), lora)
    # from host copies: every process holds the same values, and places its own shards
    lora = jax.device_put(jax.device_get(lora), mesh_lib.logical_to_sharding(axes, mesh))
    return lora, lcfg


def _rollout_weights(cfg: RunConfig, model_cfg, lcfg: LoraConfig, place):
    """`rollout.merge`: merged weights (laid out for decode) or base + adapter unmerged."""
    merged, why = rollout_weights.resolve_merge(cfg.rollout.merge, model_cfg)
    quiet = model_cfg.quantization == "none" and not rollout_weights.low_precision(model_cfg)
    if not quiet or cfg.rollout.merge != "auto":
        print(why)
    merge_fn = shard_lib.jit_merge(place, lcfg.scale, model_cfg.compute_dtype) if merged else None
    return rollout_weights.make_rollout_weights(model_cfg, lcfg, merge_fn)


def build(cfg: RunConfig) -> Run:
    tc, rc, dc = cfg.trainer, cfg.rollout, cfg.data
    if cfg.algo.adv_estimator == "drgrpo" and cfg.algo.loss_agg_mode != "seq-mean-token-sum-norm":
        print(
            f"note: algo.adv_estimator=drgrpo with loss_agg_mode={cfg.algo.loss_agg_mode!r} is "
            "half of Dr.GRPO; its recipe adds --config.algo.loss_agg_mode=seq-mean-token-sum-norm "
            f"(a constant C = algo.loss_scale_factor = {cfg.algo.loss_scale_factor:g}), as "
            "configs/drgrpo_smollm2.py does"
        )
    rdir = run_dir.prepare(cfg)  # refuses a previous run, an unwritable dir; writes nothing
    distributed.initialize(tc)  # before the first JAX computation
    mesh = mesh_lib.make_mesh(tuple(tc.mesh))
    root = distributed.replicated_key(jax.random.key(tc.seed), mesh)  # saved in checkpoints
    k_lora, k_rollout, k_update = jax.random.split(root, 3)
    loaded = _load_model(cfg, mesh)
    model_dir, model_cfg, base, tokenizer = (
        loaded.model_dir,
        loaded.cfg,
        loaded.params,
        loaded.tokenizer,
    )
    lora, lcfg = _init_adapter(cfg, model_cfg, base, k_lora, mesh)
    ref_lora = jax.tree.map(jnp.copy, lora) if cfg.algo.reference == "init_adapter" else None

    pad_id = data_lib.pad_id_of(tokenizer)
    train_ex, n_over = data_lib.encode_prompts(
        _rows(dc.train_files, "train", cfg), tokenizer, rc.max_prompt_length, rc.overlong_prompt
    )
    if len(train_ex) < dc.batch_size:
        raise ValueError(
            f"only {len(train_ex)} training prompts ({n_over} longer than "
            f"rollout.max_prompt_length={rc.max_prompt_length} were dropped) for "
            f"data.batch_size={dc.batch_size}"
        )
    val_rows = _rows(dc.val_files, "val", cfg)[: dc.max_val_samples] if dc.max_val_samples else []
    val_ex, _ = data_lib.encode_prompts(val_rows, tokenizer, rc.max_prompt_length, "filter")
    reward = RewardManager(dc.reward_fns, dc.reward_weights or None, dc.reward_timeout_s)
    columns = ("ground_truth", "data_source", "extra_info")
    # every row's data_source and columns up front, not at the first step that samples it
    reward.validate({k: [e[k] for e in train_ex + val_ex] for k in columns})
    dataset = data_lib.prompt_dataset(
        train_ex,
        batch_size=dc.batch_size,
        max_prompt_length=rc.max_prompt_length,
        pad_id=pad_id,
        seed=tc.seed,
        shuffle=dc.shuffle,
        # the global batch on every process (deterministic, small): each puts its own rows on
        # the mesh (sharding.Placement.put), so any process count gives the single-process run
        process_index=0,
        process_count=1,
        pad_multiple=dc.pad_multiple,
    )
    data_iter = iter(dataset)

    n = rc.num_generations
    per_mb = cfg.algo.ppo_mini_batch_size or dc.batch_size  # prompts per optimizer update
    if dc.batch_size % per_mb:
        raise ValueError(f"algo.ppo_mini_batch_size={per_mb} must divide data.batch_size")
    updates_per_step = cfg.algo.ppo_epochs * (dc.batch_size // per_mb)
    micro = cfg.algo.micro_batch_size or per_mb * n  # sequences per gradient micro-batch
    if micro % n or (per_mb * n) % micro:
        raise ValueError(
            f"algo.micro_batch_size={micro} must be a multiple of rollout.num_generations={n} "
            f"and divide the mini-batch ({per_mb * n} sequences)"
        )
    batches = {
        "data.batch_size": dc.batch_size,
        "algo.ppo_mini_batch_size": per_mb,
        f"algo.micro_batch_size={micro} / rollout.num_generations={n}": micro // n,
    }
    if val_ex:
        batches["data.val_batch_size"] = dc.val_batch_size
    shard_lib.check_batch_sizes(mesh, batches)
    tx = step_lib.make_optimizer(cfg.optim, tc.steps * updates_per_step)
    place = shard_lib.make_placement(mesh, model_cfg, base, lora, tx, lcfg.scale)
    opt_state = shard_lib.init_opt_state(place, tx, lora)
    policy_step = step_lib.make_policy_step(
        model_cfg,
        lcfg,
        cfg.algo,
        tx,
        rc.temperature,
        n,
        per_mb * n // micro,
        shardings=place.step_shardings(),
    )
    logprobs = shard_lib.make_logprobs(
        place, model_cfg, lcfg, n=n, temperature=rc.temperature, chunk=cfg.algo.logprob_chunk
    )
    a = cfg.algo
    kl_ctl = (
        kl_control.AdaptiveKLController(a.kl_coef, a.target_kl, a.kl_horizon)
        if a.kl_ctrl == "adaptive"
        else kl_control.FixedKLController(a.kl_coef)
    )
    critic = None
    if a.adv_estimator == "gae":
        from lorarl_jax.rl.critic import Critic

        # full-parameter critic: an NF4 base is dequantized for it (it trains every weight)
        dense = quant.dequantize_params(base, model_cfg.param_dtype)
        total = tc.steps * updates_per_step
        critic = Critic.create(
            model_cfg.dense,
            dense,
            cfg.critic,
            total,
            k_update,
            place,
            a.loss_agg_mode,
            a.loss_scale_factor,
        )
    n_ckpt = 0
    if tc.ckpt_interval or tc.resume:
        n_ckpt = tc.max_to_keep + 1  # orbax writes the next before it drops the oldest
    trainable = (lora, opt_state) + ((critic.params, critic.opt_state) if critic else ())
    run_dir.check_free_space(
        tc.output_dir, run_dir.tree_bytes(trainable), n_ckpt, run_dir.tree_bytes(lora)
    )
    ckpt = None
    if n_ckpt:
        ckpt = Checkpointer(
            os.path.join(tc.output_dir, "ckpt"),
            save_interval_steps=tc.ckpt_interval or tc.steps,
            max_to_keep=tc.max_to_keep,
            async_save=tc.async_checkpoint,
        )
    run = Run(
        cfg=cfg,
        model_cfg=model_cfg,
        lcfg=lcfg,
        model_dir=model_dir,
        tokenizer=tokenizer,
        base=base,
        lora=lora,
        ref_lora=ref_lora,
        opt_state=opt_state,
        lr_schedule=step_lib.lr_schedule(cfg.optim, tc.steps * updates_per_step),
        policy_step=policy_step,
        merge=_rollout_weights(cfg, model_cfg, lcfg, place),
        generate=shard_lib.make_generate(place),
        logprobs=logprobs,
        place=place,
        sampling=SamplingParams(rc.temperature, rc.top_k, rc.top_p),
        stop_ids=loaded.stop_ids,
        pad_id=pad_id,
        reward=reward,
        val_reward=reward,
        reward_columns=columns,
        dataset=dataset,
        data_iter=data_iter,
        val_examples=val_ex,
        num_overlong=n_over,
        keys={"rollout": k_rollout, "update": k_update, "root": root},
        kl_ctl=kl_ctl,
        critic=critic,
        ckpt=ckpt,
        logger=None,  # set below, once the start step is known
        updates_per_step=updates_per_step,
    )
    try:
        if tc.resume:
            _maybe_resume(run, rdir)
        if distributed.is_primary():  # only now: a refused run leaves the old record intact
            run_dir.write_record(tc.output_dir, cfg, lcfg, model_dir)
        run.logger = _logger(run)
    except BaseException:
        if ckpt is not None:  # orbax's threads, or its exit-time traceback, outlive the error
            ckpt.close()
        raise
    return run


def _logger(run: Run):
    tc = run.cfg.trainer
    return (
        MetricsLogger(
            tc.output_dir, tc.steps, tc.tensorboard, start_step=run.step + 1 if run.step else 0
        )
        if distributed.is_primary()
        else distributed.NullLogger()
    )


def _state(run: Run) -> dict:
    state = {
        "lora": run.lora,
        "opt_state": run.opt_state,
        "step": run.step,
        "rng": run.keys["root"],
        "data_state": run.data_iter.get_state(),
        "kl_ctl": {"value": float(run.kl_ctl.value)},
    }
    if run.critic is not None:
        state["critic"], state["critic_opt_state"] = run.critic.params, run.critic.opt_state
    return state


def _maybe_resume(run: Run, rdir: run_dir.RunDir) -> None:
    if not rdir.has_checkpoint:  # killed before its first checkpoint (run_dir.prepare)
        print(f"nothing saved yet in {rdir.ckpt}: restarting this run from step 0")
        return
    restored = restore_or_none(run.ckpt, _state(run), resume=True)
    run.lora, run.opt_state, run.step = restored["lora"], restored["opt_state"], restored["step"]
    if not jnp.array_equal(
        jax.random.key_data(restored["rng"]), jax.random.key_data(run.keys["root"])
    ):
        raise ValueError("checkpoint was written with another trainer.seed; use the same seed")
    run.data_iter.set_state(restored["data_state"])
    run.kl_ctl.value = float(restored["kl_ctl"]["value"])
    if run.critic is not None:
        run.critic.params, run.critic.opt_state = restored["critic"], restored["critic_opt_state"]
    print(f"resumed from {run.ckpt.directory} at step {run.step}")


def save_checkpoint(run: Run, force: bool = False) -> None:
    """Saves the step's state (on the checkpoint interval); never a non-finite adapter."""
    if run.ckpt is None:
        return
    if not math.isfinite(adapter_absmax(run.lora)):
        raise RunStopped(f"step {run.step}: the adapter holds NaN/inf; not checkpointed")
    run.ckpt.save(run.step, _state(run), force=force)


def export_final(run: Run) -> dict:
    """Waits for checkpoints, exports the PEFT adapter and the curves PNG."""
    tc = run.cfg.trainer
    out = {}
    if run.ckpt is not None:
        run.ckpt.close()
    lora = distributed.to_host(run.lora) if tc.export_adapter else None  # every process
    run.logger.close()
    if not distributed.is_primary():
        return out
    if tc.export_adapter:
        path = os.path.join(tc.output_dir, "adapter")
        hf.save_peft_adapter(lora, run.lcfg, path, base_model=run.model_dir)
        out["adapter"] = path
    png = os.path.join(tc.output_dir, "curves.png")
    if plot_metrics(os.path.join(tc.output_dir, "metrics.jsonl"), png):
        out["curves"] = png
    with open(os.path.join(tc.output_dir, "summary.json"), "w") as f:
        json.dump({k: v for k, v in out.items()}, f, indent=2)
    return out
