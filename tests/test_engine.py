"""JetStream serving: the engine and the gRPC server give `sampler.generate`'s greedy tokens.

Needs the `serve` extra (`pip install -e '.[serve]' && pip install --no-deps
google-jetstream==0.2.2`); skipped without it. The policy is a tiny Llama with a non-zero LoRA
adapter merged in; the reference is `generate` on the same merged weights.
"""

import dataclasses
import functools
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("grpc", reason="serve extra not installed: pip install -e '.[serve]'")
pytest.importorskip(
    "jetstream", reason="JetStream not installed: pip install --no-deps google-jetstream==0.2.2"
)

from lorarl_jax import serve  # noqa: E402
from lorarl_jax.model import hf  # noqa: E402
from lorarl_jax.model.lora import LoraConfig, init_lora, merge  # noqa: E402
from lorarl_jax.sampling import engine as E  # noqa: E402  (applies jetstream_compat)
from lorarl_jax.sampling import sampler as S  # noqa: E402

N = 6  # max new tokens
PREFILL = 32  # JetStream buckets: 16, 32
PROMPTS = [  # 1 to 22 tokens: both buckets, and a one-token prompt (no prompt pass at all)
    "what",
    "what is 3 + 4 ?",
    "give the final answer after #### 12 * 3 = ?",
    "yes no 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "the answer of 7",
]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A PEFT adapter with random (non-zero) A and B, so the merged policy differs from the base."""
    _, base = hf.load_hf_model(tiny_model_dir)
    lcfg = LoraConfig(r=4, lora_alpha=8.0)
    lora = init_lora(base, lcfg, jax.random.key(1))
    keys = iter(jax.random.split(jax.random.key(2), 64))
    lora = jax.tree.map(lambda x: 0.5 * jax.random.normal(next(keys), x.shape), lora)
    out = str(tmp_path_factory.mktemp("adapter"))
    hf.save_peft_adapter(jax.device_get(lora), lcfg, out, base_model=tiny_model_dir)
    return out


@pytest.fixture(scope="module")
def policy(tiny_model_dir, adapter_dir):
    return serve.load_policy(tiny_model_dir, adapter=adapter_dir)


def reference(policy, prompt_ids, params=None, max_new=N):
    """`sampler.generate` greedy tokens per prompt, cut before the first stop id."""
    P = max(len(p) for p in prompt_ids)
    tokens = np.zeros((len(prompt_ids), P), np.int32)
    mask = np.zeros_like(tokens)
    for i, p in enumerate(prompt_ids):
        tokens[i, P - len(p) :], mask[i, P - len(p) :] = p, 1
    r = S.generate(
        policy.cfg,
        policy.params if params is None else params,
        jnp.asarray(tokens),
        jnp.asarray(mask),
        jax.random.key(0),
        n=1,
        max_new_tokens=max_new,
        stop_ids=policy.stop_ids,
        pad_id=0,
        sp=S.SamplingParams(greedy=True),
    )
    out = []
    for row in np.asarray(r.tokens).tolist():
        cut = [i for i, t in enumerate(row) if t in policy.stop_ids]
        out.append(row[: cut[0]] if cut else row)
    return out


def test_load_policy_merges_peft_adapter_and_run_checkpoint(
    policy, tiny_model_dir, adapter_dir, tmp_path
):
    _, base = hf.load_hf_model(tiny_model_dir)
    lora, lcfg = hf.load_peft_adapter(adapter_dir)
    expect = merge(base, jax.tree.map(jnp.asarray, lora), lcfg.scale)
    jax.tree.map(np.testing.assert_allclose, policy.params, expect)
    ids = [policy_tokenizer(policy).encode(p) for p in PROMPTS]
    assert reference(policy, ids) != reference(policy, ids, params=base)  # the adapter matters

    # a training run dir: run_config.json + an orbax checkpoint holding the same adapter
    from lorarl_jax.checkpoint import Checkpointer

    with open(tmp_path / "run_config.json", "w") as f:
        json.dump({"resolved_model_path": tiny_model_dir, "lora": dataclasses.asdict(lcfg)}, f)
    with Checkpointer(tmp_path / "ckpt", save_interval_steps=1, max_to_keep=None) as ck:
        state = {"lora": lora, "opt_state": {"count": np.zeros(())}, "step": 3}
        ck.save(3, state | {"rng": jax.random.key(0)}, force=True)
    from_run = serve.load_policy(None, run_dir=str(tmp_path))
    assert from_run.adapter.endswith("step 3") and from_run.stop_ids == policy.stop_ids
    jax.tree.map(np.testing.assert_allclose, from_run.params, expect)


def policy_tokenizer(policy):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(policy.tokenizer_dir)


def test_engine_api_continuous_batching_equals_generate(policy):
    """JetStream's loop by hand: 5 requests through 2 slots (insert while the other slot decodes),
    results read with JetStream's own `process_result_tokens`; token ids equal `generate`'s."""
    from jetstream.engine import token_utils

    engine = serve.make_engine(policy, slots=2, max_prefill_length=PREFILL, max_target_length=N)
    tok = engine.build_tokenizer(engine.get_tokenizer())
    assert tok.bos_id == E.NO_BOS  # this vocabulary has no BOS
    assert tok.stop_tokens == set(policy.stop_ids)
    params = engine.load_params()
    state = engine.init_decode_state()
    pending, free, live = list(enumerate(PROMPTS)), [0, 1], {}
    out = {i: [] for i in range(len(PROMPTS))}
    steps = 0
    while pending or live:
        while pending and free:
            i, text = pending.pop(0)
            padded, n = tok.encode(text, is_bos=True, max_prefill_length=PREFILL, jax_padding=False)
            prefix = engine.prefill(params=params, padded_tokens=padded, true_length=n)
            assert int(prefix.pos[0]) == n - 1  # RoPE position of the held-back last token
            slot = free.pop(0)
            state = engine.insert(prefix, state, slot)
            live[slot] = (i, np.zeros((1,), bool))
        state, result = engine.generate(params, state)
        result = result.convert_to_numpy()
        steps += 1
        for slot, (i, complete) in list(live.items()):
            samples, complete = token_utils.process_result_tokens(
                tok, slot, N, result, complete=complete
            )
            out[i] += samples[0].token_ids
            live[slot] = (i, complete)
            if complete.all():
                del live[slot]
                free.append(slot)
    ref = reference(policy, [tok.hf.encode(p) for p in PROMPTS])
    assert [out[i] for i in range(len(PROMPTS))] == ref
    assert steps < sum(len(r) + 1 for r in ref)  # slots decoded concurrently


SPLITS = [(1, 20), (7, 14), (20, 1), (5, 7, 9), (16, 1, 4)]  # chunk sizes of a 21-token prompt


def _tiny_policy(hf_dir, kind):
    """A tiny random model of `kind` (conftest.TINY) as a served policy; stop id 0."""
    d = hf_dir(kind)
    cfg, params = hf.load_hf_model(d)
    return serve.Policy(cfg, params, d, d, stop_ids=(0,), adapter="none")


def _prefill_chunks(engine, params, chunks, prefix=None):
    """Each chunk padded as JetStream pads it, appended to the prefix of the chunks before."""
    from jetstream.engine import token_utils

    for ids in chunks:
        padded, n = token_utils.pad_tokens(
            np.asarray(ids, np.int32), 0, 0, is_bos=False,
            max_prefill_length=engine.max_prefill_length, jax_padding=False,
        )  # fmt: skip
        prefix = engine.prefill(
            params=params, existing_prefix=prefix, padded_tokens=padded, true_length=n
        )
    return prefix


def _decode(engine, params, prefixes, stop_ids):
    """Inserts the prefixes into slots 0, 1, … and runs max_target_length generate steps; the
    tokens per slot, cut before the first stop id (as `reference` cuts)."""
    state = engine.init_decode_state()
    for slot, prefix in enumerate(prefixes):
        state = engine.insert(prefix, state, slot)
    steps = []
    for _ in range(engine.max_target_length):
        state, result = engine.generate(params, state)
        steps.append(np.asarray(result.data[:, 0]))
    out = []
    for row in np.stack(steps, axis=1)[: len(prefixes)].tolist():
        cut = [i for i, t in enumerate(row) if t in stop_ids]
        out.append(row[: cut[0]] if cut else row)
    return out


def _assert_same_prefill(got, one, n):
    """Same positions, pending token, valid slots, and keys/values of the n cached tokens."""
    for field in ("pos", "index", "token", "kv_mask"):
        np.testing.assert_array_equal(getattr(got, field), getattr(one, field))
    cached = lambda state: jax.tree.map(lambda x: x[:, :, :n], state.cache)  # noqa: E731
    close = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-4)
    jax.tree.map(close, cached(got), cached(one))


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_prefix_caching_equals_one_prefill(request, hf_dir, kind):
    """A 21-token prompt prefilled in 2 or 3 chunks, each appended to the prefix of the chunks
    before (`existing_prefix`), gives the one-prefill state and decodes the greedy tokens of one
    prefill, which are `generate`'s. One 16-token prefix extended by two different 5-token
    continuations serves both (it is not mutated). Llama: the served tiny Llama + adapter
    (conftest's `TINY` Llama has weights so small that its output ignores the context);
    Gemma 3: conftest's tiny one, whose local layers see 4 tokens, far fewer than the prompt."""
    if kind == "llama":
        policy = request.getfixturevalue("policy")
    else:
        policy = _tiny_policy(hf_dir, kind)
        assert policy.cfg.sliding_window == 4 and policy.cfg.layer_is_sliding(0)
    V = policy.cfg.vocab_size
    rng = np.random.default_rng(0)
    prompt = rng.integers(1, V, 21).tolist()
    other = prompt[:16] + rng.integers(1, V, 5).tolist()
    engine = serve.make_engine(policy, slots=8, max_prefill_length=PREFILL, max_target_length=N)
    params = engine.load_params()

    whole = _prefill_chunks(engine, params, [prompt])
    assert int(whole.pos[0]) == int(whole.index[0]) == 20 and int(whole.token[0]) == prompt[-1]
    for sizes in SPLITS:
        chunks = np.split(np.asarray(prompt), np.cumsum(sizes)[:-1])
        _assert_same_prefill(_prefill_chunks(engine, params, chunks), whole, 20)
    chained = [_prefill_chunks(engine, params, [prompt[:s], prompt[s:]]) for s in (1, 7, 20)]
    chained.append(_prefill_chunks(engine, params, [prompt[:5], prompt[5:12], prompt[12:]]))
    base = _prefill_chunks(engine, params, [prompt[:16]])
    branches = [_prefill_chunks(engine, params, [p[16:]], prefix=base) for p in (prompt, other)]
    out = _decode(engine, params, [whole, *chained, *branches], policy.stop_ids)
    early = [(t % (V - 1)) + 1 for t in prompt[:8]] + prompt[8:]  # another first chunk
    ref = reference(policy, [prompt, other, early])
    assert ref[0] != ref[1] and ref[0] != ref[2] and len(ref[0]) >= 3  # the context matters
    assert out == [ref[0]] * 5 + ref[:2]


def test_prefix_caching_capacity_error(policy):
    """The whole prompt, prefix included, must fit max_prefill_length: one token more is a
    ValueError. The largest prompt that fits equals one prefill and decodes `generate`'s tokens
    (its last pass, 16 wide from slot 9, runs past the 22-slot cache: a clamped write would
    shift the keys onto the prefix's slots)."""
    engine = serve.make_engine(policy, slots=1, max_prefill_length=16, max_target_length=N)
    params = engine.load_params()
    prompt = np.random.default_rng(1).integers(1, policy.cfg.vocab_size, 17).tolist()
    prefix = _prefill_chunks(engine, params, [prompt[:10]])
    full = _prefill_chunks(engine, params, [prompt[10:16]], prefix=prefix)
    _assert_same_prefill(full, _prefill_chunks(engine, params, [prompt[:16]]), 15)
    with pytest.raises(ValueError, match=r"prefix's 16 tokens \+ 1 new ones exceed max_prefill_"):
        _prefill_chunks(engine, params, [prompt[16:]], prefix=full)
    with pytest.raises(ValueError, match="max_prefill_length=16"):
        _prefill_chunks(engine, params, [prompt[10:]], prefix=prefix)
    assert _decode(engine, params, [full], policy.stop_ids) == reference(policy, [prompt[:16]])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapter_dir, tmp_path_factory):
    """`python -m lorarl_jax.serve` in a subprocess on 127.0.0.1; yields a gRPC stub."""
    import grpc
    from jetstream.core.proto import jetstream_pb2, jetstream_pb2_grpc

    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    cmd = [sys.executable, "-m", "lorarl_jax.serve", "--model", tiny_model_dir]
    cmd += ["--adapter", adapter_dir, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--slots", "2", "--max-prefill-length", str(PREFILL), "--max-target-length", str(N)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = jetstream_pb2_grpc.OrchestratorStub(channel)
    try:
        deadline = time.time() + 180
        while True:
            try:
                if stub.HealthCheck(jetstream_pb2.HealthCheckRequest(), timeout=2).is_live:
                    break
            except grpc.RpcError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield stub
    finally:
        channel.close()
        proc.terminate()
        proc.wait(timeout=30)


def test_grpc_server_concurrent_requests_equal_generate(server, policy):
    """Six concurrent Decode streams (text and token-id requests, two slots) through JetStream's
    gRPC client: each returns the greedy tokens of `generate` on the merged weights."""
    from jetstream.core.proto import jetstream_pb2

    tok = policy_tokenizer(policy)
    DR = jetstream_pb2.DecodeRequest
    requests = [DR(max_tokens=N, text_content=DR.TextContent(text=p)) for p in PROMPTS]
    ids = tok.encode("what is 5 - 2 ?")
    requests.append(DR(max_tokens=3, token_content=DR.TokenContent(token_ids=ids)))

    def call(req):
        toks, text = [], ""
        for resp in server.Decode(req, timeout=120):
            sample = resp.stream_content.samples[0]
            toks += list(sample.token_ids)
            text += sample.text
        return toks, text

    with ThreadPoolExecutor(len(requests)) as ex:
        got = list(ex.map(call, requests))
    ref = reference(policy, [tok.encode(p) for p in PROMPTS] + [ids])
    ref[-1] = ref[-1][:3]  # max_tokens=3
    assert [g[0] for g in got] == ref
    # text requests stream per-token text too; token-id requests get ids only (JetStream's rule)
    assert [g[1] for g in got] == ["".join(tok.decode([t]) for t in r) for r in ref[:-1]] + [""]
    assert any(len(r) == N for r in ref)  # not every request ended at once on a stop token
