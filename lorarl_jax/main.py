"""`python -m lorarl_jax.main --config configs/<x>.py [--config.group.key=value ...]`.

Short on purpose: parse the ml_collections config, validate it into frozen dataclasses, train.

Errors: every failure caused by the user's input (config file and keys, model / data / reward
files, the output directory, a full disk) ends the process with exit code 2 and one line on
stderr naming the key, file or row; an exception of any other type is our bug and keeps its
traceback. The config file and the `--config.x.y` keys are checked before absl parses them, so a
missing file, a syntax error or a misspelt key is one line too.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys

from lorarl_jax import process

process.configure()  # before absl/jax/transformers: one malloc arena, no torch (process.py)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from lorarl_jax.config import default_config, from_config_dict  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.")

# what a user's input can raise (our own code turns its input failures into these, naming the
# key/file/row); OSError covers missing paths, permissions and a full disk
USER_ERRORS = (ValueError, OSError, KeyError, SyntaxError)
# common names of other tools for our keys (difflib alone cannot guess these)
_ALIASES = {
    "lora.rank": "lora.r",
    "lora.alpha": "lora.lora_alpha",
    "lora.dropout": "lora.lora_dropout",
    "optim.learning_rate": "optim.lr",
    "rollout.n": "rollout.num_generations",
    "rollout.max_tokens": "rollout.max_new_tokens",
    "data.train_batch_size": "data.batch_size",
    "trainer.total_training_steps": "trainer.steps",
}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax/absl INFO lines drown the progress bar
    from lorarl_jax.rl.trainer import train

    summary = train(from_config_dict(_CONFIG.value))
    keep = ("val_", "adapter", "model", "curves")
    print(json.dumps({k: v for k, v in summary.items() if k.startswith(keep)}, indent=1))


def _one_line(e: BaseException) -> str:
    if isinstance(e, SyntaxError):
        return f"{e.filename}: SyntaxError at line {e.lineno}: {e.msg}"
    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    m = re.search(r"'(\w+)'.*Did you mean \"(\w+)\"", msg.replace("\\", ""), re.S)
    if m:  # ml_collections' unknown-key error for a --config.x.y flag
        return f"unknown config key {m.group(1)!r}; did you mean {m.group(2)!r}?"
    return " ".join(msg.split())


def _known_keys() -> list[str]:
    d = default_config().to_dict()
    return [f"{g}.{k}" for g, sub in d.items() for k in sub]


def check_args(argv: list[str]) -> None:
    """The config file exists and compiles; every `--config.group.key` override names a key."""
    known = _known_keys()
    it = iter(argv)
    for arg in it:
        if arg == "--config":
            arg = f"--config={next(it, '')}"
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
            if not os.path.exists(path) and ":" in path:  # ml_collections' `file.py:arg`
                path = path.split(":", 1)[0]
            if not os.path.isfile(path):
                raise FileNotFoundError(f"config file {path!r} does not exist")
            with open(path) as f:
                source = f.read()
            compile(source, path, "exec")  # a SyntaxError names file and line
            if "get_config" not in source:
                raise ValueError(f"config file {path!r} defines no get_config()")
        elif arg.startswith("--config."):
            key = arg[len("--config.") :].split("=", 1)[0]
            if key not in known:
                near = _ALIASES.get(key) or next(iter(difflib.get_close_matches(key, known, 1)), 0)
                hint = f"; did you mean {near!r}?" if near else ""
                raise ValueError(f"unknown config key {key!r}{hint}")


def run():
    flags.mark_flag_as_required("config")
    try:
        check_args(sys.argv[1:])
        try:  # the config file's own code runs here: anything it raises is the user's
            argv = flags.FLAGS(sys.argv)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"config: {type(e).__name__}: {_one_line(e)}") from None
        app.run(main, flags_parser=lambda _: argv)
    except USER_ERRORS as e:
        # config and input errors: one clear line, no traceback
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
