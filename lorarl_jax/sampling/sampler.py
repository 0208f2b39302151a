"""KV-cache sampler on merged weights: jitted prefill, insert and decode primitives.

Design
- The trainer merges the adapter into the base once per RL step, so decode pays no adapter
  compute (`Transformer(cfg)` without a LoRA collection). With a quantized base and
  `rollout.merge=never` it passes `lora` + `lcfg` instead, and every function below applies
  `Transformer(cfg, lcfg)` to {params, lora}: the adapter unmerged, the NF4 base dequantized per
  layer (see `rollout_weights.py` for the trade-off).
- A `DecodeState` holds, per slot (row): the KV cache [B, K, S, Dh], which cache slots are valid,
  the next write slot, the next RoPE position, the last token and a done flag. `prefill` builds one
  from a left-padded prompt batch; `insert` copies prefilled rows into slots of a larger state (what
  a JetStream engine needs for continuous batching); `decode_step` advances every slot by one token.
- `sample` (a `GenerateSpec`: n, max_new_tokens, stop ids, pad id, sampling params) = prefill
  once per prompt; with n > 1 the n rows of a group share that prompt's keys/values as one
  prefix (`share_prompt`: attention reads the prompt part of the cache once per group, not n
  times; one softmax over prefix + own slots, so the same distribution: tested to give the same
  tokens for the same key), else each row is repeated `n` times (no re-prefill per sample); then
  `lax.while_loop`s of decode steps that stop at `max_new_tokens` or when every row has emitted a
  stop id; the cache grows between loops (`cache_segments`), so attention reads only slots that
  can be filled so far. Sample `i·n + j` is generation j of prompt i (contiguous groups, as GRPO
  expects). `generate` is `sample` jitted for one device; the trainer's sharded program is built
  in `rl/programs.py`.
- CPU decode costs (SmolLM2-135M, 32 rows, fp32) set these choices: every row of `generate` writes
  the same cache slot, so the cache and mask take one in-place `dynamic_update_slice` per step (no
  scatter); the cache layout is the one the attention dots read (no per-step cache transpose); the
  prompt pass runs the LM head at its last position only; sampling is an inverse-CDF draw with one
  uniform per row (Gumbel-max drew 32 × V uniforms per step, as slow as the whole LM head).
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
from lorarl_jax.model.lora import LORA, LoraConfig
from lorarl_jax.model.transformer import Transformer, init_cache, positions_from_mask


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    greedy: bool = False

    def __post_init__(self):
        if self.temperature <= 0 and not self.greedy:
            raise ValueError(
                f"rollout.temperature must be > 0, got {self.temperature} (sampling needs a "
                "temperature; held-out evaluation already decodes greedily)"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"rollout.top_k must be >= 0, got {self.top_k}")


@flax.struct.dataclass
class DecodeState:
    cache: list  # per layer {'k','v'}: [B, K, S, Dh]
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


BLOCK = 128  # vocabulary reductions run in two levels: over V / BLOCK blocks, then in one block


def _blocks(x_BxV, fill):
    """[B, V] → [B, R, BLOCK], padding the tail with `fill`."""
    B, V = x_BxV.shape
    R = -(-V // BLOCK)
    return jnp.pad(x_BxV, ((0, 0), (0, R * BLOCK - V)), constant_values=fill).reshape(B, R, BLOCK)


def _pick_block(xb_BxRxC, blk_B):
    return jnp.take_along_axis(xb_BxRxC, blk_B[:, None, None], axis=1)[:, 0]


def _argmax(xb_BxRxC, blockmax_BxR):
    """= jnp.argmax (first maximum) from the block maxima: XLA:CPU runs a variadic (value, index)
    reduce over all of V several times slower than a plain max."""
    blk = jnp.argmax(blockmax_BxR, axis=-1)
    return blk * BLOCK + jnp.argmax(_pick_block(xb_BxRxC, blk), axis=-1)


def _inverse_cdf(w_BxV, u_B):
    """Index i with cdf[i−1] < u·Σw ≤ cdf[i], for weights w ≥ 0 and u ∈ (0, 1]: an exact draw from
    w / Σw with one uniform per row (Gumbel-max needs V of them, which costs more than the model's
    LM head here). Block sums, a cumsum over blocks, then a cumsum inside the chosen block: O(V)."""
    wb = _blocks(w_BxV, 0.0)
    cum_BxR = jnp.cumsum(wb.sum(-1), axis=-1)
    target_B = u_B * cum_BxR[:, -1]  # ≤ cum[-1], so the block index stays < R
    blk = jnp.sum(cum_BxR < target_B[:, None], axis=-1)  # chosen block has positive mass
    prev = jnp.take_along_axis(cum_BxR, jnp.maximum(blk - 1, 0)[:, None], axis=1)[:, 0]
    rest_B = target_B - jnp.where(blk > 0, prev, 0.0)
    row_BxC = _pick_block(wb, blk)
    j = jnp.sum(jnp.cumsum(row_BxC, axis=-1) < rest_B[:, None], axis=-1)
    # rounding may put `rest` past the block's own cumsum: fall back to its last positive weight
    last = BLOCK - 1 - jnp.argmax(row_BxC[:, ::-1] > 0, axis=-1)
    return blk * BLOCK + jnp.minimum(j, last)


def _keep_mask(scaled_BxV, sp: SamplingParams):
    """Top-k / top-p truncation of the tempered logits → bool [B, V], or None when both are off."""
    if sp.top_k == 0 and sp.top_p == 1.0:
        return None
    filt = scaled_BxV
    if sp.top_k > 0:
        kth = jax.lax.top_k(scaled_BxV, sp.top_k)[0][:, -1:]
        filt = jnp.where(scaled_BxV < kth, -jnp.inf, filt)
    if sp.top_p < 1.0:
        srt = jnp.sort(filt, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(srt, axis=-1), axis=-1)
        # smallest prefix whose mass reaches top_p: keep tokens whose preceding mass < top_p
        n_keep = jnp.sum((cum - jax.nn.softmax(srt, axis=-1)) < sp.top_p, axis=-1, keepdims=True)
        thresh = jnp.take_along_axis(srt, jnp.maximum(n_keep - 1, 0), axis=-1)
        filt = jnp.where(filt < thresh, -jnp.inf, filt)
    return filt > -jnp.inf


def sample_token(logits_BxV, key, sp: SamplingParams):
    """Returns (token_B, logp_B): logp under softmax(logits / T) of the chosen token.

    Greedy: argmax, logp under softmax(logits). Sampling: a draw from softmax of the top-k/top-p
    truncated tempered logits (inverse CDF, one uniform per row). logp is computed as
    `jax.nn.log_softmax` does, (x − max) − log Σ exp(x − max), from the same exponentials.
    """
    x = logits_BxV.astype(jnp.float32)
    if not sp.greedy:
        x = x / sp.temperature
    xb = _blocks(x, -jnp.inf)
    blockmax_BxR = xb.max(-1)
    m_B = blockmax_BxR.max(-1)
    e_BxV = jnp.exp(x - m_B[:, None])
    log_z = jnp.log(e_BxV.sum(-1))
    if sp.greedy:
        tok = _argmax(xb, blockmax_BxR)
    else:
        keep = _keep_mask(x, sp)
        w_BxV = e_BxV if keep is None else jnp.where(keep, e_BxV, 0.0)
        u_B = 1.0 - jax.random.uniform(key, (x.shape[0],))  # (0, 1]
        tok = _inverse_cdf(w_BxV, u_B)
    x_tok = jnp.take_along_axis(x, tok[:, None], axis=-1)[:, 0]
    return tok.astype(jnp.int32), (x_tok - m_B) - log_z


def _model(cfg: ModelConfig, params, lora=None, lcfg: LoraConfig | None = None):
    """(module, variables): the plain model, or base + unmerged adapter when `lora` is given."""
    if lora is None:
        return Transformer(cfg), {"params": params}
    return Transformer(cfg, lcfg), {"params": params, LORA: lora}


def prefill(cfg: ModelConfig, params, tokens_BxP, mask_BxP, cache_len: int, lora=None, lcfg=None):
    """Runs the prompt through the model, filling slots [0, P) → (last_logits_BxV, DecodeState)."""
    B, P = tokens_BxP.shape
    model, variables = _model(cfg, params, lora, lcfg)
    cache = init_cache(cfg, B, cache_len)
    kv_mask = jnp.zeros((B, cache_len), jnp.int32).at[:, :P].set(mask_BxP.astype(jnp.int32))
    positions = positions_from_mask(mask_BxP)
    h, cache = model.apply(
        variables, tokens_BxP, positions, kv_mask, cache, jnp.int32(0), return_hidden=True
    )
    # the LM head only at the last position: [B, P, V] logits would cost P times more
    logits = model.apply(variables, h[:, -1:], method=Transformer.logits_from_hidden)
    state = DecodeState(
        cache=cache,
        kv_mask=kv_mask,
        index=jnp.full((B,), P, jnp.int32),
        pos=positions[:, -1] + 1,
        token=tokens_BxP[:, -1],
        done=jnp.zeros((B,), bool),
    )
    return logits[:, 0], state


def insert(prefix: DecodeState, state: DecodeState, slot) -> DecodeState:
    """Copies the rows of `prefix` into `state` at rows [slot, slot + prefix rows)."""

    def put(dst, src):
        starts = (slot,) + (0,) * (dst.ndim - 1)
        return jax.lax.dynamic_update_slice(dst, src.astype(dst.dtype), starts)

    return jax.tree.map(put, state, prefix)


def repeat_rows(state: DecodeState, n: int) -> DecodeState:
    return jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), state)


def decode_step(cfg: ModelConfig, params, state: DecodeState, slot=None, lora=None, lcfg=None):
    """Feeds `state.token` at each row's slot → (logits_BxV, advanced state without new token).

    `slot`: when every row writes the same cache slot (as in `generate`), that slot as a scalar;
    the cache and the mask then get one in-place update instead of a per-row scatter.
    """
    B = state.token.shape[0]
    if slot is None:
        index = state.index
        kv_mask = state.kv_mask.at[jnp.arange(B), index].set(1)
    else:
        index = slot
        kv_mask = jax.lax.dynamic_update_slice(
            state.kv_mask, jnp.ones((B, 1), jnp.int32), (0, slot)
        )
    model, variables = _model(cfg, params, lora, lcfg)
    logits, cache = model.apply(
        variables,
        state.token[:, None],
        state.pos[:, None],
        kv_mask,
        state.cache,
        index,
    )
    new = state.replace(cache=cache, kv_mask=kv_mask, index=state.index + 1, pos=state.pos + 1)
    return logits[:, 0], new


def cache_segments(max_new_tokens: int, first: int = 32) -> tuple[int, ...]:
    """Decode-step counts at which `generate` grows the cache: 32, 64, 128, …, max_new_tokens.

    Attention reads the whole cache at every step, and on CPU reading it costs as much as a
    third of the layers' matmuls (SmolLM2, 32 rows, fp32): with a cache of P + 32·2^k slots
    while t < 32·2^k, early steps and rollouts that stop early read only what they can use.
    """
    ends, e = [], first
    while e < max_new_tokens:
        ends.append(e)
        e *= 2
    return (*ends, max_new_tokens)


def grow_cache(state: DecodeState, length: int) -> DecodeState:
    """Pads the cache and its mask with empty slots up to `length` (no-op when already there)."""
    extra = length - state.kv_mask.shape[1]
    if extra == 0:
        return state

    def pad(x, axis):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, extra)
        return jnp.pad(x, widths)

    # each row's own keys/values [B, K, S, Dh]; a shared prompt prefix (pk, pv, pmask) stays
    cache = [{**c, "k": pad(c["k"], 2), "v": pad(c["v"], 2)} for c in state.cache]
    return state.replace(cache=cache, kv_mask=pad(state.kv_mask, 1))


def share_prompt(prompt: DecodeState, mask_BxP, n: int, length: int) -> DecodeState:
    """n rows per prompt that read the prompt's keys/values from one shared prefix per group
    (`Attention._with_shared_prefix`) and write their own tokens to a cache of `length` slots:
    the prompt part of the cache is read once per group at each decode step, not n times."""
    R, P = mask_BxP.shape[0] * n, mask_BxP.shape[1]

    def rows(c):  # c: the prefilled cache of one layer, [B, K, ≥ P, Dh]
        B, K, _, Dh = c["k"].shape
        own = jnp.zeros((B * n, K, length, Dh), c["k"].dtype)
        pk, pv = c["k"][:, :, :P], c["v"][:, :, :P]  # the prompt's slots [0, P)
        return {"k": own, "v": own, "pk": pk, "pv": pv, "pmask": mask_BxP}

    return DecodeState(
        cache=[rows(c) for c in prompt.cache],
        kv_mask=jnp.zeros((R, length), jnp.int32),
        index=jnp.zeros((R,), jnp.int32),
        pos=jnp.repeat(prompt.pos, n),
        token=jnp.repeat(prompt.token, n),
        done=jnp.zeros((R,), bool),
    )


def _is_stop(tok_B, stop_ids):
    return jnp.isin(tok_B, jnp.asarray(stop_ids, jnp.int32))


@dataclasses.dataclass(frozen=True)
class GenerateSpec:
    """Everything static about one kind of generation (hashable: a jit static argument). A run
    builds one for its rollouts and one for evaluation (greedy, n = 1); the trainer's log-prob
    programs read τ from the rollout spec, so sampler and trainer cannot disagree on it."""

    n: int  # samples per prompt
    max_new_tokens: int
    stop_ids: tuple[int, ...]
    pad_id: int
    sampling: SamplingParams
    share_prompt: bool = True  # n > 1: the prompt's KV cache once per group (same math)


def sample(
    cfg: ModelConfig,
    params,
    tokens_BxP,
    mask_BxP,
    key,
    spec: GenerateSpec,
    lora=None,
    lcfg: LoraConfig | None = None,
) -> Rollout:
    """Samples `spec.n` continuations per prompt with a KV cache; see the module docstring.
    With `lora` (and its `lcfg`), decodes base + adapter unmerged. Not jitted: `generate` is the
    single-device program, `rl/programs.py` builds the sharded one."""
    n, stop_ids, pad_id, sp = spec.n, spec.stop_ids, spec.pad_id, spec.sampling
    B, P = tokens_BxP.shape
    N = spec.max_new_tokens
    ends = cache_segments(N)
    shared = spec.share_prompt and n > 1
    base = 0 if shared else P  # cache slot of the first generated token
    # the same prefill either way (its cache length sets XLA's rounding of the first logits)
    last_logits, state = prefill(cfg, params, tokens_BxP, mask_BxP, P + ends[0], lora, lcfg)
    if shared:
        state = share_prompt(state, mask_BxP.astype(jnp.int32), n, ends[0])
    else:
        state = repeat_rows(state, n)
    last_logits = jnp.repeat(last_logits, n, axis=0)
    R = B * n
    k0, key = jax.random.split(key)
    tok, lp = sample_token(last_logits, k0, sp)
    out_tok = jnp.full((R, N), pad_id, jnp.int32).at[:, 0].set(tok)
    out_lp = jnp.zeros((R, N), jnp.float32).at[:, 0].set(lp)
    state = state.replace(token=tok, done=_is_stop(tok, stop_ids))

    def body(carry):
        t, state, out_tok, out_lp, key = carry
        logits, state = decode_step(cfg, params, state, base + t - 1, lora, lcfg)  # one slot
        key, sub = jax.random.split(key)
        tok, lp = sample_token(logits, sub, sp)
        tok = jnp.where(state.done, pad_id, tok)
        lp = jnp.where(state.done, 0.0, lp)
        out_tok = jax.lax.dynamic_update_slice(out_tok, tok[:, None], (0, t))
        out_lp = jax.lax.dynamic_update_slice(out_lp, lp[:, None], (0, t))
        state = state.replace(token=tok, done=state.done | _is_stop(tok, stop_ids))
        return t + 1, state, out_tok, out_lp, key

    carry = (jnp.int32(1), state, out_tok, out_lp, key)
    for end in ends:  # step t writes slot base + t − 1: steps t < end fit a cache of base + end
        carry = (carry[0], grow_cache(carry[1], base + end), *carry[2:])
        cond = lambda c, end=end: (c[0] < end) & ~jnp.all(c[1].done)  # noqa: E731
        carry = jax.lax.while_loop(cond, body, carry)
    out_tok, out_lp = carry[2], carry[3]
    mask = response_mask(out_tok, stop_ids)
    return Rollout(out_tok, mask, out_lp * mask, mask.sum(-1))


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "n", "max_new_tokens", "stop_ids", "pad_id", "sp", "lcfg", "share"),
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
    lora=None,
    lcfg: LoraConfig | None = None,
    share: bool = True,
) -> Rollout:
    """`sample` jitted for one device, with the spec's fields as keywords."""
    spec = GenerateSpec(n, max_new_tokens, tuple(stop_ids), pad_id, sp, share)
    return sample(cfg, params, tokens_BxP, mask_BxP, key, spec, lora, lcfg)


def response_mask(tokens_BxN, stop_ids):
    """1 up to and including the first stop token, 0 after it."""
    stop = _is_stop(tokens_BxN, stop_ids).astype(jnp.int32)
    before = jnp.cumsum(stop, axis=-1) - stop  # stops strictly before t
    return (before == 0).astype(jnp.int32)
