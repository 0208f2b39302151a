"""PPO critic: a full-parameter value model (a copy of the base plus a scalar head).

The seed note advises against a LoRA critic (value estimates need capacity), so the critic copies
the base weights and trains all of them with its own AdamW. V(s_t) for response token t is read
from the hidden state at position P + t − 1 (the state before the token is generated), as verl.
Loss: ½·max((V − R)², (clip(V, V_old ± ε_v) − R)²), aggregated like the policy loss.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lorarl_jax import mesh as mesh_lib
from lorarl_jax.config import CriticCfg, OptimCfg
from lorarl_jax.model.config import ModelConfig
from lorarl_jax.model.transformer import Transformer, abstract_params, positions_from_mask
from lorarl_jax.rl import losses
from lorarl_jax.rl import step as step_lib
from lorarl_jax.rl.sharding import opt_state_shardings


class ValueModel(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BxL, mask_BxL):
        h, _ = Transformer(self.cfg, name="backbone")(
            tokens_BxL, positions_from_mask(mask_BxL), mask_BxL, return_hidden=True
        )
        v = nn.Dense(1, name="value_head", kernel_init=nn.initializers.zeros)(h.astype(jnp.float32))
        return v[..., 0]


def response_values(cfg, params, tokens_BxL, mask_BxL, n_resp: int):
    """V for each response token: [B, N]."""
    v_BxL = ValueModel(cfg).apply({"params": params}, tokens_BxL, mask_BxL)
    L = tokens_BxL.shape[1]
    return v_BxL[:, L - n_resp - 1 : L - 1]


def critic_shardings(cfg: ModelConfig, mesh, params, tx):
    """`params` (arrays or shapes) → (params, opt_state) shardings: the backbone as the base
    (`mesh.LOGICAL_RULES`), the value head replicated, AdamW's moments as their parameters, its
    step counters replicated."""
    repl = mesh_lib.replicated(mesh)
    params_sh = {
        "backbone": mesh_lib.param_shardings(abstract_params(cfg), mesh),
        "value_head": jax.tree.map(lambda _: repl, params["value_head"]),
    }
    return params_sh, opt_state_shardings(tx, params, params_sh, mesh)


def critic_tx(ccfg: CriticCfg, total_steps: int) -> optax.GradientTransformation:
    """The policy's clip + AdamW + warmup (`step.adamw`) with optax.adamw's default decay."""
    ocfg = OptimCfg(
        lr=ccfg.lr, warmup_steps=ccfg.warmup_steps, grad_clip=ccfg.grad_clip, weight_decay=1e-4
    )
    return step_lib.adamw(ocfg, total_steps)


def init_critic(cfg: ModelConfig, base, key, tx, mesh):
    """(params, opt_state, params_sh, opt_sh): a copy of the dense `base` (on the mesh) as the
    backbone, a zero value head, AdamW state; shardings from `critic_shardings`."""
    head = ValueModel(cfg).init(key, jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), jnp.int32))[
        "params"
    ]["value_head"]
    params_sh, opt_sh = critic_shardings(cfg, mesh, {"backbone": base, "value_head": head}, tx)
    params = jax.jit(  # a copy: the critic step donates its params, the base stays
        lambda b, h: {"backbone": jax.tree.map(jnp.copy, b), "value_head": h},
        out_shardings=params_sh,
    )(base, jax.device_put(jax.device_get(head), params_sh["value_head"]))
    opt_state = jax.jit(tx.init, in_shardings=(params_sh,), out_shardings=opt_sh)(params)
    return params, opt_state, params_sh, opt_sh


def critic_step(params, opt_state, mb, *, cfg, tx, clip, agg, scale):
    """One AdamW step of the clipped value loss on a mini-batch → (params, opt_state, metrics)."""
    N = mb["response_mask"].shape[1]

    def loss_fn(p):
        v = response_values(cfg, p, mb["tokens"], mb["attention_mask"], N)
        m = step_lib.loss_mask(mb)
        return losses.value_loss(v, mb["values"], mb["returns"], m, clip, agg, scale)

    (loss, m), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(g, opt_state, params)
    params = optax.apply_updates(params, updates)
    out = {"critic/vf_loss": loss, "critic/grad_norm": optax.tree.norm(g)}
    out.update({f"critic/{k}": v for k, v in m.items()})
    return params, opt_state, out
