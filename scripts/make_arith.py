"""Writes a synthetic verifiable arithmetic task: DIR/train.parquet and DIR/val.parquet.

    python scripts/make_arith.py --out data/arith --n-train 2000 --n-val 200 --seed 0

Problems ("What is 23 + 48?", short word problems) come from ``datasets.arith_rows``; train and val
are drawn as one set of distinct problems, so they never overlap.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from lorarl_jax import data, datasets  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-val", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ops", default="+-*", help="operators to use, e.g. '+-'")
    args = parser.parse_args()

    rows = datasets.arith_rows(args.n_train + args.n_val, args.seed, ops=tuple(args.ops))
    train = [
        {**r, "extra_info": {**r["extra_info"], "split": "train"}} for r in rows[: args.n_train]
    ]
    val = [{**r, "extra_info": {**r["extra_info"], "split": "val"}} for r in rows[args.n_train :]]
    out = Path(args.out)
    data.write_rows(train, out / "train.parquet")
    data.write_rows(val, out / "val.parquet")
    print(f"arith: {len(train)} train, {len(val)} val in {out}")


if __name__ == "__main__":
    main()
