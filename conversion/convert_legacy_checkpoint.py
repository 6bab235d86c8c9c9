"""Convert a ZAYA1 checkpoint from the legacy layout (80 half-layers: ZAYA1-base, ZAYA1-reasoning-base,
ZAYA1-8B-legacy) to the current one of Zyphra/ZAYA1-8B, or back with `--to legacy`.

    python conversion/convert_legacy_checkpoint.py INPUT_DIR OUTPUT_DIR [--to current|legacy] [--max-shard-size 5GB]

A thin wrapper over `zaya_hf.checkpoints.convert_checkpoint`; see `--help`.
"""

import sys

from zaya_hf.checkpoints.convert import main

if __name__ == "__main__":
    sys.exit(main())
