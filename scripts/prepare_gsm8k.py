"""Converts GSM8K jsonl into verl-schema parquet: DIR/train.parquet and DIR/val.parquet.

    python scripts/prepare_gsm8k.py --input ../shared/data/gsm8k/train.jsonl --out data/gsm8k

The split is a seeded random draw of ``--val-size`` problems (both files keep source order);
``--max-train`` caps the training file. The conversion itself is ``datasets.gsm8k_rows_from_jsonl``.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from lorarl_jax import data, datasets  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="GSM8K jsonl with question/answer")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--val-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-train", type=int, default=None)
    args = parser.parse_args()

    rows = datasets.gsm8k_rows_from_jsonl(args.input)
    train, val = datasets.split_train_val(rows, args.val_size, args.seed, args.max_train)
    out = Path(args.out)
    data.write_rows(train, out / "train.parquet")
    data.write_rows(val, out / "val.parquet")
    print(f"{args.input}: {len(rows)} problems -> {len(train)} train, {len(val)} val in {out}")


if __name__ == "__main__":
    main()
