"""Per-token log-probs and entropy of responses, one sequence chunk of the LM head at a time.

The training sequence is `prompt ‖ response` ([B, P + N]); the log-prob of response token t comes
from the hidden state at position P + t − 1. The decoder runs once to get hidden states; the LM
head, log-softmax and entropy then run over chunks of C response positions inside a `lax.scan`
whose body is rematerialised, so neither the forward nor the backward pass ever holds more than
one [B, C, V] slice of logits (V is 49k–262k for the supported families).

    logp_t = log softmax(z_t / τ)[y_t],   H_t = logsumexp(z/τ) − Σ_v softmax(z/τ)_v · z_v/τ
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lorarl_jax.model.config import ModelConfig
from lorarl_jax.model.lora import LoraConfig
from lorarl_jax.model.scan import hidden_states, init_train_cache, repeat_cache_rows
from lorarl_jax.model.transformer import Transformer, positions_from_mask


def response_hidden(cfg, lcfg, base, lora, tokens_BxL, mask_BxL, n_resp, dropout_key=None):
    """Final-normed hidden states that predict each response token: [B, N, D]."""
    variables = {"params": base} if lora is None else {"params": base, "lora": lora}
    h, _ = hidden_states(
        cfg,
        lcfg if lora is not None else None,
        variables,
        tokens_BxL,
        positions_from_mask(mask_BxL),
        mask_BxL,
        dropout_key=dropout_key,
    )
    L = tokens_BxL.shape[1]
    return h[:, L - n_resp - 1 : L - 1]


def chunked_logprobs(cfg: ModelConfig, base, h_BxNxD, targets_BxN, temperature=1.0, chunk=64):
    """(logp_BxN, entropy_BxN) of `targets` under softmax(lm_head(h) / τ), C positions at a time."""
    B, N, D = h_BxNxD.shape
    C = max(1, min(chunk, N))
    pad = (-N) % C
    h = jnp.pad(h_BxNxD, ((0, 0), (0, pad), (0, 0)))
    y = jnp.pad(targets_BxN, ((0, 0), (0, pad)))
    n_chunks = (N + pad) // C
    h_KxBxCxD = h.reshape(B, n_chunks, C, D).swapaxes(0, 1)
    y_KxBxC = y.reshape(B, n_chunks, C).swapaxes(0, 1)
    model = Transformer(cfg)

    @jax.checkpoint
    def one(h_BxCxD, y_BxC):
        z = model.apply({"params": base}, h_BxCxD, method=Transformer.logits_from_hidden)
        z = z / temperature
        lse = jax.nn.logsumexp(z, axis=-1)
        logp = jnp.take_along_axis(z, y_BxC[..., None], axis=-1)[..., 0] - lse
        ent = lse - jnp.sum(jax.nn.softmax(z, axis=-1) * z, axis=-1)
        return logp, ent

    _, (logp, ent) = jax.lax.scan(lambda c, xs: (c, one(*xs)), None, (h_KxBxCxD, y_KxBxC))
    logp = logp.swapaxes(0, 1).reshape(B, N + pad)[:, :N]
    ent = ent.swapaxes(0, 1).reshape(B, N + pad)[:, :N]
    return logp, ent


def shared_prompt_hidden(
    cfg, lcfg, base, lora, prompt_BxP, pmask_BxP, resp_RxN, rmask_RxN, n, dropout_key=None
):
    """Hidden states predicting each response token, with each prompt run once for its n samples.

    The prompt pass writes its keys/values into a cache (slots [0, P)); the cache is repeated n
    times and the responses attend to it from slots [P, P + N). Gradients flow back through the
    repeat into the single prompt pass, so the result (and its gradient) equals running the B·n
    concatenated sequences, for a fraction of the prompt compute.
    """
    lc = lcfg if lora is not None else None
    variables = {"params": base} if lora is None else {"params": base, "lora": lora}
    k1, k2 = (None, None) if dropout_key is None else jax.random.split(dropout_key)
    B, P = prompt_BxP.shape
    R, N = resp_RxN.shape
    kv_p = jnp.concatenate([pmask_BxP, jnp.zeros((B, N), pmask_BxP.dtype)], axis=1)
    pos_p = positions_from_mask(pmask_BxP)
    h_p, cache = hidden_states(
        cfg,
        lc,
        variables,
        prompt_BxP,
        pos_p,
        kv_p,
        init_train_cache(cfg, B, P + N),
        jnp.zeros((B,), jnp.int32),
        dropout_key=k1,
    )
    cache = repeat_cache_rows(cfg, cache, n)
    kv_r = jnp.concatenate([jnp.repeat(pmask_BxP, n, axis=0), rmask_RxN], axis=1)
    pos_r = jnp.repeat(pos_p[:, -1:] + 1, n, axis=0) + jnp.arange(N)[None, :]
    h_r, _ = hidden_states(
        cfg,
        lc,
        variables,
        resp_RxN,
        pos_r,
        kv_r,
        cache,
        jnp.full((R,), P, jnp.int32),
        dropout_key=k2,
    )
    first = jnp.repeat(h_p[:, -1:], n, axis=0)  # the last prompt position predicts token 0
    return jnp.concatenate([first, h_r[:, :-1]], axis=1)


def shared_prompt_logprobs(
    cfg: ModelConfig,
    lcfg: LoraConfig | None,
    base,
    lora,
    prompt_BxP,
    pmask_BxP,
    resp_RxN,
    rmask_RxN,
    n: int,
    temperature: float = 1.0,
    chunk: int = 64,
    dropout_key=None,
):
    """(logp_RxN, entropy_RxN) of the responses; prompts are computed once per group of n."""
    h = shared_prompt_hidden(
        cfg, lcfg, base, lora, prompt_BxP, pmask_BxP, resp_RxN, rmask_RxN, n, dropout_key
    )
    return chunked_logprobs(cfg, base, h, resp_RxN, temperature, chunk)


def batch_logprobs(cfg: ModelConfig, lcfg, base, lora, batch, *, n, temperature, chunk):
    """`shared_prompt_logprobs` of a train batch dict (prompt_tokens / prompt_mask / responses /
    response_mask): the old policy with `lora`, the reference with `lora=None`. Not jitted:
    `step.compute_logprobs` is the single-device program, `rl/programs.py` the sharded one."""
    return shared_prompt_logprobs(
        cfg,
        lcfg,
        base,
        lora,
        batch["prompt_tokens"],
        batch["prompt_mask"],
        batch["responses"],
        batch["response_mask"],
        n,
        temperature,
        chunk,
    )


def token_logprobs(
    cfg: ModelConfig,
    lcfg: LoraConfig | None,
    base,
    lora,
    tokens_BxL,
    mask_BxL,
    n_resp: int,
    temperature: float = 1.0,
    chunk: int = 64,
    dropout_key=None,
):
    """Log-probs and entropy of the last `n_resp` tokens. `lora=None` is the reference model."""
    h = response_hidden(cfg, lcfg, base, lora, tokens_BxL, mask_BxL, n_resp, dropout_key)
    targets = tokens_BxL[:, -n_resp:]
    return chunked_logprobs(cfg, base, h, targets, temperature, chunk)
