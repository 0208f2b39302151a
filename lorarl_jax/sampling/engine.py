"""JetStream `Engine` over the sampler's insert / decode_step primitives, with prefix caching.

Design
- Params are plain (merged) weights, `Transformer(cfg)` without an adapter collection: the trained
  LoRA adapter is folded in once at load (`lora.merge`, see `lorarl_jax.serve.load_policy`), so
  decode costs what the base model costs.
- JetStream 0.2.2's contract: `prefill` returns only a prefix (no token), and every `generate` step
  returns one token per slot. So `prefill` runs the prompt *without its last token* and stores
  that token as the slot's next input; the first `generate` step after `insert` feeds it and emits
  the first new token. Every emitted token thus comes from one decode step, and greedy output
  equals `sampler.generate`'s (which takes the first token from the prompt pass).
- The cache is laid out compactly: a prompt's cached tokens sit at slots 0, 1, … (slot = RoPE
  position), so `index == pos` = number of cached tokens. One pure function, `append`, does every
  prompt pass: it feeds the pending token plus all new tokens but the last in one forward pass at
  slots index … (right-padded to JetStream's bucket: one compilation per bucket, the index is
  traced), marks only the real slots valid, and makes the last new token the pending one. A fresh
  prefill is `append` on an empty state whose pending token is the prompt's first token.
- Prefix caching (`existing_prefix`, a `Prefix` from an earlier `prefill`): the new
  `padded_tokens[:true_length]` are appended after it, attending to its cached keys; the result
  is what one prefill of the concatenated prompt gives (tested, sliding windows included: real
  slots have no gaps, so slot distances are token distances). The prefix is not donated, so one
  prefix can be extended by several continuations. The whole prompt, prefix included, must fit
  max_prefill_length (a ValueError otherwise), which keeps max_target_length cache slots for
  decoding; the check reads the prefix's length back from the device (one scalar). Right padding
  writes keys into slots past the prompt that stay invalid and are overwritten before use; the
  cache is padded by the pass width during the pass, so a write near its end is never clamped
  onto real slots.
- The decode state is a `sampler.DecodeState` with one row per slot and a cache of
  max_prefill_length + max_target_length slots, plus each slot's count of generated tokens and a
  PRNG key (split every step: explicit, no hidden RNG). Rows are independent (`decode_step` with a
  per-row cache index), which is what continuous batching needs: a row is overwritten by `insert`
  while the others keep decoding.
- `ResultTokens` rows are (token, valid, length). A slot becomes invalid after max_target_length
  tokens, which ends its request even if the client asked for more. Free or finished slots keep
  decoding in their own row (the batched step costs the same); their cache index is clamped so the
  writes stay inside the cache.
- JetStream prepends `tokenizer.bos_id` to token-id requests. For a tokenizer that writes no BOS
  (Qwen, SmolLM2), `HFTokenizer.bos_id` is `NO_BOS` (−1), which `prefill` drops.
"""

from __future__ import annotations

import functools
import os

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lorarl_jax.model.config import ModelConfig
from lorarl_jax.model.transformer import Transformer, init_cache
from lorarl_jax.sampling import sampler
from lorarl_jax.sampling.jetstream_compat import ensure_importable

ensure_importable()

from jetstream.engine import engine_api, token_utils, tokenizer_api, tokenizer_pb2  # noqa: E402

NO_BOS = -1
# JetStream's prefill buckets (token_utils.pad_tokens); max_prefill_length must be one of them.
PREFILL_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


@flax.struct.dataclass
class EngineState:
    dec: sampler.DecodeState  # one row per slot
    generated: jax.Array  # [slots] int32: tokens emitted since the slot's insert
    key: jax.Array  # PRNG key, split every generate step


def empty(cfg: ModelConfig, rows: int, cache_len: int, token_B) -> sampler.DecodeState:
    """Nothing cached yet; `token_B` pending (it goes to slot 0, RoPE position 0)."""
    return sampler.DecodeState(
        cache=init_cache(cfg, rows, cache_len),
        kv_mask=jnp.zeros((rows, cache_len), jnp.int32),
        index=jnp.zeros((rows,), jnp.int32),
        pos=jnp.zeros((rows,), jnp.int32),
        token=jnp.asarray(token_B, jnp.int32),
        done=jnp.zeros((rows,), bool),
    )


def append(cfg: ModelConfig, params, state: sampler.DecodeState, new_1xW, m):
    """Caches the pending token and new[:m−1] of a one-row state in one pass; new[m−1] becomes
    the pending token (m = 0: nothing changes but invalid slots).

    The W inputs [pending, new_0, …, new_{W−2}] run at cache slots i … i+W−1 and RoPE positions
    pos … pos+W−1 (i = state.index, = pos). Keys valid: the cached ones plus slots [i, i+m); the
    model's causal rule (key slot ≤ query slot) does the rest. Slots [i+m, i+W) get padding keys
    that stay invalid. The cache gets W extra slots for the pass and is cut back after:
    `dynamic_update_slice` clamps a write that runs past the end, which would shift it onto the
    real slots.
    """
    W = new_1xW.shape[1]
    S = state.kv_mask.shape[1]
    i = state.index[0]
    tokens_1xW = jnp.concatenate([state.token[:, None], new_1xW[:, :-1]], axis=1)
    slot = jnp.arange(S + W)
    added_1xSW = ((slot >= i) & (slot < i + m)).astype(jnp.int32)[None]
    kv_mask = jnp.pad(state.kv_mask, ((0, 0), (0, W))) | added_1xSW
    cache = jax.tree.map(lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, W), (0, 0))), state.cache)
    positions_1xW = state.pos[:, None] + jnp.arange(W)[None]
    _, cache = Transformer(cfg).apply(
        {"params": params}, tokens_1xW, positions_1xW, kv_mask, cache, i, return_hidden=True
    )
    last = jnp.where(m > 0, new_1xW[:, jnp.maximum(m - 1, 0)], state.token)
    return state.replace(
        cache=jax.tree.map(lambda x: x[:, :, :S], cache),
        kv_mask=kv_mask[:, :S],
        index=state.index + m,
        pos=state.pos + m,
        token=last,
    )


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len"))
def _prefill(cfg, cache_len, params, first_1, new_1xW, m):
    return append(cfg, params, empty(cfg, 1, cache_len, first_1), new_1xW, m)


# not donated: one prefix may be extended by several continuations
_extend = jax.jit(append, static_argnames=("cfg",))


@functools.partial(jax.jit, donate_argnums=(1,))
def _insert(prefix, state: EngineState, slot):
    dec = sampler.insert(prefix, state.dec, slot)
    return state.replace(dec=dec, generated=state.generated.at[slot].set(0))


@functools.partial(jax.jit, static_argnames=("cfg", "sp", "max_target"), donate_argnums=(3,))
def _generate(cfg, sp, params, state: EngineState, max_target: int):
    logits, dec = sampler.decode_step(cfg, params, state.dec)  # per-row cache index
    key, sub = jax.random.split(state.key)
    tok, _ = sampler.sample_token(logits, sub, sp)
    S = dec.kv_mask.shape[1]
    dec = dec.replace(token=tok, index=jnp.minimum(dec.index, S - 1))
    generated = state.generated + 1
    valid = (generated <= max_target).astype(jnp.int32)
    data_Bx3 = jnp.stack([tok, valid, generated], axis=-1)
    result = engine_api.ResultTokens(
        data=data_Bx3, tokens_idx=(0, 1), valid_idx=(1, 2), length_idx=(2, 3), samples_per_slot=1
    )
    return EngineState(dec, generated, key), result


def _right_pad(ids, width: int):
    tokens_1xW = np.zeros((1, width), np.int32)
    tokens_1xW[0, : ids.size] = ids
    return tokens_1xW


class HFTokenizer(tokenizer_api.Tokenizer):
    """JetStream's tokenizer API over a Hugging Face tokenizer directory.

    `chat=True` wraps each text request as one user turn of the tokenizer's chat template (with
    the generation prompt), encoded as the trainer encodes prompts (no extra special tokens).
    Streamed text is `decode([id])` per token, as JetStream asks; token ids are exact.
    """

    def __init__(self, path: str, stop_ids: tuple[int, ...], chat: bool = False):
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(path)
        self.chat = chat
        if chat and not getattr(self.hf, "chat_template", None):
            raise ValueError(f"{path}: the tokenizer has no chat template")
        self._stop = set(int(i) for i in stop_ids)
        bos = self.hf.bos_token_id
        writes_bos = bos is not None and self.hf.encode("a")[:1] == [bos]
        self._bos = int(bos) if writes_bos else NO_BOS

    def encode(self, s: str, **kwargs):
        if self.chat:
            msgs = [{"role": "user", "content": s}]
            text = self.hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            ids = self.hf.encode(text, add_special_tokens=False)
        else:
            ids = self.hf.encode(s, add_special_tokens=kwargs.get("is_bos", True))
        return token_utils.pad_tokens(
            np.asarray(ids, np.int32),
            self.bos_id,
            self.pad_id,
            is_bos=False,  # the HF tokenizer (or template) already wrote any BOS
            prefill_lengths=kwargs.get("prefill_lengths"),
            max_prefill_length=kwargs.get("max_prefill_length"),
            jax_padding=kwargs.get("jax_padding", True),
        )

    def decode(self, token_ids: list[int], **kwargs) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=False)

    @property
    def pad_id(self) -> int:
        pad = self.hf.pad_token_id
        return int(pad if pad is not None else self.eos_id)

    @property
    def eos_id(self) -> int:
        return int(self.hf.eos_token_id if self.hf.eos_token_id is not None else min(self._stop))

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def stop_tokens(self) -> set[int]:
        return set(self._stop)


class LoraEngine(engine_api.Engine):
    """Serves one model (merged weights) on one device with `slots` concurrent decodes."""

    def __init__(
        self,
        cfg: ModelConfig,
        params,
        tokenizer_dir: str,
        stop_ids: tuple[int, ...],
        *,
        slots: int = 8,
        max_prefill_length: int = 256,
        max_target_length: int = 256,
        sampling: sampler.SamplingParams | None = None,
        seed: int = 0,
        chat: bool = False,
    ):
        if max_prefill_length not in PREFILL_BUCKETS:
            raise ValueError(
                f"max_prefill_length must be one of JetStream's buckets {PREFILL_BUCKETS}, "
                f"got {max_prefill_length}"
            )
        if slots < 1 or max_target_length < 1:
            raise ValueError("slots and max_target_length must be >= 1")
        if not os.path.isdir(tokenizer_dir):
            raise FileNotFoundError(f"tokenizer directory {tokenizer_dir} does not exist")
        self.cfg, self._params = cfg, params
        self.tokenizer_dir, self.stop_ids, self.chat = tokenizer_dir, tuple(stop_ids), chat
        self.slots, self.max_target_length = slots, max_target_length
        self._max_prefill = max_prefill_length
        self.cache_len = max_prefill_length + max_target_length
        self.sampling = sampling or sampler.SamplingParams(greedy=True)
        self.seed = seed
        self._mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))

    # ------------------------------------------------------------------ accelerator calls

    def load_params(self, *args, **kwargs):
        return self._params

    def prefill(self, *, params, existing_prefix=None, padded_tokens, true_length: int):
        """A one-row `DecodeState` (the `Prefix`): the prompt but its last token cached, the last
        one pending. With `existing_prefix`, the tokens are appended to that prefix's prompt."""
        padded = np.asarray(padded_tokens).reshape(-1)
        ids = padded[: min(int(true_length), padded.size)]  # JetStream may have left-truncated
        ids = ids[ids != NO_BOS].astype(np.int32)
        W = padded.size  # JetStream's bucket: one compilation per bucket
        if existing_prefix is None:
            if ids.size == 0:
                raise ValueError("empty prompt")
            new_1xW = _right_pad(ids[1:], W)
            return _prefill(self.cfg, self.cache_len, params, ids[:1], new_1xW, ids.size - 1)
        cached = int(jax.device_get(existing_prefix.index)[0])
        if cached + 1 + ids.size > self._max_prefill:
            raise ValueError(
                f"prefix caching: the prefix's {cached + 1} tokens + {ids.size} new ones exceed "
                f"max_prefill_length={self._max_prefill} (the rest of the cache is for decoding)"
            )
        return _extend(self.cfg, params, existing_prefix, _right_pad(ids, W), ids.size)

    def insert(self, prefix, decode_state: EngineState, slot: int) -> EngineState:
        return _insert(prefix, decode_state, jnp.int32(slot))

    def generate(self, params, decode_state: EngineState):
        return _generate(self.cfg, self.sampling, params, decode_state, self.max_target_length)

    def init_decode_state(self, *args, **kwargs) -> EngineState:
        """All slots empty: `slots` rows shaped like a prefill's state."""
        return EngineState(
            dec=empty(self.cfg, self.slots, self.cache_len, jnp.zeros((self.slots,), jnp.int32)),
            generated=jnp.zeros((self.slots,), jnp.int32),
            key=jax.random.key(self.seed),
        )

    # ------------------------------------------------------------------ metadata

    def get_prefix_destination_sharding(self):
        return jax.sharding.NamedSharding(self._mesh, jax.sharding.PartitionSpec())

    def get_tokenizer(self) -> tokenizer_pb2.TokenizerParameters:
        return tokenizer_pb2.TokenizerParameters(path=self.tokenizer_dir)

    def build_tokenizer(self, metadata: tokenizer_pb2.TokenizerParameters) -> HFTokenizer:
        return HFTokenizer(metadata.path, self.stop_ids, chat=self.chat)

    @property
    def max_concurrent_decodes(self) -> int:
        return self.slots

    @property
    def samples_per_slot(self) -> int:
        return 1

    @property
    def max_prefill_length(self) -> int:
        return self._max_prefill

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self._mesh

    @property
    def colocated_cpus(self):
        return None
