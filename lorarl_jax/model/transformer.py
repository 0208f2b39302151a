"""One decoder for Llama, Qwen2/2.5 and Gemma 3 text, faithful to Hugging Face transformers.

Design
- Parameter names mirror HF module names (`layers_3/self_attn/q_proj/kernel`), so the name-mapping
  table in `hf.py` is a transpose and a rename. Kernels are Flax `[in, out]`; q/k/v/o are kept flat
  (`[D, H·Dh]`) so LoRA sees the same shapes as PEFT does.
- Every parameter carries logical axis names; `mesh.py` maps them to mesh axes.
- Family differences are config switches: q/k/v biases (Qwen2), q/k RMSNorm, (1+w) norms, √D
  embedding scale, sandwich norms around attention and MLP, gelu-tanh, sliding-window layers with
  their own RoPE base, soft-caps (Gemma 3).
- One attention path serves training and decoding. The caller gives per-token RoPE `positions` and
  a key-validity mask; with a KV cache, the T new keys are written at each row's `cache_index` and
  queries attend to cache slots ≤ their own slot. Left padding is just invalid key slots.
- The LM head is a separate method (`logits_from_hidden`) so log-probs can be computed a chunk of
  the sequence at a time without materialising [B, T, V].
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from lorarl_jax.model.config import ModelConfig, RopeConfig, rope_inv_freq
from lorarl_jax.model.lora import LoraConfig, LoRADense, mixed_dot

NEG_INF = -1e30


class RMSNorm(nn.Module):
    eps: float
    gemma: bool = False  # Gemma: x̂·(1+w), w initialised at 0; Llama: x̂·w, w at 1
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.gemma else nn.initializers.ones
        w = self.param(
            "scale", nn.with_logical_partitioning(init, ("norm",)), (x.shape[-1],), self.param_dtype
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.gemma:
            return (y * (1.0 + w.astype(jnp.float32))).astype(self.dtype)
        return w.astype(self.dtype) * y.astype(self.dtype)


def apply_rope(x_BxTxHxD, positions_BxT, rope: RopeConfig):
    """HF rotate-half RoPE: x·cos + rotate_half(x)·sin with angles = position · inv_freq."""
    d = x_BxTxHxD.shape[-1]
    inv = rope_inv_freq(rope, d)
    ang_BxTxF = positions_BxT.astype(jnp.float32)[..., None] * inv
    ang = jnp.concatenate([ang_BxTxF, ang_BxTxF], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    x = x_BxTxHxD.astype(jnp.float32)
    rot = jnp.concatenate([-x[..., d // 2 :], x[..., : d // 2]], axis=-1)
    return (x * cos + rot * sin).astype(x_BxTxHxD.dtype)


def _dense(parent, name, features, axes, bias):
    """A projection of `parent` (Attention or MLP), adapter-aware if `name` is a LoRA target."""
    cfg, lo = parent.cfg, parent.lora
    adapt = lo is not None and name in lo.target_modules
    return LoRADense(
        features,
        axes,
        use_bias=bias,
        dtype=cfg.compute_dtype,
        param_dtype=jnp.dtype(cfg.param_dtype),
        lora_scale=lo.scale if adapt else 1.0,
        lora_dropout=lo.lora_dropout if adapt else 0.0,
        deterministic=parent.deterministic,
        quantization=cfg.quantization,  # NF4 base (QLoRA): decoder linears only, not lm_head
        double_quant=cfg.double_quant,
        dot_dtype=cfg.dot_dtype or None,
        name=name,
    )


def write_cache(c_BxKxSxDh, new_BxKxTxDh, index):
    """Writes T new slots from `index`: a scalar (every row at the same slot: one in-place update,
    what `generate` uses) or one slot per row [B] (a scatter)."""
    new_BxKxTxDh = new_BxKxTxDh.astype(c_BxKxSxDh.dtype)
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice(c_BxKxSxDh, new_BxKxTxDh, (0, 0, index, 0))
    write = jax.vmap(lambda c, u, i: jax.lax.dynamic_update_slice(c, u, (0, i, 0)))
    return write(c_BxKxSxDh, new_BxKxTxDh, index)


class Attention(nn.Module):
    cfg: ModelConfig
    lora: LoraConfig | None
    sliding: bool
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BxTxD, positions_BxT, kv_mask_BxS, cache, cache_index_B):
        cfg = self.cfg
        B, T, _ = x_BxTxD.shape
        H, K, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.attention_bias
        q = _dense(self, "q_proj", H * Dh, ("embed", "q_heads"), bias)(x_BxTxD)
        k = _dense(self, "k_proj", K * Dh, ("embed", "kv_heads"), bias)(x_BxTxD)
        v = _dense(self, "v_proj", K * Dh, ("embed", "kv_heads"), bias)(x_BxTxD)
        q, k, v = q.reshape(B, T, H, Dh), k.reshape(B, T, K, Dh), v.reshape(B, T, K, Dh)
        if cfg.is_gemma:
            norm = functools.partial(RMSNorm, cfg.rms_norm_eps, True, cfg.compute_dtype)
            q, k = norm(name="q_norm")(q), norm(name="k_norm")(k)
        rope = cfg.rope_local if (self.sliding and cfg.rope_local is not None) else cfg.rope
        q, k = apply_rope(q, positions_BxT, rope), apply_rope(k, positions_BxT, rope)

        # Keys/values as [B, K, S, Dh]: the layout both attention dots read without a transpose,
        # so decode never copies the cache (it would, per layer and step, with [B, S, K, Dh]).
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        offset = 0  # absolute slot of the cache's slot 0 (a shared prompt prefix comes first)
        if cache is None:  # keys are the T tokens themselves, at slots 0..T-1
            keys, values, new_cache = k, v, None
            q_slot_BxT = jnp.broadcast_to(jnp.arange(T), (B, T))
        else:  # write the T new keys at each row's slot, attend over the whole cache
            keys = write_cache(cache["k"], k, cache_index_B)
            values = write_cache(cache["v"], v, cache_index_B)
            new_cache = {**cache, "k": keys, "v": values}
            offset = cache["pmask"].shape[1] if "pmask" in cache else 0
            first_Bx1 = jnp.broadcast_to(cache_index_B, (B,))[:, None]
            q_slot_BxT = offset + first_Bx1 + jnp.arange(T)[None, :]
        window = cfg.sliding_window if self.sliding else None
        G = H // K
        q = q.reshape(B, T, K, G, Dh)
        k_slot = offset + jnp.arange(keys.shape[2])[None, None, :]
        allowed = (k_slot <= q_slot_BxT[..., None]) & kv_mask_BxS[:, None, :].astype(bool)
        s = self._scores(jnp.einsum("btkgd,bksd->bkgts", q, keys.astype(q.dtype)), allowed, window,
                         k_slot, q_slot_BxT)  # fmt: skip
        if cache is None or "pmask" not in cache:
            p = jax.nn.softmax(s, axis=-1).astype(cfg.compute_dtype)
            # [b, k, g, t, d] then transpose: asked for [b, t, k, g, d] directly, XLA:CPU swaps
            # the operands and runs this dot with a slow generic kernel (~3x the decode attention)
            o = jnp.einsum("bkgts,bksd->bkgtd", p, values.astype(p.dtype))
        else:
            o = self._with_shared_prefix(q, s, values, cache, q_slot_BxT, window)
        o = o.transpose(0, 3, 1, 2, 4).reshape(B, T, H * Dh)
        o_bias = cfg.attention_bias and cfg.model_type == "llama"  # Qwen2: q/k/v bias only
        out = _dense(self, "o_proj", cfg.hidden_size, ("q_heads", "embed"), o_bias)(o)
        return out, new_cache

    def _scores(self, s_BxKxGxTxS, allowed_BxTxS, window, k_slot, q_slot_BxT):
        """Scaled (soft-capped) attention logits, NEG_INF where a key is not visible."""
        cfg = self.cfg
        s = s_BxKxGxTxS.astype(jnp.float32) * cfg.attn_scale
        if cfg.attn_logit_softcapping:
            cap = cfg.attn_logit_softcapping
            s = jnp.tanh(s / cap) * cap
        if window:
            allowed_BxTxS &= k_slot > q_slot_BxT[..., None] - window
        return jnp.where(allowed_BxTxS[:, None, None], s, NEG_INF)

    def _with_shared_prefix(self, q_BxTxKxGxD, s_own, values, cache, q_slot_BxT, window):
        """Attention over a prompt prefix shared by the n consecutive rows of each group
        (`cache['pk'/'pv']` [B/n, K, P, Dh], `cache['pmask']` [B/n, P]) and each row's own cache:
        one softmax over both (the same as over the prefix copied into every row), with the
        prefix's keys and values read once per group instead of once per row."""
        cfg = self.cfg
        pk, pv, pmask = cache["pk"], cache["pv"], cache["pmask"]
        B, T, K, G, Dh = q_BxTxKxGxD.shape
        Bp, P = pmask.shape
        n = B // Bp
        qg = q_BxTxKxGxD.reshape(Bp, n, T, K, G, Dh)
        s_pre = jnp.einsum("bntkgd,bksd->bkngts", qg, pk.astype(qg.dtype))
        s_pre = s_pre.transpose(0, 2, 1, 3, 4, 5).reshape(B, K, G, T, P)
        p_slot = jnp.arange(P)[None, None, :]
        allowed = jnp.repeat(pmask.astype(bool), n, axis=0)[:, None, :] & (
            p_slot <= q_slot_BxT[..., None]
        )
        s_pre = self._scores(s_pre, allowed, window, p_slot, q_slot_BxT)
        p = jax.nn.softmax(jnp.concatenate([s_pre, s_own], axis=-1), axis=-1)
        p = p.astype(cfg.compute_dtype)
        p_pre = p[..., :P].reshape(Bp, n, K, G, T, P).transpose(0, 2, 1, 3, 4, 5)
        # both partial sums in fp32, rounded to the compute dtype once: what one dot over all
        # slots gives (in bf16 two rounded halves would move the sampler off the trainer)
        f32 = jnp.float32
        o_pre = jnp.einsum(
            "bkngts,bksd->bkngtd", p_pre, pv.astype(p.dtype), preferred_element_type=f32
        )
        o_pre = o_pre.transpose(0, 2, 1, 3, 4, 5).reshape(B, K, G, T, Dh)
        own = jnp.einsum(
            "bkgts,bksd->bkgtd", p[..., P:], values.astype(p.dtype), preferred_element_type=f32
        )
        return (o_pre + own).astype(p.dtype)


class MLP(nn.Module):
    cfg: ModelConfig
    lora: LoraConfig | None
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        dense = functools.partial(_dense, self)
        gate = dense("gate_proj", cfg.intermediate_size, ("embed", "mlp"), cfg.mlp_bias)(x)
        up = dense("up_proj", cfg.intermediate_size, ("embed", "mlp"), cfg.mlp_bias)(x)
        act = jax.nn.gelu(gate, approximate=True) if cfg.is_gemma else jax.nn.silu(gate)
        return dense("down_proj", cfg.hidden_size, ("mlp", "embed"), cfg.mlp_bias)(act * up)


class Block(nn.Module):
    cfg: ModelConfig
    lora: LoraConfig | None
    sliding: bool
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, positions_BxT, kv_mask_BxS, cache, cache_index_B):
        cfg = self.cfg
        norm = functools.partial(RMSNorm, cfg.rms_norm_eps, cfg.is_gemma, cfg.compute_dtype)
        attn = Attention(cfg, self.lora, self.sliding, self.deterministic, name="self_attn")
        h, new_cache = attn(
            norm(name="input_layernorm")(x), positions_BxT, kv_mask_BxS, cache, cache_index_B
        )
        mlp = MLP(cfg, self.lora, self.deterministic, name="mlp")
        if cfg.is_gemma:  # sandwich norms
            x = x + norm(name="post_attention_layernorm")(h)
            h = mlp(norm(name="pre_feedforward_layernorm")(x))
            return x + norm(name="post_feedforward_layernorm")(h), new_cache
        x = x + h
        return x + mlp(norm(name="post_attention_layernorm")(x)), new_cache


class Transformer(nn.Module):
    """`__call__(tokens, positions, kv_mask, cache=None, cache_index=None)` → (out, cache).

    tokens_BxT, positions_BxT: int32. kv_mask_BxS: 1 for valid key slots (S = T without a cache,
    the cache length with one). cache: list per layer of {'k','v'}: [B, K, S, Dh]. cache_index_B:
    slot of each row's first new token, or a scalar when every row writes the same slot.
    """

    cfg: ModelConfig
    lora: LoraConfig | None = None
    deterministic: bool = True

    def setup(self):
        cfg = self.cfg
        emb_init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed"))
        self.embed_tokens = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            embedding_init=emb_init,
            param_dtype=jnp.dtype(cfg.param_dtype),
            dtype=cfg.compute_dtype,
        )
        block = nn.remat(Block) if cfg.remat else Block
        self.layers = [
            block(cfg, self.lora, cfg.layer_is_sliding(i), self.deterministic, name=f"layers_{i}")
            for i in range(cfg.num_layers)
        ]
        self.norm = RMSNorm(cfg.rms_norm_eps, cfg.is_gemma, cfg.compute_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = LoRADense(
                cfg.vocab_size,
                ("embed", "vocab"),
                dtype=cfg.compute_dtype,
                param_dtype=jnp.dtype(cfg.param_dtype),
                dot_dtype=cfg.dot_dtype or None,
            )

    def __call__(
        self,
        tokens_BxT,
        positions_BxT,
        kv_mask_BxS,
        cache=None,
        cache_index_B=None,
        return_hidden: bool = False,
    ):
        x = self.embed(tokens_BxT)
        new_cache = []
        for i, layer in enumerate(self.layers):
            x, c = layer(
                x,
                positions_BxT,
                kv_mask_BxS,
                None if cache is None else cache[i],
                cache_index_B,
            )
            new_cache.append(c)
        h = self.norm(x)
        out = h if return_hidden else self.logits_from_hidden(h)
        return out, (None if cache is None else new_cache)

    def embed(self, tokens_BxT):
        """Token embeddings as the first layer reads them (Gemma: scaled by √D)."""
        x = self.embed_tokens(tokens_BxT)
        if self.cfg.is_gemma:
            x = x * jnp.asarray(math.sqrt(self.cfg.hidden_size), self.cfg.compute_dtype)
        return x

    def final_norm(self, x_BxTxD):
        return self.norm(x_BxTxD)

    def logits_from_hidden(self, h_BxTxD):
        """fp32 logits of final-normed hidden states (tied or separate head, optional soft-cap)."""
        if self.cfg.tie_word_embeddings and self.cfg.dot_dtype:
            e_VxD = self.embed_tokens.embedding
            logits = mixed_dot(h_BxTxD, e_VxD.T, self.cfg.compute_dtype, self.cfg.dot_dtype)
        elif self.cfg.tie_word_embeddings:
            logits = self.embed_tokens.attend(h_BxTxD)
        else:
            logits = self.lm_head(h_BxTxD)
        logits = logits.astype(jnp.float32)
        if self.cfg.final_logit_softcapping:
            cap = self.cfg.final_logit_softcapping
            logits = jnp.tanh(logits / cap) * cap
        return logits


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None):
    """Zeroed KV cache: a list per layer of {'k','v'}: [B, K, S, Dh]."""
    dtype = dtype or cfg.compute_dtype
    shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
    return [
        {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.num_layers)
    ]


def positions_from_mask(mask_BxT):
    """RoPE positions of a left-padded batch: cumsum(mask) − 1, 0 on padding."""
    return jnp.maximum(jnp.cumsum(mask_BxT, axis=-1) - 1, 0).astype(jnp.int32)


def abstract_params(cfg: ModelConfig):
    """Boxed (logically partitioned) parameter shapes, without allocating anything."""
    model = Transformer(cfg)
    tok = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), tok, tok, tok))["params"]


def init_params(cfg: ModelConfig, key: jax.Array):
    """Random base params (for tests and tiny demos), unboxed."""
    tok = jnp.zeros((1, 1), jnp.int32)
    return nn.unbox(Transformer(cfg).init(key, tok, tok, tok)["params"])
