"""Serves a trained policy over gRPC with JetStream (continuous batching on one device).

    pip install -e '.[serve]' && pip install --no-deps google-jetstream==0.2.2
    python -m lorarl_jax.serve --model smollm2 --adapter out/adapter --port 9000
    python -m lorarl_jax.serve --run-dir runs/demo [--step 20] --port 9000 --chat-template

The policy is the base model (HF dir, .gguf file or a shipped name) with the adapter merged in:
a PEFT adapter directory (`--adapter`) or the orbax checkpoint of a training run (`--run-dir`;
the base defaults to the run's recorded model path). `lorarl_jax.sampling.engine.LoraEngine`
runs it; `jetstream.core.server_lib` runs the prefill → insert → generate threads and the gRPC
`Orchestrator` service (`Decode` streams tokens; `HealthCheck`). Sampling is greedy unless
`--temperature` > 0. `--chat-template` wraps each text request as one user turn of the
tokenizer's chat template, as the trainer formats prompts.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp

from lorarl_jax.export import base_quantization, read_run_config, restore_adapter
from lorarl_jax.model import hf
from lorarl_jax.model.lora import merge


@dataclasses.dataclass
class Policy:
    cfg: Any  # ModelConfig
    params: Any  # merged weights
    model_dir: str
    tokenizer_dir: str
    stop_ids: tuple[int, ...]
    adapter: str  # what was merged, for the log


def load_policy(
    model: str | None,
    adapter: str | None = None,
    run_dir: str | None = None,
    step: int | None = None,
    dtype: str = "float32",
) -> Policy:
    """Base model + merged adapter (PEFT dir or run checkpoint; neither: the base model)."""
    from lorarl_jax.model.load import load_model

    if adapter and run_dir:
        raise ValueError("give --adapter or --run-dir, not both")
    rc = read_run_config(run_dir) if run_dir else None
    if not model:
        if not run_dir:
            raise ValueError("--model is required without --run-dir")
        model = rc["resolved_model_path"]
    quant = base_quantization(rc) if run_dir else {}
    loaded = load_model(model, dtype=dtype, param_dtype=dtype, **quant)
    cfg, params = loaded.cfg, loaded.params
    what = "none (base model)"
    if adapter:
        lora, lcfg = hf.load_peft_adapter(adapter)
        params, what = merge(params, lora, lcfg.scale), f"PEFT adapter {adapter}"
    elif run_dir:
        lora, lcfg, at = restore_adapter(run_dir, step, params, rc)  # an NF4 run: on its NF4 base
        params, what = merge(params, lora, lcfg.scale, jnp.dtype(dtype)), f"{run_dir} step {at}"
        cfg = cfg.dense
    return Policy(cfg, params, loaded.model_dir, loaded.tokenizer_dir, loaded.stop_ids, what)


def make_engine(policy: Policy, **engine_kwargs):
    from lorarl_jax.sampling.engine import LoraEngine

    return LoraEngine(
        policy.cfg, policy.params, policy.tokenizer_dir, policy.stop_ids, **engine_kwargs
    )


def start_server(engine, port: int, host: str = "127.0.0.1", threads: int | None = None):
    """Starts JetStream's gRPC server (interleaved prefill/generate on one device); returns it.

    JetStream 0.2.2 binds `server_lib._HOST` ("[::]", all interfaces): `host` replaces it.
    """
    from jetstream.core import config_lib, server_lib

    device = engine.mesh.devices.flat[0]
    config = config_lib.ServerConfig(
        interleaved_slices=(f"{device.platform}=1",),
        interleaved_engine_create_fns=(lambda devices: engine,),
    )
    server_lib._HOST = host
    return server_lib.run(port=port, config=config, devices=[device], threads=threads)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="HF dir, .gguf file, or smollm2 / gemma3")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--adapter", help="PEFT adapter directory to merge")
    src.add_argument("--run-dir", help="training output_dir: merge its orbax checkpoint")
    p.add_argument("--step", type=int, default=None, help="with --run-dir; default: latest")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to bind (insecure gRPC, no auth): 127.0.0.1 by default; '[::]' or "
        "'0.0.0.0' exposes the server to the network deliberately",
    )
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--slots", type=int, default=8, help="concurrent decodes (batch rows)")
    p.add_argument("--max-prefill-length", type=int, default=256, help="16, 32, …, 32768")
    p.add_argument("--max-target-length", type=int, default=256, help="max new tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16 (weights + compute)")
    p.add_argument("--chat-template", action="store_true", help="text requests are user turns")
    p.add_argument("--log-level", default="WARNING")
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    logging.getLogger().setLevel(args.log_level)
    from lorarl_jax.sampling.sampler import SamplingParams

    greedy = args.temperature == 0
    sp = SamplingParams(
        temperature=1.0 if greedy else args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        greedy=greedy,
    )
    policy = load_policy(args.model, args.adapter, args.run_dir, args.step, args.dtype)
    engine = make_engine(
        policy,
        slots=args.slots,
        max_prefill_length=args.max_prefill_length,
        max_target_length=args.max_target_length,
        sampling=sp,
        seed=args.seed,
        chat=args.chat_template,
    )
    server = start_server(engine, args.port, args.host)
    print(
        f"serving {policy.model_dir} + {policy.adapter} on {args.host}:{args.port} "
        f"({args.slots} slots, {jax.devices()[0].platform})",
        flush=True,
    )
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
