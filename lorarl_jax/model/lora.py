"""LoRA: adapter parameters in their own Flax collection, apart from the frozen base.

Design
- Every linear layer of the decoder is a `LoRADense`. Its frozen kernel lives in the `params`
  collection; its adapter (`lora_a` [in, r], `lora_b` [r, out]) lives in the `lora` collection.
  `y = x W + b + scale · dropout(x) A B`, with scale = alpha / r (or alpha / √r with rsLoRA).
- The adapter path is computed only when the `lora` collection holds this layer's variables, so
  `apply({'params': base}, …)` is the plain base model (the RL reference: zero adapter delta, no
  adapter compute, no second model in memory), and layers not in `target_modules` never pay for it.
- The adapter tree is created by `init_lora` from the base tree's shapes (not by `Module.init`), so
  trainable vs frozen is plain tree structure: gradients and the optimizer see only `lora`.
- `merge` folds the adapter into the kernels once per RL step for rollout: fp32 math from the
  pristine base, cast back to the kernel dtype; the base itself is never modified.
- Logical axes of `lora_a` / `lora_b` are derived from the base kernel's axes (in-axis of A and
  out-axis of B follow the kernel; the rank axis is replicated), so sharding stays consistent.
- QLoRA: with `quantization="nf4"` the frozen kernel is stored as NF4 leaves (`quant.py`) and
  dequantized inside the matmul, one layer at a time in the forward and backward passes (see
  `_nf4_dot`); adapters, `init_lora` and `merge` work on either base.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from lorarl_jax.config import LINEAR_NAMES, LoraConfig  # noqa: F401  (re-exported)
from lorarl_jax.model import quant

LORA = "lora"  # the adapter collection


def mixed_dot(x, w, dtype, dot_dtype=None):
    """x·w in `dtype`; with `dot_dtype` (bf16), both operands rounded to it and the products
    accumulated in `dtype` (fp32): half the weight bytes read per decode step, and XLA:CPU's bf16
    dots (AVX-512 bf16) run faster than its fp32 ones at decode shapes."""
    if dot_dtype is None:
        return jnp.dot(x, w.astype(dtype))
    return jnp.dot(x.astype(dot_dtype), w.astype(dot_dtype), preferred_element_type=dtype)


class LoRADense(nn.Module):
    """Dense `x @ kernel (+ bias)` with an optional adapter read from the `lora` collection."""

    features: int
    kernel_axes: tuple[str, str]
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    lora_scale: float = 1.0
    lora_dropout: float = 0.0
    deterministic: bool = True
    quantization: str = "none"  # "nf4": the kernel is stored as NF4 leaves (QLoRA)
    double_quant: bool = False
    dot_dtype: jnp.dtype | None = None  # operands of x·W in this dtype, accumulated in `dtype`

    @nn.compact
    def __call__(self, x):
        x = x.astype(self.dtype)
        shape = (x.shape[-1], self.features)
        if self.quantization == "nf4":
            y = _nf4_dot(x, self._nf4_leaves(shape), self.dtype)
        else:
            init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), self.kernel_axes)
            kernel = self.param("kernel", init, shape, self.param_dtype)
            y = mixed_dot(x, kernel, self.dtype, self.dot_dtype)
        if self.use_bias:
            binit = nn.with_logical_partitioning(nn.initializers.zeros, self.kernel_axes[1:])
            y = y + self.param("bias", binit, (self.features,), self.param_dtype).astype(self.dtype)
        if self.has_variable(LORA, "lora_a"):
            a = self.get_variable(LORA, "lora_a").astype(self.dtype)
            b = self.get_variable(LORA, "lora_b").astype(self.dtype)
            h = x
            if self.lora_dropout > 0.0 and not self.deterministic:
                h = nn.Dropout(self.lora_dropout)(h, deterministic=False)
            y = y + _lora_delta(h, a, b, self.lora_scale).astype(self.dtype)
        return y

    def _nf4_leaves(self, shape):
        """The kernel's NF4 leaves; `init` quantizes one lecun-normal kernel for all of them.
        (Flax also calls `init` under eval_shape in apply, to check shapes: then any key does.)"""
        key = self.make_rng("params") if self.is_initializing() else None

        def init(name):
            def fn(own_key, s, dtype):
                w = nn.initializers.lecun_normal()(own_key if key is None else key, shape)
                return quant.quantize_kernel(w, self.double_quant)[name].astype(dtype)

            return fn

        specs = quant.leaf_specs(shape, self.kernel_axes, self.double_quant)
        return {
            name: self.param(name, nn.with_logical_partitioning(init(name), axes), s, dtype)
            for name, (s, dtype, axes) in specs.items()
        }


def _dequantize_after(x, leaves, dtype):
    """The dense kernel, from codes made to depend on `x` (codes + uint8(0·x₀), which is 0 for any
    x: XLA converts NaN to 0). Without that data dependency XLA dequantizes every layer up front
    and keeps the results (they depend on the params alone, so one computation serves the forward
    and backward passes): the dense base QLoRA avoids; and it hoists dequantization out of the
    decode loop. (`lax.optimization_barrier` does not stop this: XLA:CPU drops it.)"""
    zero = (0.0 * x.reshape(-1)[0]).astype(jnp.uint8)
    leaves = {**leaves, quant.CODES: leaves[quant.CODES] + zero}
    return quant.dequantize_kernel(leaves).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _nf4_dot(x, leaves, dtype):
    """x @ dequantize(leaves) with one layer's dense kernel alive at a time: dequantized once the
    layer's input (forward) or incoming gradient (backward) exists, and again in the backward
    pass rather than saved. The frozen codes get no gradient."""
    return jnp.dot(x, _dequantize_after(x, leaves, dtype))


def _nf4_dot_fwd(x, leaves, dtype):
    return _nf4_dot(x, leaves, dtype), leaves


def _nf4_dot_bwd(dtype, leaves, g):
    return jnp.dot(g, _dequantize_after(g, leaves, dtype).T).astype(dtype), None


_nf4_dot.defvjp(_nf4_dot_fwd, _nf4_dot_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _lora_delta(h, a, b, scale):
    """`s · (h A) B` over the tokens of `h` [..., in] flattened to rows M, with a hand-written
    backward (u = s · g Bᵀ [M, r]; dA = (uᵀ h)ᵀ; dB = s · (h A)ᵀ g; dh = u Aᵀ) whose rank-r
    contractions run on 2-D operands in the orientation XLA:CPU does fastest. With autodiff of
    the same expression over 3-D activations, SmolLM2's policy value_and_grad took 1.48× as
    long (scripts/bench_lora_grad.py)."""
    return _lora_delta_fwd(h, a, b, scale)[0]


def _lora_delta_fwd(h, a, b, scale):
    h_MxI = h.reshape(-1, h.shape[-1])
    ha_MxR = jnp.dot(h_MxI, a)
    y = jnp.dot(ha_MxR, b) * scale
    return y.reshape(*h.shape[:-1], b.shape[-1]), (h_MxI, ha_MxR, a, b)


def _lora_delta_bwd(scale, res, g):
    h_MxI, ha_MxR, a, b = res
    g_MxO = g.reshape(-1, g.shape[-1]) * jnp.asarray(scale, g.dtype)
    u_MxR = jnp.dot(g_MxO, b.T)
    da = jnp.dot(u_MxR.T, h_MxI).T
    db = jnp.dot(ha_MxR.T, g_MxO)
    dh = jnp.dot(u_MxR, a.T).reshape(*g.shape[:-1], a.shape[0])
    return dh.astype(h_MxI.dtype), da.astype(a.dtype), db.astype(b.dtype)


_lora_delta.defvjp(_lora_delta_fwd, _lora_delta_bwd)


def _targets(base_params, cfg: LoraConfig) -> dict[tuple[str, ...], tuple[int, int]]:
    """Path of each targeted layer (without the trailing 'kernel') → kernel shape."""
    flat = traverse_util.flatten_dict(nn.unbox(base_params))
    out = {}
    for path, v in flat.items():
        if len(path) < 2 or path[-2] not in cfg.target_modules:
            continue
        if path[-1] == "kernel":
            out[path[:-1]] = v.shape
        elif path[-1] == quant.CODES:  # NF4 base: packed codes [in/2, out]
            out[path[:-1]] = quant.kernel_shape(v.shape)
    found = {p[-1] for p in out}
    missing = [t for t in cfg.target_modules if t not in found]
    if missing:
        raise ValueError(f"lora.target_modules {missing} match no layer of this model")
    return out


def init_lora(base_params, cfg: LoraConfig, key: jax.Array, dtype=jnp.float32):
    """A ~ PEFT's kaiming_uniform(a=√5) = U(−1/√in, 1/√in); B = 0. Returns the `lora` tree."""
    targets = _targets(base_params, cfg)
    keys = jax.random.split(key, len(targets))
    flat = {}
    for k, (path, (d_in, d_out)) in zip(keys, sorted(targets.items()), strict=True):
        bound = 1.0 / math.sqrt(d_in)
        flat[path + ("lora_a",)] = jax.random.uniform(k, (d_in, cfg.r), dtype, -bound, bound)
        flat[path + ("lora_b",)] = jnp.zeros((cfg.r, d_out), dtype)
    return traverse_util.unflatten_dict(flat)


def lora_logical_axes(base_axes, lora_params):
    """PartitionSpec-like logical axes for the adapter, taken from each base kernel's axes."""
    base_flat = traverse_util.flatten_dict(base_axes)  # axis tuples are non-dict leaves
    out = {}
    for path in traverse_util.flatten_dict(lora_params):
        kernel = path[:-1] + ("kernel",)  # a NF4 layer's packed codes carry the kernel's axes
        k_in, k_out = tuple(base_flat.get(kernel) or base_flat[path[:-1] + (quant.CODES,)])
        out[path] = (k_in, "lora_rank") if path[-1] == "lora_a" else ("lora_rank", k_out)
    return traverse_util.unflatten_dict(out)


def merge(base_params, lora_params, scale: float, dtype=jnp.float32):
    """W' = cast(W_fp32 + scale · A_fp32 B_fp32) for every adapted kernel; other leaves as is.
    NF4 layers of a quantized base are dequantized first (to `dtype`): the result is dense."""
    base = quant.dequantize_params(nn.unbox(base_params), dtype)
    flat = traverse_util.flatten_dict(base)
    for path, leaves in _adapters(lora_params):
        w = flat[path + ("kernel",)]
        delta = jnp.dot(leaves["lora_a"].astype(jnp.float32), leaves["lora_b"].astype(jnp.float32))
        flat[path + ("kernel",)] = (w.astype(jnp.float32) + scale * delta).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)


def _adapters(lora_params) -> Sequence[tuple[tuple[str, ...], dict]]:
    flat = traverse_util.flatten_dict(lora_params)
    paths = sorted({p[:-1] for p in flat})
    return [(p, {"lora_a": flat[p + ("lora_a",)], "lora_b": flat[p + ("lora_b",)]}) for p in paths]


def count_params(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))
