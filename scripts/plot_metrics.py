"""Plots a run's metrics.jsonl to a PNG (one subplot per key present).

python scripts/plot_metrics.py RUN_DIR [--out RUN_DIR/metrics.png] [--keys reward/mean actor/kl]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from lorarl_jax import metrics  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="directory holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="PNG path (default RUN_DIR/metrics.png)")
    parser.add_argument("--keys", nargs="+", default=list(metrics.DEFAULT_PLOT_KEYS))
    args = parser.parse_args()

    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else run_dir / "metrics.png"
    drawn = metrics.plot_metrics(run_dir / "metrics.jsonl", out, keys=args.keys)
    if not drawn:
        sys.exit(f"none of {args.keys} found in {run_dir / 'metrics.jsonl'}")
    print(f"wrote {out} ({', '.join(drawn)})")


if __name__ == "__main__":
    main()
