"""`python scripts/quality_per_nfe.py MODEL.safetensors [options]` (= diffunet eval nfe)."""
import sys
from diffunet.cli import main
raise SystemExit(main(["eval", "nfe", *sys.argv[1:]]))
