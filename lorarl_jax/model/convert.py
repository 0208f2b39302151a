"""GGUF → Hugging Face checkpoint directory, once, cached; used by the CLI and `model.path`.

Weights and config are converted torch-free (`gguf.convert_to_hf_dir`); the tokenizer comes from
transformers' GGUF tokenizer conversion (which imports torch: this one-time step may, the training
runtime never does), with the file's chat template and bos/eos/pad tokens, plus
special_tokens_map.json and generation_config.json. A marker written last records the source file
and converter code, so an interrupted conversion is redone and a finished one is reused at once.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from lorarl_jax.model import gguf as gguf_lib

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
    from lorarl_jax import process

    if process.torch_hidden():  # the training runtime: transformers here runs without torch
        return _convert_in_child(gguf_path, out, force)
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


def _convert_in_child(gguf_path: Path, out: Path, force: bool) -> Path:
    """`convert` in a fresh interpreter, where transformers' tokenizer conversion may use torch
    (`lorarl_jax/process.py` keeps it out of the training process)."""
    code = (
        "import sys; from pathlib import Path; from lorarl_jax.model.convert import convert; "
        "convert(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == '1')"
    )
    args = [sys.executable, "-c", code, str(gguf_path), str(out), "1" if force else "0"]
    r = subprocess.run(args, check=False)
    if r.returncode != 0:
        raise OSError(f"converting {gguf_path} into {out} failed (exit {r.returncode}, see above)")
    return out


def ensure_shipped(model: str, out: Path | None = None) -> Path:
    """HF dir of a PyPI-shipped model ("smollm2", "gemma3"), converting it on first use."""
    try:
        gguf_path = gguf_lib.shipped_gguf(model)
    except ImportError as e:
        raise FileNotFoundError(f"model.path={model!r} needs the package: {e}") from None
    out = out or gguf_lib.cache_dir() / "hf" / model
    return convert(gguf_path, out)
