"""`python scripts/train_shapes_vae.py --out DIR [--steps N] [--seed S]`: the shapes' VAE."""
import sys
from diffunet.cli import main
raise SystemExit(main(["eval", "train-vae", *sys.argv[1:]]))
