"""Reads its arguments (the `train` workflow): `--epoch N --seed N`."""
import argparse

parser = argparse.ArgumentParser()
parser.add_argument("--epoch", type=int, default=1)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--batch-size", type=int, default=32)
args = parser.parse_args()
print(f"training: epoch={args.epoch} seed={args.seed} batch_size={args.batch_size}")
