"""Sharded forward (8 fake CPU devices, mesh data=1 × fsdp=2 × tensor=4) == single device, with
and without a LoRA adapter, and adapter shardings follow the base kernels.

JAX fixes its device count when it first initialises, so the sharded run happens in a fresh
interpreter: this file re-runs itself as a script with `--xla_force_host_platform_device_count=8`,
and the script prints its measurements as JSON for the test to check.
"""

import json
import os
import subprocess
import sys

import pytest

TINY_CONFIGS = {
    # Untied head (so lm_head is sharded too), GQA with 2 KV heads.
    "llama": dict(
        model_type="llama",
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    ),
    # q/k/v biases (sharded along heads), 4 KV heads, tied head.
    "qwen2": dict(
        model_type="qwen2",
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=True,
    ),
}


def _spec(sharding, ndim):
    spec = tuple(sharding.spec)
    return spec + (None,) * (ndim - len(spec))


def _random_params(tree, key, std):
    import jax

    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten(
        [std * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    )


def _measure(kind: str) -> dict:
    """Sharded vs single-device logits and the adapter/kernel specs, for one tiny config."""
    import jax
    import numpy as np
    from flax import traverse_util
    from jax.sharding import NamedSharding, PartitionSpec

    from lorarl_jax.mesh import (
        batch_sharding,
        logical_axes,
        logical_to_sharding,
        make_mesh,
        param_shardings,
    )
    from lorarl_jax.model.config import from_hf_dict
    from lorarl_jax.model.lora import LoraConfig, init_lora, lora_logical_axes
    from lorarl_jax.model.transformer import (
        Transformer,
        abstract_params,
        init_params,
        positions_from_mask,
    )

    cfg = from_hf_dict(TINY_CONFIGS[kind])
    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    base = init_params(cfg, jax.random.key(0))
    base = _random_params(base, jax.random.key(1), 0.1)  # non-trivial norms and biases
    lora = _random_params(init_lora(base, lcfg, jax.random.key(2)), jax.random.key(3), 0.1)
    B, T = 4, 8
    mask = np.ones((B, T), np.int32)
    mask[1, :3] = 0
    mask[3, :6] = 0
    tokens = np.asarray(jax.random.randint(jax.random.key(4), (B, T), 0, cfg.vocab_size))
    batch = (tokens, np.asarray(positions_from_mask(mask)), mask)

    def forward(params, tok, pos, kv_mask):
        return Transformer(cfg).apply({"params": params}, tok, pos, kv_mask)[0]

    def forward_lora(params, lo, tok, pos, kv_mask):
        variables = {"params": params, "lora": lo}
        return Transformer(cfg, lcfg).apply(variables, tok, pos, kv_mask)[0]

    ref = np.asarray(jax.jit(forward)(base, *batch))
    ref_lora = np.asarray(jax.jit(forward_lora)(base, lora, *batch))

    mesh = make_mesh((1, 2, 4))
    abstract = abstract_params(cfg)
    base_sh = param_shardings(abstract, mesh)
    lora_sh = logical_to_sharding(lora_logical_axes(logical_axes(abstract), lora), mesh)
    base_d = jax.device_put(base, base_sh)
    lora_d = jax.device_put(lora, lora_sh)
    batch_sh = (batch_sharding(mesh),) * 3
    batch_d = jax.device_put(batch, batch_sh)
    out_sh = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, "tensor"))
    fwd = jax.jit(forward, in_shardings=(base_sh, *batch_sh), out_shardings=out_sh)
    fwd_lora = jax.jit(
        forward_lora, in_shardings=(base_sh, lora_sh, *batch_sh), out_shardings=out_sh
    )
    sharded, sharded_lora = fwd(base_d, *batch_d), fwd_lora(base_d, lora_d, *batch_d)

    flat_base = traverse_util.flatten_dict(base_d)
    adapters = {}
    for path, a in traverse_util.flatten_dict(lora_d).items():
        kernel = flat_base[path[:-1] + ("kernel",)]
        adapters["/".join(path)] = {
            "spec": _spec(a.sharding, 2),
            "kernel_spec": _spec(kernel.sharding, 2),
            "shard_shape": a.addressable_shards[0].data.shape,
            "shape": a.shape,
        }
    q = flat_base[("layers_0", "self_attn", "q_proj", "kernel")]
    return {
        "devices": len(jax.devices()),
        "diff": float(np.abs(np.asarray(sharded) - ref).max()),
        "diff_lora": float(np.abs(np.asarray(sharded_lora) - ref_lora).max()),
        "lora_effect": float(np.abs(ref_lora - ref).max()),
        "out_spec": _spec(sharded_lora.sharding, 3),
        "out_devices": len(sharded_lora.sharding.device_set),
        "q_kernel_spec": _spec(q.sharding, 2),
        "q_kernel_shard_shape": q.addressable_shards[0].data.shape,
        "adapters": adapters,
    }


@pytest.fixture(scope="module")
def measured():
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
        HF_HUB_OFFLINE="1",
    )
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_sharded_forward_equals_single_device(kind, measured):
    m = measured[kind]
    assert m["devices"] == 8 and m["out_devices"] == 8
    assert m["diff"] <= 1e-5 and m["diff_lora"] <= 1e-5, m
    assert m["lora_effect"] > 1e-2  # the adapter really changes the sharded output
    assert m["out_spec"] == [["data", "fsdp"], None, "tensor"]
    # Base kernels really are split: [64, 64] over fsdp=2 × tensor=4.
    assert m["q_kernel_spec"] == ["fsdp", "tensor"] and m["q_kernel_shard_shape"] == [32, 16]


@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_lora_shardings_follow_kernels(kind, measured):
    adapters = measured[kind]["adapters"]
    assert len(adapters) == 2 * 7 * 2  # (A, B) × 7 projections × 2 layers
    for name, a in adapters.items():
        k_in, k_out = a["kernel_spec"]
        if name.endswith("lora_a"):
            assert a["spec"] == [k_in, None], name  # in-dim as the kernel, rank replicated
        else:
            assert a["spec"] == [None, k_out], name
    # The specs are not trivially replicated: attention A is fsdp-split, B tensor-split.
    q_a = adapters["layers_0/self_attn/q_proj/lora_a"]
    q_b = adapters["layers_0/self_attn/q_proj/lora_b"]
    assert q_a["spec"] == ["fsdp", None] and q_a["shard_shape"] == [32, 4]
    assert q_b["spec"] == [None, "tensor"] and q_b["shard_shape"] == [4, 16]
    down_a = adapters["layers_1/mlp/down_proj/lora_a"]
    assert down_a["spec"] == ["tensor", None] and down_a["shard_shape"] == [32, 4]


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print(json.dumps({kind: _measure(kind) for kind in TINY_CONFIGS}))
