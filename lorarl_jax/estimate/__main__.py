"""`python -m lorarl_jax.estimate ...`: the memory estimator's command line (see `cli.py`)."""

import sys

from lorarl_jax.estimate.cli import main

if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ValueError as e:  # a bad argument: one line, not a traceback
        sys.exit(f"error: {e}")
