"""Rollout-vs-train mismatch correction (verl's `rollout_corr`: TIS and masked IS), pure.

The sampler and the trainer evaluate the same policy with different programs (a KV-cache decode
vs a full forward, other kernels or dtypes), so the tokens were drawn from π_sampler, not from
π_old. Importance weights ρ = π_old / π_sampler correct the policy gradient for the difference:

    token level:     log ρ_t = clip(old_logp_t − sampler_logp_t, −20, 20)
    sequence level:  log ρ   = mean_t over the response of log ρ_t   (the geometric mean, per row)
    truncate (TIS):  w = min(ρ, C)
    mask:            w = 1[1/C ≤ ρ ≤ C]   (tokens, or whole sequences, outside the band dropped)

`w` is detached and multiplies the per-token policy loss only (not the KL or entropy terms). The
loss denominator is left as it is, so a masked token counts as a zero-loss token. With ρ ≡ 1
every weight is 1 and the loss is unchanged (C ≥ 1 is validated in config.py).

Metrics (means over response tokens at token level, over non-empty sequences at sequence level;
with the mini-batch's counts as denominators they add up over micro-batches):
`rollout_is/ratio_mean`, `rollout_is/ratio_max`, and `rollout_is/truncated_frac` = mean[ρ > C]
(truncate) or `rollout_is/masked_frac` = mean[w = 0] (mask).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lorarl_jax.rl.losses import agg_denominator
from lorarl_jax.rl.masked import masked_sum

Array = jax.Array
LEVELS = ("none", "token", "sequence")
MODES = ("truncate", "mask")


def rollout_is_weights(
    old_logp_BxT: Array,
    sampler_logp_BxT: Array,
    mask_BxT: Array,
    *,
    level: str,
    mode: str,
    threshold: float,
    n_tokens: Array | None = None,
    n_seqs: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """(w_BxT detached, metrics) for `level` in {token, sequence} and `mode` in MODES.

    `n_tokens` / `n_seqs`: the mini-batch's response-token and non-empty-sequence counts used as
    the metrics' denominators (default: this batch's)."""
    m_BxT = mask_BxT.astype(jnp.float32)
    log_rho_BxT = jnp.clip(old_logp_BxT - sampler_logp_BxT, -20.0, 20.0).astype(jnp.float32)
    if level == "token":
        log_rho, unit = log_rho_BxT, m_BxT
        denom = agg_denominator(mask_BxT, "token-mean") if n_tokens is None else n_tokens
    elif level == "sequence":
        tokens_B = jnp.sum(m_BxT, axis=-1)
        log_rho = masked_sum(log_rho_BxT, m_BxT, axis=-1) / jnp.maximum(tokens_B, 1.0)
        unit = (tokens_B > 0).astype(jnp.float32)
        denom = agg_denominator(mask_BxT, "seq-mean-token-mean") if n_seqs is None else n_seqs
    else:
        raise ValueError(f"rollout_is level must be one of {list(LEVELS[1:])}, got {level!r}")
    rho = jnp.exp(log_rho)
    if mode == "truncate":
        w = jnp.minimum(rho, threshold)
        flagged, frac_key = rho > threshold, "rollout_is/truncated_frac"
    elif mode == "mask":
        keep = (rho >= 1.0 / threshold) & (rho <= threshold)
        w = keep.astype(jnp.float32)
        flagged, frac_key = ~keep, "rollout_is/masked_frac"
    else:
        raise ValueError(f"rollout_is_mode must be one of {list(MODES)}, got {mode!r}")
    metrics = {
        "rollout_is/ratio_mean": jnp.sum(rho * unit) / denom,
        "rollout_is/ratio_max": jnp.max(jnp.where(unit > 0, rho, 0.0)),
        frac_key: jnp.sum(flagged.astype(jnp.float32) * unit) / denom,
    }
    w_BxT = (w[:, None] if level == "sequence" else w) * m_BxT
    return jax.lax.stop_gradient(w_BxT), metrics
