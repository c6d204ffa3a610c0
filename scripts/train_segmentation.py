"""`accelerate launch scripts/train_segmentation.py [CONFIG.toml] [key=value ...] [--out-dir DIR]`."""
import sys
from diffunet.cli import main
raise SystemExit(main(["segment", "train", *sys.argv[1:]]))
