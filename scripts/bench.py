"""`python scripts/bench.py [--config NAME|CONFIG.toml] [unet.key=value ...] [options]` (= diffunet bench)."""
from diffunet.bench import main
raise SystemExit(main())
