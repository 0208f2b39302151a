"""Builds a run once: static facts, the jitted programs, the initial state and its resources.

`build(cfg)` checks the output directory (`run_dir.prepare`: nothing is written before every
check passes), loads the model with plain arguments (`model/load.py`), attaches the adapter,
encodes the prompts, and assembles a `Run`: `static` (`rl/state.py`: configs, model config,
tokenizer, batch sizes, generation specs), `programs` (`rl/programs.py`: every jitted function,
built once), `state` (the `TrainState` pytree a checkpoint saves) and the resources the loop
reads (the frozen base, the placement, the data iterator, rewards, checkpointer, logger).
Resuming restores the whole `TrainState` and the data iterator's position from the newest
restorable orbax checkpoint; the frozen base is always re-read from the model path, never saved.
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
from lorarl_jax.config_batches import batch_sizes
from lorarl_jax.metrics import MetricsLogger, plot_metrics
from lorarl_jax.model import hf, quant
from lorarl_jax.model.load import LoadedModel, load_model
from lorarl_jax.model.lora import init_lora, lora_logical_axes
from lorarl_jax.model.transformer import abstract_params
from lorarl_jax.rl import critic as critic_lib
from lorarl_jax.rl import kl_control, policy
from lorarl_jax.rl import sharding as shard_lib
from lorarl_jax.rl import step as step_lib
from lorarl_jax.rl.guards import RunStopped, adapter_absmax
from lorarl_jax.rl.programs import CriticSpec, Programs, build_programs
from lorarl_jax.rl.rewards import RewardManager
from lorarl_jax.rl.state import REWARD_COLUMNS, Static, TrainState, split_root
from lorarl_jax.sampling.sampler import GenerateSpec, SamplingParams


@dataclasses.dataclass
class Run:
    """A built run. `state` is replaced after every step; everything else stays."""

    static: Static
    programs: Programs
    state: TrainState
    base: Any  # the frozen base weights on the mesh (NF4 kernels for QLoRA)
    ref_lora: Any  # algo.reference=init_adapter: the initial adapter; None: zero delta (base)
    place: shard_lib.Placement
    data_iter: Any  # grain iterator of prompt batches (its position is checkpointed)
    val_examples: list
    num_overlong: int  # training prompts dropped or truncated by rollout.max_prompt_length
    reward: RewardManager
    kl_ctl: Any  # kl_control.*: how state.kl_coef moves (KL in the reward)
    ckpt: Checkpointer | None
    logger: Any


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
    if lcfg.full:  # the policy starts as a copy of the base, which stays as the reference
        return jax.tree.map(jnp.copy, base), lcfg
    if cfg.init_adapter_path:
        lora, lcfg = hf.load_peft_adapter(cfg.init_adapter_path)
        lora = jax.tree.map(jnp.asarray, lora)
    else:
        lora = init_lora(base, lcfg, key)
    axes = lora_logical_axes(mesh_lib.logical_axes(abstract_params(model_cfg)), lora)
    # from host copies: every process holds the same values, and places its own shards
    lora = jax.device_put(jax.device_get(lora), mesh_lib.logical_to_sharding(axes, mesh))
    return lora, lcfg


def _notes(cfg: RunConfig) -> None:
    a = cfg.algo
    if a.adv_estimator == "drgrpo" and a.loss_agg_mode != "seq-mean-token-sum-norm":
        print(
            f"note: algo.adv_estimator=drgrpo with loss_agg_mode={a.loss_agg_mode!r} is "
            "half of Dr.GRPO; its recipe adds --config.algo.loss_agg_mode=seq-mean-token-sum-norm "
            f"(a constant C = algo.loss_scale_factor = {a.loss_scale_factor:g}), as "
            "configs/drgrpo_smollm2.py does"
        )


def _static(cfg: RunConfig, loaded: LoadedModel, pad_id: int) -> Static:
    rc = cfg.rollout
    rollout = GenerateSpec(
        rc.num_generations,
        rc.max_new_tokens,
        loaded.stop_ids,
        pad_id,
        SamplingParams(rc.temperature, rc.top_k, rc.top_p),
    )
    greedy = dataclasses.replace(rollout, n=1, sampling=SamplingParams(greedy=True))
    return Static(
        cfg, loaded.cfg, loaded.model_dir, loaded.tokenizer, batch_sizes(cfg), rollout, greedy
    )


def _prompts(cfg: RunConfig, tokenizer, pad_id: int, reward: RewardManager):
    """(train iterator, val examples, overlong count); every row's reward columns validated."""
    rc, dc = cfg.rollout, cfg.data
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
    # every row's data_source and columns up front, not at the first step that samples it
    reward.validate({k: [e[k] for e in train_ex + val_ex] for k in REWARD_COLUMNS})
    dataset = data_lib.prompt_dataset(
        train_ex,
        batch_size=dc.batch_size,
        max_prompt_length=rc.max_prompt_length,
        pad_id=pad_id,
        seed=cfg.trainer.seed,
        shuffle=dc.shuffle,
        # the global batch on every process (deterministic, small): each puts its own rows on
        # the mesh (sharding.Placement.put), so any process count gives the single-process run
        process_index=0,
        process_count=1,
        pad_multiple=dc.pad_multiple,
    )
    return iter(dataset), val_ex, n_over


def _check_mesh(static: Static, mesh, has_val: bool) -> None:
    sizes, dc, n = static.sizes, static.cfg.data, static.rollout.n
    batches = {
        "data.batch_size": sizes.prompts,
        "algo.ppo_mini_batch_size": sizes.prompts_per_update,
        # a micro-batch of part of a group holds that sub-group's one prompt
        f"algo.micro_batch_size={sizes.rows_per_micro} / rollout.num_generations={n}": max(
            1, sizes.rows_per_micro // n
        ),
    }
    if has_val:
        batches["data.val_batch_size"] = dc.val_batch_size
    shard_lib.check_batch_sizes(mesh, batches)


def _kl_controller(a):
    if a.kl_ctrl == "adaptive":
        return kl_control.AdaptiveKLController(a.kl_coef, a.target_kl, a.kl_horizon)
    return kl_control.FixedKLController(a.kl_coef)


def _checkpointer(cfg: RunConfig, state: TrainState) -> Checkpointer | None:
    """The orbax checkpointer (None without checkpoints), after the free-space check."""
    tc = cfg.trainer
    n_ckpt = tc.max_to_keep + 1 if (tc.ckpt_interval or tc.resume) else 0  # + the one writing
    trainable = (state.lora, state.opt_state, state.critic_params, state.critic_opt_state)
    run_dir.check_free_space(
        tc.output_dir, run_dir.tree_bytes(trainable), n_ckpt, run_dir.tree_bytes(state.lora)
    )
    if not n_ckpt:
        return None
    return Checkpointer(
        os.path.join(tc.output_dir, "ckpt"),
        save_interval_steps=tc.ckpt_interval or tc.steps,
        max_to_keep=tc.max_to_keep,
        async_save=tc.async_checkpoint,
    )


def build(cfg: RunConfig) -> Run:
    _notes(cfg)
    rdir = run_dir.prepare(cfg)  # refuses a previous run, an unwritable dir; writes nothing
    tc, a = cfg.trainer, cfg.algo
    distributed.initialize(tc)  # before the first JAX computation
    mesh = mesh_lib.make_mesh(tuple(tc.mesh))
    rng = distributed.replicated_key(jax.random.key(tc.seed), mesh)  # saved in checkpoints
    k_lora, _, k_update = split_root(rng)
    loaded = _load_model(cfg, mesh)
    base = loaded.params
    lora, lcfg = _init_adapter(cfg, loaded.cfg, base, k_lora, mesh)
    cfg = dataclasses.replace(cfg, lora=lcfg)  # a loaded PEFT adapter's shape: one source
    pad_id = data_lib.pad_id_of(loaded.tokenizer)
    static = _static(cfg, loaded, pad_id)
    reward = RewardManager(
        cfg.data.reward_fns, cfg.data.reward_weights or None, cfg.data.reward_timeout_s
    )
    data_iter, val_ex, n_over = _prompts(cfg, loaded.tokenizer, pad_id, reward)
    _check_mesh(static, mesh, bool(val_ex))

    labels = None
    if lcfg.full:
        labels = policy.param_labels(base, cfg.full)
        policy.check_labels(labels, cfg.full)
    tx = step_lib.make_optimizer(cfg.optim, static.sizes.total_updates, labels)
    place = shard_lib.make_placement(mesh, loaded.cfg, base, lora, tx, lcfg.scale, lcfg.full)
    critic_spec, critic_state = None, (None, None)
    if a.adv_estimator == "gae":  # full-parameter critic: an NF4 base is dequantized for it
        dense = quant.dequantize_params(base, loaded.cfg.param_dtype)
        ctx = critic_lib.critic_tx(cfg.critic, static.sizes.total_updates)
        c_params, c_opt, c_psh, c_osh = critic_lib.init_critic(
            loaded.cfg.dense, dense, k_update, ctx, mesh
        )
        critic_spec, critic_state = CriticSpec(ctx, c_psh, c_osh), (c_params, c_opt)
    programs = build_programs(static, place, tx, critic_spec, labels)
    kl_ctl = _kl_controller(a)
    state = TrainState(
        lora, programs.init_opt_state(lora), rng, 0, kl_ctl.value, *critic_state, full=lcfg.full
    )
    ckpt = _checkpointer(cfg, state)
    ref_lora = jax.tree.map(jnp.copy, lora) if a.reference == "init_adapter" else None
    run = Run(
        static,
        programs,
        state,
        base,
        ref_lora,
        place,
        data_iter,
        val_ex,
        n_over,
        reward,
        kl_ctl,
        ckpt,
        logger=None,
    )
    try:
        if tc.resume:
            _maybe_resume(run, rdir)
        if distributed.is_primary():  # only now: a refused run leaves the old record intact
            run_dir.write_record(tc.output_dir, cfg, lcfg, loaded.model_dir)
        run.logger = _logger(run)
    except BaseException:
        if ckpt is not None:  # orbax's threads, or its exit-time traceback, outlive the error
            ckpt.close()
        raise
    return run


def _logger(run: Run):
    tc, step = run.static.cfg.trainer, run.state.step
    if not distributed.is_primary():
        return distributed.NullLogger()
    return MetricsLogger(
        tc.output_dir, tc.steps, tc.tensorboard, start_step=step + 1 if step else 0
    )


def _maybe_resume(run: Run, rdir: run_dir.RunDir) -> None:
    if not rdir.has_checkpoint:  # killed before its first checkpoint (run_dir.prepare)
        print(f"nothing saved yet in {rdir.ckpt}: restarting this run from step 0")
        return
    like = run.state.checkpoint_items(run.data_iter.get_state())
    restored = restore_or_none(run.ckpt, like, resume=True)
    if not jnp.array_equal(
        jax.random.key_data(restored["rng"]), jax.random.key_data(run.state.rng)
    ):
        raise ValueError("checkpoint was written with another trainer.seed; use the same seed")
    run.state = run.state.from_checkpoint_items(restored)
    run.data_iter.set_state(restored["data_state"])
    print(f"resumed from {run.ckpt.directory} at step {run.state.step}")


def save_checkpoint(run: Run, force: bool = False) -> None:
    """Saves the step's state (on the checkpoint interval); never a non-finite adapter."""
    state = run.state
    if run.ckpt is None or not (force or run.ckpt.should_save(state.step)):
        return
    if not math.isfinite(adapter_absmax(state.lora)):  # only when this step is written
        what = "the policy's parameters hold" if state.full else "the adapter holds"
        raise RunStopped(f"step {state.step}: {what} NaN/inf; not checkpointed")
    run.ckpt.save(state.step, state.checkpoint_items(run.data_iter.get_state()), force=force)


def export_final(run: Run) -> dict:
    """Waits for checkpoints, exports the PEFT adapter (full mode: the HF model, `model/`) and
    the curves PNG."""
    tc, static = run.static.cfg.trainer, run.static
    out = {}
    if run.ckpt is not None:
        run.ckpt.close()
    lora = distributed.to_host(run.state.lora) if tc.export_adapter else None  # every process
    run.logger.close()
    if not distributed.is_primary():
        return out
    if tc.export_adapter and static.full:
        path = os.path.join(tc.output_dir, "model")
        hf.save_hf_model(lora, path, src_dir=static.model_dir)
        out["model"] = path
    elif tc.export_adapter:
        path = os.path.join(tc.output_dir, "adapter")
        hf.save_peft_adapter(lora, static.lcfg, path, base_model=static.model_dir)
        out["adapter"] = path
    png = os.path.join(tc.output_dir, "curves.png")
    if plot_metrics(os.path.join(tc.output_dir, "metrics.jsonl"), png):
        out["curves"] = png
    with open(os.path.join(tc.output_dir, "summary.json"), "w") as f:
        json.dump({k: v for k, v in out.items()}, f, indent=2)
    return out
