"""`python -m lorarl_jax.main --config configs/<x>.py [--config.group.key=value ...]`.

Short on purpose: parse the ml_collections config, validate it into frozen dataclasses, train.
"""

from __future__ import annotations

import json
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from lorarl_jax.config import from_config_dict

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax/absl INFO lines drown the progress bar
    from lorarl_jax.rl.trainer import train

    summary = train(from_config_dict(_CONFIG.value))
    keep = ("val_", "adapter", "curves")
    print(json.dumps({k: v for k, v in summary.items() if k.startswith(keep)}, indent=1))


def _one_line(e: Exception) -> str:
    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    m = re.search(r"'(\w+)'.*Did you mean \"(\w+)\"", msg.replace("\\", ""), re.S)
    if m:  # ml_collections' unknown-key error for a --config.x.y flag
        return f"unknown config key {m.group(1)!r}; did you mean {m.group(2)!r}?"
    return " ".join(msg.split())


def run():
    flags.mark_flag_as_required("config")
    try:
        app.run(main)
    except (ValueError, FileNotFoundError, KeyError, AttributeError) as e:
        # config and input errors: one clear line, no traceback
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
