"""`accelerate launch -m modeling_multimodal.train --recipe R.yaml [key=value ...]` (or `torchrun -m ...`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
