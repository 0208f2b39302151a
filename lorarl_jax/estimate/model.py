"""Memory model of one RL step: bytes per device, full fine-tuning vs LoRA vs QLoRA.

Pure functions of (ModelConfig, LoraConfig, Workload, Precision, Options); `estimate()` returns a
`Breakdown` per mode. `cli.py` is the command line over it; parameter leaves and their sharding
are in `params.py`.

Design
- Parameter counts are exact: shapes come from `abstract_params` (jax.eval_shape of the decoder
  itself, NF4 leaves included for QLoRA) and from `init_lora` under eval_shape.
- The trainer runs rollout, log-probs and the update one after another, so
      peak = resident (weights, adapter, AdamW state, reference, critic)
             + the largest phase (rollout: merged copy + the merge's products or the KV cache;
               log-probs: the shared-prompt cache or the LM head; update: activations + the
               gradients alive as the backward pass starts, or gradients + the update's copy).
- Sharding follows `mesh.LOGICAL_RULES`: each weight is split over the mesh axes its logical
  names map to (fsdp × tensor; the rollout's merged copy by `DECODE_RULES`: tensor only);
  sequences over data × fsdp; heads, MLP columns and vocabulary of activations over tensor.
  Uneven splits round up.
- Activations: what the compiled step keeps for the backward pass, per layer and token, read from
  XLA's buffer assignment of our step (SmolLM2 / Llama and Gemma 3, fp32): see `layer_elems`.
  With remat a layer keeps its input (and K/V cache) and one layer is recomputed at a time.
- Numbers assume XLA schedules for memory, as on accelerators. XLA:CPU's default scheduler does
  not (it keeps 50–85% of the merge's fp32 A·B products live); this one does, and
  `scripts/bench_memory.py` uses it:
      XLA_FLAGS=--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED
  Remat is the design value: in the unrolled decoder XLA:CPU honours it for ~4 layers only
  (3.5 MiB/layer kept, 3.3 predicted), then keeps ~40 MiB/layer as without remat; with
  `model.scan_layers` (`Workload.scan_layers`: + the stacked copy of the layer weights each
  training pass makes) the checkpointed scan body holds it (README: validation table).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lorarl_jax import mesh as mesh_lib
from lorarl_jax.estimate.params import (
    Leaf,
    _itemsize,
    is_linear,
    leaf_bytes,
    lora_leaves,
    param_leaves,
    shard_elems,
)
from lorarl_jax.model.config import ModelConfig
from lorarl_jax.model.lora import LoraConfig

MODES = ("full", "lora", "qlora")


@dataclasses.dataclass(frozen=True)
class Workload:
    batch: int = 4  # prompts per RL step
    num_generations: int = 8
    seq: int = 256  # padded prompt length
    max_new_tokens: int = 256
    micro_batch: int = 0  # sequences per gradient micro-batch; 0: all of them
    logprob_chunk: int = 64
    remat: bool = False
    scan_layers: bool = False  # model.scan_layers: each training pass stacks the layer weights

    @property
    def rows(self) -> int:
        return self.batch * self.num_generations

    @property
    def micro(self) -> int:
        m = self.micro_batch or self.rows
        n = self.num_generations
        if (m % n and n % m) or self.rows % m:
            raise ValueError(
                f"micro_batch={m} must divide or be a multiple of num_generations={n} "
                f"and divide batch × num_generations = {self.rows}"
            )
        return m


@dataclasses.dataclass(frozen=True)
class Precision:
    param_dtype: str = "bfloat16"  # stored weights (policy, reference, critic, merged copy)
    dtype: str = "bfloat16"  # compute: activations, KV cache, QLoRA's non-quantized weights
    adapter_dtype: str = "float32"  # LoRA A/B and their gradients
    opt_dtype: str = "float32"  # AdamW moments (optax keeps them in the parameter dtype)
    double_quant: bool = False  # QLoRA: 8-bit absmax scales
    rollout_weight_dtype: str = ""  # `rollout.weight_dtype`: the merged copy's matrices


@dataclasses.dataclass(frozen=True)
class Options:
    mesh: tuple[int, int, int] = (1, 1, 1)  # data, fsdp, tensor
    merge: str = "auto"  # rollout: auto (LoRA merged, QLoRA unmerged) | always | never
    critic: bool = False  # PPO (GAE): a full-parameter value model with its own AdamW


@dataclasses.dataclass(frozen=True)
class Breakdown:
    """Bytes per device of one mode; `params` and `trainable` are counts (whole model)."""

    mode: str
    params: int
    trainable: int
    weights: int
    adapter: int
    optimizer: int
    reference: int
    critic: int
    gradients: int
    grads_early: int  # gradients alive as a backward pass starts (head; the carried sum)
    update: int  # optimizer-update workspace (one more gradient-sized copy)
    activations: int  # the train step's, at the chosen remat
    activations_no_remat: int
    activations_remat: int
    merged: int  # rollout copy: the jitted merge returns a new tree (unadapted leaves copied too)
    sampler_weights: int  # what decode reads: policy, merged tree, or base + adapter
    merge_work: int  # the merge's fp32 A·B products (see `merge_work_bytes`)
    kv_cache: int
    rollout_work: int
    logprob_work: int
    stacked: int  # scan_layers: the stacked copy of the decoder weights a training pass makes

    @property
    def resident(self) -> int:
        return self.weights + self.adapter + self.optimizer + self.reference + self.critic

    @property
    def rollout_phase(self) -> int:
        """Merging (copy + its products), then decoding (copy + KV cache + buffers)."""
        return self.merged + max(self.merge_work, self.kv_cache + self.rollout_work)

    @property
    def train_phase(self) -> int:
        """Backward start (all activations + early gradients) or the update (gradients + a
        gradient-sized workspace), whichever is larger."""
        return max(self.activations + self.grads_early + self.stacked, self.gradients + self.update)

    @property
    def logprob_phase(self) -> int:
        return self.logprob_work + self.stacked

    @property
    def peak(self) -> int:
        return self.resident + max(self.rollout_phase, self.logprob_phase, self.train_phase)

    @property
    def train_program(self) -> int:
        """The jitted policy step alone (what `compiled.memory_analysis()` describes)."""
        return self.weights + self.adapter + self.optimizer + self.train_phase

    @property
    def rollout_program(self) -> int:
        """`generate` alone: the weights it decodes on, the KV cache and its buffers."""
        return self.sampler_weights + self.kv_cache + self.rollout_work

    @property
    def logprob_program(self) -> int:
        """The reference log-prob pass alone (base or reference copy + its buffers)."""
        return self.weights + self.logprob_phase

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        programs = ("train_program", "rollout_program", "logprob_program")
        for k in ("resident", "rollout_phase", "train_phase", "logprob_phase", "peak") + programs:
            out[k] = getattr(self, k)
        return out


# ------------------------------------------------------------------------- activations


def _splits(mesh) -> tuple[int, int]:
    """(ways sequences are split: data × fsdp, ways heads / MLP / vocab are split: tensor)."""
    data, fsdp, tensor = mesh
    return data * fsdp, tensor


def layer_elems(cfg: ModelConfig, mode: str, lcfg: LoraConfig | None) -> tuple[float, float]:
    """(replicated, tensor-split) elements kept per layer and token for the backward pass.

    Counted in XLA's buffer assignment of the compiled policy step at its peak (fp32, CPU):
    SmolLM2 keeps per token and layer 7·F + 5·D + H·Dh with LoRA and 5·F + 7·D + H·Dh when every
    weight trains (XLA fuses the MLP differently when its projections are adapted); Gemma 3 keeps
    7·F + 10·D + 5·H·Dh + 2·K·Dh with LoRA: 2.5·D per RMSNorm over the residual stream (two norms
    per block, four with sandwich norms) and 4·H·Dh + 2·K·Dh more for the q/k norms. LoRA adds
    the thin x·A products (r per adapted projection). The attention probabilities and the K/V
    cache are counted apart (`activation_bytes`).
    """
    D, F, Dh = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    H, K = cfg.num_heads, cfg.num_kv_heads
    norms = 4 if cfg.is_gemma else 2
    rep = 2.5 * norms * D
    split = H * Dh + (4 * H * Dh + 2 * K * Dh if cfg.is_gemma else 0)
    if mode == "full":
        split, rep = split + 5 * F, rep + 2 * D
    else:
        split += 7 * F
        rep += lcfg.r * len(lcfg.target_modules) if lcfg else 0
    return rep, split


ATTN_COPIES = 3  # scores / probabilities [H, S] per token, fp32, kept per layer
LOGIT_COPIES = 2  # [rows, chunk, V] fp32 logits of the LM-head chunk being differentiated


def activation_bytes(
    cfg: ModelConfig, lcfg, wl: Workload, prec: Precision, mesh, mode: str, remat: bool
) -> int:
    """Train-step activations per device for one micro-batch (see `layer_elems`).

    Per layer: tokens × (kept elements) + tokens × 3·H·S fp32 attention + sequences × 2·K·S·Dh
    K/V cache (the prompt pass writes it, the response pass reads its n-fold repeat). With remat,
    each layer keeps its input and cache only and one layer is live in full. Plus the LM head:
    2 chunks of fp32 logits and one re-laid-out copy of the head weight (XLA transposes it for the
    backward dot), and the final hidden states.
    """
    (dp, tp), e = _splits(mesh), _itemsize(prec.dtype)
    rows = -(-wl.micro // dp)
    prompts = -(-max(1, wl.micro // wl.num_generations) // dp)  # a sub-group: its prompt
    tokens = prompts * wl.seq + rows * wl.max_new_tokens
    S = wl.seq + wl.max_new_tokens
    rep, split = layer_elems(cfg, mode, lcfg)
    cache = (prompts + rows) * 2 * -(-cfg.num_kv_heads // tp) * S * cfg.head_dim * e
    attn = tokens * ATTN_COPIES * -(-cfg.num_heads // tp) * S * 4
    layer = tokens * (rep + split / tp) * e + attn + cache
    if remat:
        layers = cfg.num_layers * (tokens * cfg.hidden_size * e + cache) + layer
    else:
        layers = cfg.num_layers * layer
    V, D = cfg.vocab_size, cfg.hidden_size
    C = max(1, min(wl.logprob_chunk, wl.max_new_tokens))
    head = LOGIT_COPIES * rows * C * -(-V // tp) * 4 + -(-V // tp) * -(-D // mesh[1]) * e
    hidden = 2 * rows * wl.max_new_tokens * D * e
    return int(layers + head + hidden)


def _cache_layer(cfg: ModelConfig, rows: int, wl: Workload, prec: Precision, tp: int) -> int:
    """K and V of one layer for `rows` sequences: 2 × rows × K × (P + N) × Dh."""
    kv = -(-cfg.num_kv_heads // tp)
    return 2 * rows * kv * (wl.seq + wl.max_new_tokens) * cfg.head_dim * _itemsize(prec.dtype)


def kv_cache_bytes(cfg: ModelConfig, wl: Workload, prec: Precision, mesh) -> int:
    """Rollout KV cache of the B·n sequences, every layer (+ one layer of the B prompts' cache,
    alive while it is repeated n times)."""
    dp, tp = _splits(mesh)
    rows, prompts = -(-wl.rows // dp), -(-wl.batch // dp)
    layer = _cache_layer(cfg, rows, wl, prec, tp)
    return cfg.num_layers * layer + _cache_layer(cfg, prompts, wl, prec, tp)


def rollout_work_bytes(cfg: ModelConfig, wl: Workload, prec: Precision, mesh) -> int:
    """Decode logits and sampling buffers (2 × [B·n, V] fp32) and the prefill's live layer."""
    dp, tp = _splits(mesh)
    V, F, H = (-(-x // tp) for x in (cfg.vocab_size, cfg.intermediate_size, cfg.num_heads))
    S = wl.seq + wl.max_new_tokens
    prompt_tokens = -(-wl.batch // dp) * wl.seq
    prefill = prompt_tokens * ((2 * F + 2 * cfg.hidden_size) * _itemsize(prec.dtype) + H * S * 4)
    return LOGIT_COPIES * -(-wl.rows // dp) * V * 4 + prefill


def logprob_work_bytes(cfg: ModelConfig, wl: Workload, prec: Precision, mesh) -> int:
    """The no-grad log-prob pass over the whole batch (reference / old policy): the larger of the
    decoder part (every layer's cache, repeated n times, + hidden states) and the LM-head part
    (one chunk of logits, 2 fp32 copies, + hidden states)."""
    dp, tp = _splits(mesh)
    rows = -(-wl.rows // dp)
    C = max(1, min(wl.logprob_chunk, wl.max_new_tokens))
    hidden = 2 * rows * wl.max_new_tokens * cfg.hidden_size * _itemsize(prec.dtype)
    head = LOGIT_COPIES * rows * C * -(-cfg.vocab_size // tp) * 4
    return hidden + max(kv_cache_bytes(cfg, wl, prec, mesh), head)


# ------------------------------------------------------------------------------- modes


def merge_work_bytes(adapted: list[Leaf], mesh) -> int:
    """The merge's fp32 A·B product of one adapted kernel at a time (the largest)."""
    return max((shard_elems(x, mesh) * 4 for x in adapted), default=0)


def merged_bytes(dense: list[Leaf], mesh, weight_dtype: str = "") -> int:
    """The LoRA merged copy, laid out by `DECODE_RULES`; with `rollout.weight_dtype` its matrices
    (ndim ≥ 2: linear kernels, embedding, LM head; `rollout_weights.round_weights`) are stored
    in that dtype, the vectors (norms, biases) as they are."""
    dec, size = mesh_lib.DECODE_RULES, _itemsize(weight_dtype) if weight_dtype else None
    mats = [x for x in dense if len(x.shape) >= 2]
    vecs = [x for x in dense if len(x.shape) < 2]
    return leaf_bytes(mats, mesh, size, dec) + leaf_bytes(vecs, mesh, None, dec)


def _qlora_weights(cfg: ModelConfig, prec: Precision, mesh) -> tuple[int, int, int]:
    """Per device: (the NF4 leaves as `quant.py` lays them out, the weights left unquantized
    (embeddings, head, biases, norms, as the loader stores them), the merged tree: the linear
    kernels dequantized to the compute dtype + the rest, laid out by `DECODE_RULES`)."""
    from lorarl_jax.model import quant

    leaves = param_leaves(cfg.replace(quantization="nf4", double_quant=prec.double_quant))
    nf4 = [x for x in leaves if x.path[-1] in quant.LEAVES]
    rest = [x for x in leaves if x.path[-1] not in quant.LEAVES]
    linear = [x for x in param_leaves(cfg) if is_linear(x)]
    dec, e = mesh_lib.DECODE_RULES, _itemsize(prec.dtype)
    merged = leaf_bytes(linear, mesh, e, dec) + leaf_bytes(rest, mesh, None, dec)
    return leaf_bytes(nf4, mesh), leaf_bytes(rest, mesh), merged


def _qlora_layer_bytes(cfg: ModelConfig, prec: Precision, mesh) -> int:
    """Per device: the decoder layers' leaves of an NF4 base (what scan_layers stacks)."""
    leaves = param_leaves(cfg.replace(quantization="nf4", double_quant=prec.double_quant))
    return leaf_bytes([x for x in leaves if x.in_layers], mesh)


def estimate(
    cfg: ModelConfig, lcfg: LoraConfig, wl: Workload, prec: Precision, opts: Options
) -> dict[str, Breakdown]:
    """Breakdown per mode (full / lora / qlora) of one RL step, bytes per device."""
    mesh = tuple(opts.mesh)
    dense = param_leaves(cfg)
    adapter = lora_leaves(cfg, lcfg, jnp.dtype(prec.adapter_dtype))
    n_params, n_adapter = sum(x.size for x in dense), sum(x.size for x in adapter)
    w, a = leaf_bytes(dense, mesh), leaf_bytes(adapter, mesh)
    adam = lambda leaves: 2 * leaf_bytes(leaves, mesh, _itemsize(prec.opt_dtype))  # noqa: E731
    head_grads = leaf_bytes([x for x in dense if not x.in_layers], mesh)
    accumulate = wl.rows // wl.micro > 1  # the scan carries the summed gradients
    critic = 2 * w + adam(dense) + 4 * (cfg.hidden_size + 1) if opts.critic else 0
    q_nf4, q_rest, q_merged = _qlora_weights(cfg, prec, mesh)
    q_layers = _qlora_layer_bytes(cfg, prec, mesh)
    w_layers = leaf_bytes([x for x in dense if x.in_layers], mesh)
    on = wl.scan_layers
    w_decode = merged_bytes(dense, mesh, prec.rollout_weight_dtype)
    merge_lora, merge_qlora = opts.merge != "never", opts.merge == "always"  # auto: see Options
    adapted = [x for x in dense if is_linear(x) and x.path[-2] in lcfg.target_modules]
    products = merge_work_bytes(adapted, mesh)
    shared = dict(
        critic=critic,
        kv_cache=kv_cache_bytes(cfg, wl, prec, mesh),
        rollout_work=rollout_work_bytes(cfg, wl, prec, mesh),
        logprob_work=logprob_work_bytes(cfg, wl, prec, mesh),
    )

    def acts(mode):
        f = lambda r: activation_bytes(cfg, lcfg, wl, prec, mesh, mode, r)  # noqa: E731
        return dict(
            activations=f(wl.remat), activations_no_remat=f(False), activations_remat=f(True)
        )

    # with micro-batches the scan carries the summed gradient through every backward pass
    lora_grads = dict(gradients=a, grads_early=a * (1 + accumulate), update=a)
    full_grads = dict(gradients=w, grads_early=head_grads + w * accumulate)
    out = {
        "full": Breakdown(
            "full", n_params, n_params, weights=w, adapter=0, optimizer=adam(dense), reference=w,
            update=w, merged=0, merge_work=0, sampler_weights=w, **full_grads, **acts("full"),
            stacked=w_layers * on, **shared,
        ),
        "lora": Breakdown(
            "lora", n_params, n_adapter, weights=w, adapter=a, optimizer=adam(adapter),
            reference=0, merged=w_decode if merge_lora else 0, merge_work=products * merge_lora,
            sampler_weights=w_decode if merge_lora else w + a,
            stacked=w_layers * on, **lora_grads, **acts("lora"), **shared,
        ),
        "qlora": Breakdown(
            "qlora", n_params, n_adapter, weights=q_nf4 + q_rest, adapter=a,
            optimizer=adam(adapter), reference=0,
            merged=q_merged if merge_qlora else 0, merge_work=products * merge_qlora,
            sampler_weights=q_merged if merge_qlora else q_nf4 + q_rest + a,
            stacked=q_layers * on, **lora_grads, **acts("qlora"), **shared,
        ),
    }  # fmt: skip
    return out
