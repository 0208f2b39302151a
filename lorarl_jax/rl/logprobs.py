"""Per-token log-probs and entropy of responses, one sequence chunk of the LM head at a time.

The training sequence is `prompt ‖ response` ([B, P + N]); the log-prob of response token t comes
from the hidden state at position P + t − 1. The decoder runs once to get hidden states; the LM
head, log-softmax and entropy then run over chunks of C response positions inside a `lax.scan`
whose body is rematerialised, so neither the forward nor the backward pass ever holds more than
one [B, C, V] slice of logits (V is 49k–262k for the supported families). With a frozen head
(LoRA) the chunk's gradient w.r.t. h is built in its forward pass instead (`_frozen_head_fwd`).

    logp_t = log softmax(z_t / τ)[y_t],   H_t = logsumexp(z/τ) − Σ_v softmax(z/τ)_v · z_v/τ
"""

from __future__ import annotations

import functools

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


def chunk_layout(n: int, chunk: int) -> tuple[int, int]:
    """(chunks K, positions per chunk C) for N positions and at most `chunk` per chunk: the fewest
    chunks, then the smallest C that covers N, so padding stays below K (N=48, chunk=32: 2 × 24,
    not 2 × 32 with 16 padded positions run through the LM head)."""
    k = -(-n // max(1, min(chunk, n)))
    return k, -(-n // k)


def _head(cfg: ModelConfig, base):
    """The LM head's parameter subtree: the tied embedding or `lm_head`."""
    return base["embed_tokens" if cfg.tie_word_embeddings else "lm_head"]


def _logp_entropy(z_BxCxV, y_BxC, temperature):
    """(logp, entropy, p, x) of tempered logits x = z / τ: logp = x[y] − lse(x), H = lse − Σ p x."""
    x = z_BxCxV / temperature
    lse = jax.nn.logsumexp(x, axis=-1)
    logp = jnp.take_along_axis(x, y_BxC[..., None], axis=-1)[..., 0] - lse
    p = jnp.exp(x - lse[..., None])
    ent = lse - jnp.sum(p * x, axis=-1)
    return logp, ent, p, x


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4, 5))
def _frozen_head_chunk(cfg, head, h_BxCxD, y_BxC, temperature, entropy_grad):
    """(logp, entropy) of one chunk through a frozen LM head, with the gradient w.r.t. h built in
    the forward pass (`_frozen_head_fwd`)."""
    z = _head_logits(cfg, head, h_BxCxD)
    logp, ent, _, _ = _logp_entropy(z, y_BxC, temperature)
    return logp, ent


def _head_logits(cfg, head, h_BxCxD):
    """= `Transformer.logits_from_hidden`. A tied head is applied as E·hᵀ ([V, B, C], then moved
    to [B, C, V]): written h·Eᵀ, XLA:CPU keeps a transposed copy of E (108 MiB for SmolLM2) in
    the policy step's temporaries; this form needs none, at the same speed and the same values."""
    if not cfg.tie_word_embeddings or cfg.dot_dtype:
        return Transformer(cfg).apply(
            {"params": {"lm_head": head}}, h_BxCxD, method=Transformer.logits_from_hidden
        )
    dt = cfg.compute_dtype
    e_VxD, h = head["embedding"].astype(dt), h_BxCxD.astype(dt)
    z_VxBxC = jax.lax.dot_general(e_VxD, h, (((1,), (h.ndim - 1,)), ((), ())))
    z = jnp.moveaxis(z_VxBxC, 0, -1).astype(jnp.float32)
    if cfg.final_logit_softcapping:
        cap = cfg.final_logit_softcapping
        z = jnp.tanh(z / cap) * cap
    return z


def _frozen_head_fwd(cfg, head, h_BxCxD, y_BxC, temperature, entropy_grad):
    """Each position's h feeds only its own logits, so ∂logp_t/∂h_t = J_tᵀ (onehot(y_t) − p_t)/τ
    and ∂H_t/∂h_t = J_tᵀ (−p_t ⊙ (x_t − Σ p_t x_t))/τ (J_t = ∂z_t/∂h_t, soft-cap included) are
    [B, C, D] vectors, computed here with one vector-Jacobian product each; the backward pass only
    scales them by the incoming cotangents. Per chunk: the logits once and one head-sized matmul
    per gradient (no [B, C, V] residual, no recomputation of the logits in the backward pass)."""
    z, vjp = jax.vjp(lambda h: _head_logits(cfg, head, h), h_BxCxD)
    logp, ent, p, x = _logp_entropy(z, y_BxC, temperature)
    onehot = jax.nn.one_hot(y_BxC, z.shape[-1], dtype=p.dtype)
    (g_logp,) = vjp((onehot - p) / temperature)
    g_ent = None
    if entropy_grad:
        mean_x = jnp.sum(p * x, axis=-1, keepdims=True)
        (g_ent,) = vjp(-p * (x - mean_x) / temperature)
    return (logp, ent), (head, g_logp, g_ent)


def _frozen_head_bwd(cfg, temperature, entropy_grad, res, cts):
    head, g_logp, g_ent = res
    ct_logp, ct_ent = cts
    g_h = ct_logp[..., None] * g_logp
    if entropy_grad:
        g_h = g_h + ct_ent[..., None] * g_ent
    # h's cotangent in h's dtype (f32 cotangents x bf16 vectors promote); the head is frozen:
    # its cotangent is zero (unused, XLA drops it)
    return jax.tree.map(jnp.zeros_like, head), g_h.astype(g_logp.dtype), None


_frozen_head_chunk.defvjp(_frozen_head_fwd, _frozen_head_bwd)


def chunked_logprobs(
    cfg: ModelConfig,
    base,
    h_BxNxD,
    targets_BxN,
    temperature=1.0,
    chunk=64,
    *,
    frozen_head: bool = False,
    entropy_grad: bool = True,
):
    """(logp_BxN, entropy_BxN) of `targets` under softmax(lm_head(h) / τ), ≤ `chunk` positions
    at a time (`chunk_layout`).

    `frozen_head=True` (LoRA: the head is part of the frozen base): a custom VJP builds each
    position's gradient w.r.t. h in the forward pass (`_frozen_head_fwd`): 2 head-sized matmuls
    per chunk instead of 3 (forward, rematerialised forward, backward), same gradients; with the
    entropy's gradient it is 3 either way. The head
    then gets a zero gradient, and with `entropy_grad=False` so does the entropy (a metric only,
    `algo.entropy_coeff` = 0): its gradient is not built. Otherwise the chunk body is autodiffed
    under `jax.checkpoint`, and the head gets its gradient (full-parameter RL)."""
    B, N, D = h_BxNxD.shape
    n_chunks, C = chunk_layout(N, chunk)
    pad = n_chunks * C - N
    h = jnp.pad(h_BxNxD, ((0, 0), (0, pad), (0, 0)))
    y = jnp.pad(targets_BxN, ((0, 0), (0, pad)))
    h_KxBxCxD = h.reshape(B, n_chunks, C, D).swapaxes(0, 1)
    y_KxBxC = y.reshape(B, n_chunks, C).swapaxes(0, 1)
    head = _head(cfg, base)

    if frozen_head:

        def one(h_BxCxD, y_BxC):
            return _frozen_head_chunk(cfg, head, h_BxCxD, y_BxC, temperature, entropy_grad)

    else:

        @jax.checkpoint
        def one(h_BxCxD, y_BxC):
            z = _head_logits(cfg, head, h_BxCxD)
            logp, ent, _, _ = _logp_entropy(z, y_BxC, temperature)
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
    **head_kw,
):
    """(logp_RxN, entropy_RxN) of the responses; prompts are computed once per group of n.
    `head_kw`: `chunked_logprobs`' frozen_head / entropy_grad."""
    h = shared_prompt_hidden(
        cfg, lcfg, base, lora, prompt_BxP, pmask_BxP, resp_RxN, rmask_RxN, n, dropout_key
    )
    return chunked_logprobs(cfg, base, h, resp_RxN, temperature, chunk, **head_kw)


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
    **head_kw,
):
    """Log-probs and entropy of the last `n_resp` tokens. `lora=None` is the reference model."""
    h = response_hidden(cfg, lcfg, base, lora, tokens_BxL, mask_BxL, n_resp, dropout_key)
    targets = tokens_BxL[:, -n_resp:]
    return chunked_logprobs(cfg, base, h, targets, temperature, chunk, **head_kw)
