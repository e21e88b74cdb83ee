"""Train a model: `python train.py --config configs/digits.toml` (the same as `gpubp train`)."""

import sys

from gpubp.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]], prog_name="train.py")
