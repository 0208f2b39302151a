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
import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorarl_jax.model import gguf as gguf_lib  # noqa: E402

MARKER = "lorarl_conversion.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
OUTPUT_FILES = gguf_lib.HF_DIR_FILES + TOKENIZER_FILES + ("generation_config.json", MARKER)


def _stamp(gguf_path: Path) -> dict:
    """What a finished conversion records; a later run with a different stamp converts again."""
    code = hashlib.sha256(Path(__file__).read_bytes() + Path(gguf_lib.__file__).read_bytes())
    return {
        "gguf": str(gguf_path.resolve()),
        "gguf_bytes": gguf_path.stat().st_size,
        "converter_sha256": code.hexdigest()[:16],
    }


def is_converted(out: Path, gguf_path: Path) -> bool:
    if not all((out / name).is_file() for name in OUTPUT_FILES):
        return False
    return json.loads((out / MARKER).read_text()) == _stamp(gguf_path)


def _write_tokenizer(gguf_path: Path, out: Path, cfg: dict) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # The token ids in config.json are the authority (pad already defaults to eos there).
    for role in ("bos", "eos", "pad"):
        if cfg[f"{role}_token_id"] is not None:
            setattr(tok, f"{role}_token", tok.convert_ids_to_tokens(cfg[f"{role}_token_id"]))
    template = out / gguf_lib.CHAT_TEMPLATE_FILE  # the GGUF's own, written by convert_to_hf_dir
    if template.is_file():
        tok.chat_template = template.read_text()
    tok.model_max_length = cfg["max_position_embeddings"]
    tok.save_pretrained(str(out))
    # transformers 5 records these load-time flags as if they were tokenizer settings
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    tok_cfg = {k: v for k, v in tok_cfg.items() if k not in ("is_local", "local_files_only")}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    # transformers 5 no longer writes this file; older loaders and other tools still read it.
    special = {k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    ids = {f"{role}_token_id": cfg[f"{role}_token_id"] for role in ("bos", "eos", "pad")}
    GenerationConfig(**ids).save_pretrained(str(out))


def convert(gguf_path: Path, out: Path, force: bool = False) -> Path:
    """Converts `gguf_path` into `out` unless `out` already holds this very conversion."""
    if not force and is_converted(out, gguf_path):
        print(f"{out}: up to date")
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)  # a crash below leaves the directory incomplete
    cfg = gguf_lib.convert_to_hf_dir(gguf_path, out)
    _write_tokenizer(gguf_path, out, cfg)
    from transformers import AutoConfig

    loaded = AutoConfig.from_pretrained(str(out))
    assert loaded.model_type == cfg["model_type"], (loaded.model_type, cfg["model_type"])
    (out / MARKER).write_text(json.dumps(_stamp(gguf_path), indent=2) + "\n")
    print(f"{out}: converted from {gguf_path}")
    return out


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
