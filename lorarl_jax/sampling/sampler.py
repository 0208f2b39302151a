"""KV-cache sampler on merged weights: jitted prefill, insert and decode primitives.

Design
- The trainer merges the adapter into the base once per RL step; the sampler only ever sees plain
  params (`Transformer(cfg)` without a LoRA collection), so decode pays no adapter compute.
- A `DecodeState` holds, per slot (row): the KV cache [B, S, K, Dh], which cache slots are valid,
  the next write slot, the next RoPE position, the last token and a done flag. `prefill` builds one
  from a left-padded prompt batch; `insert` copies prefilled rows into slots of a larger state (what
  a JetStream engine needs for continuous batching); `decode_step` advances every slot by one token.
- `generate` = prefill once per prompt, repeat each row `n` times (no re-prefill per sample), then a
  `lax.while_loop` of decode steps that stops at `max_new_tokens` or when every row has emitted a
  stop id. Sample `i·n + j` is generation j of prompt i (contiguous groups, as GRPO expects).
- Log-probs returned are log-softmax(logits / temperature) at the chosen token: the tempered
  distribution before top-k/top-p truncation, which is exactly what the trainer recomputes.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp

from lorarl_jax.model.config import ModelConfig
from lorarl_jax.model.transformer import Transformer, init_cache, positions_from_mask


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    greedy: bool = False

    def __post_init__(self):
        if self.temperature <= 0 and not self.greedy:
            raise ValueError("rollout.temperature must be > 0 (use greedy=True for argmax)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"rollout.top_k must be >= 0, got {self.top_k}")


@flax.struct.dataclass
class DecodeState:
    cache: list  # per layer {'k','v'}: [B, S, K, Dh]
    kv_mask: jax.Array  # [B, S] int32: 1 where the slot holds a real token
    index: jax.Array  # [B] int32: next cache slot to write
    pos: jax.Array  # [B] int32: RoPE position of the next token
    token: jax.Array  # [B] int32: last token (input of the next decode step)
    done: jax.Array  # [B] bool


@flax.struct.dataclass
class Rollout:
    tokens: jax.Array  # [B·n, N] generated ids, pad after the stop token
    mask: jax.Array  # [B·n, N] 1 up to and including the stop token
    logp: jax.Array  # [B·n, N] sampler log-probs (tempered), 0 where mask is 0
    lengths: jax.Array  # [B·n]


def sample_token(logits_BxV, key, sp: SamplingParams):
    """Returns (token_B, logp_B): logp under softmax(logits / T) of the chosen token."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    if sp.greedy:
        tok = jnp.argmax(logits_BxV, axis=-1)
        logp = jax.nn.log_softmax(logits_BxV, axis=-1)
        return tok.astype(jnp.int32), jnp.take_along_axis(logp, tok[:, None], -1)[:, 0]
    scaled = logits_BxV / sp.temperature
    filt = scaled
    if sp.top_k > 0:
        kth = jax.lax.top_k(scaled, sp.top_k)[0][:, -1:]
        filt = jnp.where(scaled < kth, -jnp.inf, filt)
    if sp.top_p < 1.0:
        srt = jnp.sort(filt, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(srt, axis=-1), axis=-1)
        # smallest prefix whose mass reaches top_p: keep tokens whose preceding mass < top_p
        n_keep = jnp.sum((cum - jax.nn.softmax(srt, axis=-1)) < sp.top_p, axis=-1, keepdims=True)
        thresh = jnp.take_along_axis(srt, jnp.maximum(n_keep - 1, 0), axis=-1)
        filt = jnp.where(filt < thresh, -jnp.inf, filt)
    tok = jax.random.categorical(key, filt, axis=-1).astype(jnp.int32)
    logp = jax.nn.log_softmax(scaled, axis=-1)
    return tok, jnp.take_along_axis(logp, tok[:, None], -1)[:, 0]


def prefill(cfg: ModelConfig, params, tokens_BxP, mask_BxP, cache_len: int):
    """Runs the prompt through the model, filling slots [0, P) → (last_logits_BxV, DecodeState)."""
    B, P = tokens_BxP.shape
    cache = init_cache(cfg, B, cache_len)
    kv_mask = jnp.zeros((B, cache_len), jnp.int32).at[:, :P].set(mask_BxP.astype(jnp.int32))
    positions = positions_from_mask(mask_BxP)
    zeros = jnp.zeros((B,), jnp.int32)
    logits, cache = Transformer(cfg).apply(
        {"params": params}, tokens_BxP, positions, kv_mask, cache, zeros
    )
    state = DecodeState(
        cache=cache,
        kv_mask=kv_mask,
        index=jnp.full((B,), P, jnp.int32),
        pos=positions[:, -1] + 1,
        token=tokens_BxP[:, -1],
        done=jnp.zeros((B,), bool),
    )
    return logits[:, -1], state


def insert(prefix: DecodeState, state: DecodeState, slot) -> DecodeState:
    """Copies the rows of `prefix` into `state` at rows [slot, slot + prefix rows)."""

    def put(dst, src):
        starts = (slot,) + (0,) * (dst.ndim - 1)
        return jax.lax.dynamic_update_slice(dst, src.astype(dst.dtype), starts)

    return jax.tree.map(put, state, prefix)


def repeat_rows(state: DecodeState, n: int) -> DecodeState:
    return jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), state)


def decode_step(cfg: ModelConfig, params, state: DecodeState):
    """Feeds `state.token` at each row's slot → (logits_BxV, advanced state without new token)."""
    B = state.token.shape[0]
    kv_mask = state.kv_mask.at[jnp.arange(B), state.index].set(1)
    logits, cache = Transformer(cfg).apply(
        {"params": params},
        state.token[:, None],
        state.pos[:, None],
        kv_mask,
        state.cache,
        state.index,
    )
    new = state.replace(cache=cache, kv_mask=kv_mask, index=state.index + 1, pos=state.pos + 1)
    return logits[:, 0], new


def _is_stop(tok_B, stop_ids):
    return jnp.isin(tok_B, jnp.asarray(stop_ids, jnp.int32))


@functools.partial(
    jax.jit, static_argnames=("cfg", "n", "max_new_tokens", "stop_ids", "pad_id", "sp")
)
def generate(
    cfg: ModelConfig,
    params,
    tokens_BxP,
    mask_BxP,
    key,
    *,
    n: int,
    max_new_tokens: int,
    stop_ids: tuple[int, ...],
    pad_id: int,
    sp: SamplingParams,
) -> Rollout:
    """Samples `n` continuations per prompt with a KV cache; see the module docstring."""
    B, P = tokens_BxP.shape
    N = max_new_tokens
    last_logits, state = prefill(cfg, params, tokens_BxP, mask_BxP, P + N)
    state = repeat_rows(state, n)
    last_logits = jnp.repeat(last_logits, n, axis=0)
    R = B * n
    k0, key = jax.random.split(key)
    tok, lp = sample_token(last_logits, k0, sp)
    out_tok = jnp.full((R, N), pad_id, jnp.int32).at[:, 0].set(tok)
    out_lp = jnp.zeros((R, N), jnp.float32).at[:, 0].set(lp)
    state = state.replace(token=tok, done=_is_stop(tok, stop_ids))

    def cond(carry):
        t, state, *_ = carry
        return (t < N) & ~jnp.all(state.done)

    def body(carry):
        t, state, out_tok, out_lp, key = carry
        logits, state = decode_step(cfg, params, state)
        key, sub = jax.random.split(key)
        tok, lp = sample_token(logits, sub, sp)
        tok = jnp.where(state.done, pad_id, tok)
        lp = jnp.where(state.done, 0.0, lp)
        out_tok = jax.lax.dynamic_update_slice(out_tok, tok[:, None], (0, t))
        out_lp = jax.lax.dynamic_update_slice(out_lp, lp[:, None], (0, t))
        state = state.replace(token=tok, done=state.done | _is_stop(tok, stop_ids))
        return t + 1, state, out_tok, out_lp, key

    _, state, out_tok, out_lp, _ = jax.lax.while_loop(
        cond, body, (jnp.int32(1), state, out_tok, out_lp, key)
    )
    mask = response_mask(out_tok, stop_ids)
    return Rollout(out_tok, mask, out_lp * mask, mask.sum(-1))


def response_mask(tokens_BxN, stop_ids):
    """1 up to and including the first stop token, 0 after it."""
    stop = _is_stop(tokens_BxN, stop_ids).astype(jnp.int32)
    before = jnp.cumsum(stop, axis=-1) - stop  # stops strictly before t
    return (before == 0).astype(jnp.int32)


def fuse_for_decode(cfg, params):  # TEMP baseline stub
    return params
