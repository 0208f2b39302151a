"""Turns a training checkpoint into a PEFT adapter and/or a merged Hugging Face model.

    python scripts/export.py --run-dir runs/demo [--step 20] --peft out/adapter
    python scripts/export.py --run-dir runs/demo --merged out/merged_model

The run directory holds `run_config.json` (written at the start of training) and `ckpt/`; the
base model is re-read from the recorded model path (checkpoints never contain it). The adapter
loads with `peft.PeftModel.from_pretrained`; the merged directory with
`transformers.AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lorarl_jax.export import export_checkpoint  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
    p.add_argument("--peft", default=None, help="output dir for the PEFT adapter")
    p.add_argument("--merged", default=None, help="output dir for the merged HF model")
    args = p.parse_args(argv)
    if not (args.peft or args.merged):
        p.error("give --peft and/or --merged")
    try:
        step = export_checkpoint(args.run_dir, args.step, args.peft, args.merged)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"exported step {step}: " + ", ".join(x for x in (args.peft, args.merged) if x))


if __name__ == "__main__":
    main()
