"""`accelerate launch scripts/train.py [CONFIG.toml] [section.key=value ...] [--out-dir DIR]`."""
import sys
from diffunet.cli import main
raise SystemExit(main(["train", *sys.argv[1:]]))
