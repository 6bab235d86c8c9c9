"""Export a ZAYA1 checkpoint folder (current or legacy layout) for the Hub: weights, config.json with auto_map, the
flat modeling files, tokenizer files and a model card, so that it loads with `trust_remote_code=True` where zaya_hf
is not installed, and without it into transformers' own ZAYA.

    python conversion/export_remote_code.py SOURCE_DIR OUTPUT_DIR [--tokenizer DIR] [--repo-id me/zaya-ft]

A thin wrapper over `zaya_hf.export_for_hub`; see `--help`.
"""

import sys

from zaya_hf.checkpoints.hub import main

if __name__ == "__main__":
    sys.exit(main())
