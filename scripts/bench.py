"""`python scripts/bench.py [--config NAME|CONFIG.toml] [unet.key=value ...] [options]` (= diffunet bench)."""
import sys
from diffunet.cli import main
raise SystemExit(main(["bench", *sys.argv[1:]]))
