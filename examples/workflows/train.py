"""Reads data/ (put there from `prepare:latest`) and its arguments (`--epoch N --seed N`),
and writes checkpoint/ (the `train` workflow)."""
import argparse
import pathlib

parser = argparse.ArgumentParser()
parser.add_argument("--epoch", type=int, default=1)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--batch-size", type=int, default=32)
args = parser.parse_args()
rows = pathlib.Path("data/numbers.csv").read_text().splitlines()[1:]
print(f"training: epoch={args.epoch} seed={args.seed} batch_size={args.batch_size} rows={len(rows)}")
checkpoint = pathlib.Path("checkpoint")
checkpoint.mkdir(exist_ok=True)
(checkpoint / "model.txt").write_text(f"epoch={args.epoch} seed={args.seed} rows={len(rows)}\n")
print("saved", checkpoint / "model.txt")
