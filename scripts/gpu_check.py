"""Helpers of `scripts/gpu_check.sh` (one accelerator check without the HF hub or the GGUF).

    python scripts/gpu_check.py random-model SRC_DIR DST_DIR   # SmolLM2-shaped, random weights
    python scripts/gpu_check.py peft-load BASE_DIR ADAPTER_DIR  # the exported adapter in peft
    python scripts/gpu_check.py summary RUN_DIR/metrics.jsonl   # one line per training step

`random-model` needs torch (a test/peer dependency, never the runtime): it builds the model of
SRC_DIR's config.json with random weights and copies SRC_DIR's tokenizer files beside it.
`vowels` is the check's reward (`data.reward_fns=('scripts/gpu_check.py:vowels',)`): the share
of a completion's characters in a-e, which varies within a group even on random weights, so
GRPO has a signal to follow.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


def vowels(prompts, completions, **columns):
    return [sum(c in "abcde" for c in s) / max(1, len(s)) for s in completions]


def random_model(src: str, dst: str) -> None:
    import torch
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(src)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    model.save_pretrained(dst, safe_serialization=True)
    for f in Path(src).iterdir():
        if f.name != "config.json" and f.suffix in (".json", ".jinja", ".model", ".txt"):
            shutil.copy(f, Path(dst) / f.name)
    print(f"{dst}: {sum(p.numel() for p in model.parameters())} random parameters")


def peft_load(base_dir: str, adapter_dir: str) -> None:
    import peft
    import torch
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, adapter_dir)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        out = model(ids).logits
        with model.disable_adapter():
            ref = model(ids).logits
    print(f"peft loaded {adapter_dir}: max |logit change| {float((out - ref).abs().max()):.4g}")


def summary(path: str) -> None:
    for line in open(path):
        m = json.loads(line)
        if "reward/mean" in m:
            print(
                f"step {m['step']:3d} reward {m['reward/mean']:.4f} "
                f"step {m.get('time/step', 0):7.2f} s rollout {m.get('time/rollout', 0):6.2f} s "
                f"update {m.get('time/update', 0):6.2f} s "
                f"{m.get('perf/rollout_tokens_per_s', 0):8.0f} rollout tok/s "
                f"gap {m.get('rollout/logp_gap_mean', float('nan')):.4f}"
            )


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"random-model": random_model, "peft-load": peft_load, "summary": summary}[cmd](*args)
