"""Converts a GGUF file into a Hugging Face checkpoint directory (float32).

    HF_HUB_OFFLINE=1 python scripts/convert_gguf.py --model smollm2   # -> $LORARL_CACHE/hf/smollm2
    HF_HUB_OFFLINE=1 python scripts/convert_gguf.py --model gemma3 --out /tmp/gemma3
    HF_HUB_OFFLINE=1 python scripts/convert_gguf.py --gguf FILE.gguf --out DIR [--force]

Writes config.json + model.safetensors (torch-free, `lorarl_jax.model.gguf.convert_to_hf_dir`),
then the tokenizer (transformers' GGUF tokenizer conversion, with the file's chat template and
bos/eos/pad tokens), special_tokens_map.json and generation_config.json. A run whose DIR already
holds a complete conversion of the same file by the same converter code returns at once (no torch
or transformers import); --force redoes it. Expected: `AutoModelForCausalLM.from_pretrained(DIR)`
and `AutoTokenizer.from_pretrained(DIR)` load with no network.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorarl_jax.model import gguf as gguf_lib  # noqa: E402
from lorarl_jax.model.convert import convert  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--gguf", type=Path, help="a .gguf file")
    source.add_argument("--model", choices=sorted(gguf_lib.SHIPPED_MODELS), help="PyPI-shipped")
    parser.add_argument("--out", type=Path, help="default with --model: $LORARL_CACHE/hf/MODEL")
    parser.add_argument("--force", action="store_true", help="convert even if up to date")
    args = parser.parse_args(argv)
    if args.out is None and args.model is None:
        parser.error("--out is required with --gguf")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gguf_path = args.gguf if args.gguf else gguf_lib.shipped_gguf(args.model)
    out = args.out if args.out else gguf_lib.cache_dir() / "hf" / args.model
    return convert(gguf_path, out, force=args.force)


if __name__ == "__main__":
    main()
