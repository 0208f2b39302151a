"""PPO critic: a full-parameter value model (a copy of the base plus a scalar head).

The seed note advises against a LoRA critic (value estimates need capacity), so the critic copies
the base weights and trains all of them with its own AdamW. V(s_t) for response token t is read
from the hidden state at position P + t − 1 (the state before the token is generated), as verl.
Loss: ½·max((V − R)², (clip(V, V_old ± ε_v) − R)²), aggregated like the policy loss.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lorarl_jax.config import CriticCfg
from lorarl_jax.model.config import ModelConfig
from lorarl_jax.model.transformer import Transformer, positions_from_mask
from lorarl_jax.rl import losses


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


@dataclasses.dataclass
class Critic:
    cfg: ModelConfig
    ccfg: CriticCfg
    loss_agg_mode: str
    params: Any
    opt_state: Any
    tx: Any

    @classmethod
    def create(cls, cfg, base, ccfg: CriticCfg, total_steps: int, key, loss_agg_mode="token-mean"):
        head = ValueModel(cfg).init(key, jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), jnp.int32))[
            "params"
        ]["value_head"]
        params = {"backbone": jax.tree.map(jnp.copy, base), "value_head": head}
        sched = (
            optax.join_schedules(
                [
                    optax.linear_schedule(0.0, ccfg.lr, max(ccfg.warmup_steps, 1)),
                    optax.constant_schedule(ccfg.lr),
                ],
                [max(ccfg.warmup_steps, 1)],
            )
            if ccfg.warmup_steps
            else ccfg.lr
        )
        tx = optax.chain(optax.clip_by_global_norm(ccfg.grad_clip), optax.adamw(sched))
        return cls(cfg, ccfg, loss_agg_mode, params, tx.init(params), tx)

    def values(self, tokens, attn, n_resp: int) -> np.ndarray:
        return np.asarray(
            _values(self.cfg, self.params, jnp.asarray(tokens), jnp.asarray(attn), n_resp)
        )

    def update(self, mb) -> dict:
        self.params, self.opt_state, m = _critic_step(
            self.cfg,
            self.tx,
            self.ccfg.cliprange_value,
            self.loss_agg_mode,
            self.params,
            self.opt_state,
            mb,
        )
        return m


@functools.partial(jax.jit, static_argnames=("cfg", "n_resp"))
def _values(cfg, params, tokens, attn, n_resp):
    return response_values(cfg, params, tokens, attn, n_resp)


@functools.partial(jax.jit, static_argnames=("cfg", "tx", "clip", "agg"), donate_argnums=(4, 5))
def _critic_step(cfg, tx, clip, agg, params, opt_state, mb):
    N = mb["response_mask"].shape[1]

    def loss_fn(p):
        v = response_values(cfg, p, mb["tokens"], mb["attention_mask"], N)
        return losses.value_loss(v, mb["values"], mb["returns"], mb["response_mask"], clip, agg)

    (loss, m), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(g, opt_state, params)
    params = optax.apply_updates(params, updates)
    out = {"critic/vf_loss": loss, "critic/grad_norm": optax.tree.norm(g)}
    out.update({f"critic/{k}": v for k, v in m.items()})
    return params, opt_state, out
