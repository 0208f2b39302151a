"""Every jitted program of a run, built once, with its shardings and donation.

Design: `build_programs(static, place, tx, critic)` is the one place a run compiles anything.
Each program is a pure function of `model/`, `sampling/` or `rl/` jitted here with the
`Placement`'s shardings (`rl/sharding.py`), host arrays in and host arrays out where the loop
needs them on the host:

  merge(base, lora) → DecodeWeights        W + s·A·B laid out for decode (rollout.merge), or the
                                           base and adapter passed through unmerged (full-
                                           parameter mode: the trained params as they are)
  generate(w, prompts, mask, key, spec)    `sampler.sample` for a `GenerateSpec` (static): the
                                           rollout spec or the greedy evaluation spec
  logprobs(base, lora, batch)              π_old: (logp, entropy) of the sampled responses
  ref_logprobs(base, batch)                π_ref: the base with a zero adapter delta (full mode:
                                           the frozen initial weights, rl/policy.py)
  policy_step(lora, opt, base, mb, key)    `step.make_policy_step`: value_and_grad w.r.t. the
                                           adapter, AdamW masked to it, lora/opt donated
  critic_values / critic_update            PPO only (`rl/critic.py`)

The training steps compile ahead of their first call (`compile_then_trim`): compiling the
unrolled policy step leaves ~0.25 GiB of freed compiler heap resident, and XLA:CPU's ~1.1 GiB of
temporaries would otherwise be allocated on top of it (the demo's peak RSS, measured).

τ has one source: the rollout spec's temperature is what the sampler draws with and what the
log-prob programs and the policy step divide the logits by.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax

from lorarl_jax import process
from lorarl_jax.distributed import to_host
from lorarl_jax.rl import critic as critic_lib
from lorarl_jax.rl import policy as policy_lib
from lorarl_jax.rl import step as step_lib
from lorarl_jax.rl.logprobs import batch_logprobs
from lorarl_jax.rl.sharding import Placement
from lorarl_jax.rl.state import Static
from lorarl_jax.sampling import rollout_weights
from lorarl_jax.sampling.sampler import GenerateSpec, sample


@dataclasses.dataclass(frozen=True)
class CriticSpec:
    """What the critic programs need: its optimizer and the shardings of its state."""

    tx: object
    params_sh: object
    opt_sh: object


@dataclasses.dataclass(frozen=True)
class Programs:
    merge: Callable  # (base, lora) → rollout_weights.DecodeWeights
    generate: Callable  # (weights, host prompts, host mask, key, spec) → host Rollout
    logprobs: Callable  # (base, lora, host batch) → host (logp_RxN, entropy_RxN)
    ref_logprobs: Callable  # (base, host batch) → host logp_RxN
    policy_step: Callable  # (lora, opt_state, base, mb, key) → (lora, opt_state, metrics)
    init_opt_state: Callable  # lora → opt_state (sharded as the adapter)
    lr: Callable  # optimizer updates so far → learning rate (for the metrics)
    critic_values: Callable | None = None  # (params, host tokens, host attn, n) → host V_BxN
    critic_update: Callable | None = None  # (params, opt, mb) → (params, opt, metrics)


def compile_then_trim(jitted):
    """`jitted` that, on the first call with a new argument signature (tree structure, shapes,
    dtypes), compiles it ahead (`lower(...).compile()`, which fills jit's own cache: the call
    does not compile again) and hands the compiler's freed heap back to the system
    (`process.release_free_memory`) before running it. Same results; a lower peak RSS."""
    if not hasattr(jitted, "lower"):  # not a jax.jit function (a test's stand-in)
        return jitted
    seen = set()

    def call(*args):
        leaves, tree = jax.tree.flatten(args)
        sig = (tree, tuple((x.shape, str(x.dtype)) for x in leaves))
        if sig not in seen:
            jitted.lower(*args).compile()
            process.release_free_memory()
            seen.add(sig)
        return jitted(*args)

    return call


def _merge(static: Static, place: Placement):
    """`rollout.merge`: merged weights (laid out for decode) or base + adapter unmerged; full
    mode: the policy's parameters as they are (`rl/policy.py`)."""
    cfg, model_cfg, lcfg = static.cfg, static.model_cfg, static.lcfg
    wd = cfg.rollout.weight_dtype  # "" or bfloat16: config.py checked it has merged fp32 weights
    decode_cfg = model_cfg.replace(dot_dtype=wd) if wd else model_cfg
    if wd:
        print(f"rollout.weight_dtype={wd}: decode on the merged weights rounded to {wd}")
    if static.full:
        if not wd:
            return lambda base, params: rollout_weights.DecodeWeights(model_cfg, params)
        cast = jax.jit(lambda p: rollout_weights.round_weights(p, wd))
        return lambda base, params: rollout_weights.DecodeWeights(decode_cfg, cast(params))
    merged, why = rollout_weights.resolve_merge(cfg.rollout.merge, model_cfg)
    quiet = model_cfg.quantization == "none" and not rollout_weights.low_precision(model_cfg)
    if not quiet or cfg.rollout.merge != "auto":
        print(why)
    merge_fn = None
    if merged:
        merge_fn = rollout_weights.jit_merge(
            model_cfg, lcfg, (place.base, place.lora), place.decode, weight_dtype=wd
        )
    return rollout_weights.make_rollout_weights(decode_cfg, lcfg, merge_fn)


def _generate(place: Placement):
    """Host prompts in, host `Rollout` out; merged weights (`place.decode`) or, with an
    unmerged adapter, the base as stored (`place.base`) + the adapter (`place.lora`)."""
    batch, repl = place.batch, place.replicated

    def run(params, tokens, mask, key, cfg, spec, lcfg=None, lora=None):
        return sample(cfg, params, tokens, mask, key, spec, lora, lcfg)

    static = dict(static_argnums=(4, 5, 6), out_shardings=repl)
    merged = jax.jit(run, in_shardings=(place.decode, batch, batch, repl), **static)
    unmerged = jax.jit(run, in_shardings=(place.base, batch, batch, repl, place.lora), **static)

    def generate(w: rollout_weights.DecodeWeights, tokens_BxP, mask_BxP, key, spec: GenerateSpec):
        tokens, mask = place.put((tokens_BxP, mask_BxP))
        if w.lora is None:
            return to_host(merged(w.params, tokens, mask, key, w.cfg, spec))
        return to_host(unmerged(w.params, tokens, mask, key, w.cfg, spec, w.lcfg, w.lora))

    return generate


def _logprobs(static: Static, place: Placement):
    kw = dict(
        n=static.rollout.n, temperature=static.temperature, chunk=static.cfg.algo.logprob_chunk
    )
    cfg, repl = static.model_cfg, place.replicated
    lcfg = static.lcfg

    def policy_logprobs(base, lora, b):
        params, adapter = policy_lib.forward_variables(lcfg, base, lora)
        return batch_logprobs(cfg, lcfg, params, adapter, b, **kw)

    policy = jax.jit(
        policy_logprobs,
        in_shardings=(place.base, place.lora, place.batch),
        out_shardings=repl,
    )
    ref = jax.jit(  # (logp, entropy) as π_old's, so both compile to the same computation
        lambda base, b: batch_logprobs(cfg, None, base, None, b, **kw),
        in_shardings=(place.base, place.batch),
        out_shardings=repl,
    )
    return (
        lambda base, lora, batch: to_host(policy(base, lora, place.put(batch))),
        lambda base, batch: to_host(ref(base, place.put(batch)))[0],
    )


def _critic(static: Static, place: Placement, spec: CriticSpec):
    cfg, batch, repl = static.model_cfg.dense, place.batch, place.replicated
    values = jax.jit(
        lambda params, tokens, attn, n_resp: critic_lib.response_values(
            cfg, params, tokens, attn, n_resp
        ),
        static_argnums=(3,),
        in_shardings=(spec.params_sh, batch, batch),
        out_shardings=repl,
    )
    a = static.cfg.algo
    update = jax.jit(
        functools.partial(
            critic_lib.critic_step,
            cfg=cfg,
            tx=spec.tx,
            clip=static.cfg.critic.cliprange_value,
            agg=a.loss_agg_mode,  # verl's critic inherits the policy's aggregation
            scale=a.loss_scale_factor,
        ),
        in_shardings=(spec.params_sh, spec.opt_sh, batch),
        out_shardings=(spec.params_sh, spec.opt_sh, repl),
        donate_argnums=(0, 1),
    )

    def critic_values(params, tokens, attn, n_resp: int):
        tokens, attn = place.put((tokens, attn))
        return to_host(values(params, tokens, attn, n_resp))

    return critic_values, update


def build_programs(
    static: Static, place: Placement, tx, critic: CriticSpec | None = None, labels=None
) -> Programs:
    """Every program of the run (module docstring); nothing is compiled until first called.
    `labels`: full-parameter mode's TRAIN / FREEZE tree (`rl/policy.py`)."""
    sizes, algo = static.sizes, static.cfg.algo
    policy_step = step_lib.make_policy_step(
        static.model_cfg,
        static.lcfg,
        algo,
        tx,
        static.temperature,
        static.rollout.n,
        sizes.n_micro,
        shardings=place.step_shardings(),
        labels=labels,
        group_split=sizes.group_split,
    )
    logprobs, ref_logprobs = _logprobs(static, place)
    critic_values = critic_update = None
    if critic is not None:
        critic_values, critic_update = _critic(static, place, critic)
    return Programs(
        merge=_merge(static, place),
        generate=_generate(place),
        logprobs=logprobs,
        ref_logprobs=ref_logprobs,
        policy_step=compile_then_trim(policy_step),
        init_opt_state=jax.jit(tx.init, in_shardings=(place.lora,), out_shardings=place.opt_state),
        lr=step_lib.lr_schedule(static.cfg.optim, sizes.total_updates),
        critic_values=critic_values,
        critic_update=None if critic_update is None else compile_then_trim(critic_update),
    )
