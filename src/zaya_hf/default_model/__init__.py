"""The embedded default model: a small ZAYA trained by `examples/train_tiny_reasoner.py` on multi-step arithmetic
with `<think>` working and on Markovian RSA aggregation prompts. Its files (config, bf16 safetensors, tokenizer)
sit in this folder as package data, so it works offline, on a fresh install, with no download.
"""

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent


def default_model_path() -> str:
    """The folder of the embedded model, for `from_pretrained` (model and tokenizer)."""
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"The embedded model's files are missing from {DEFAULT_MODEL_DIR}: the package was installed without "
            "its package data. Reinstall zaya-hf, or train one with examples/train_tiny_reasoner.py."
        )
    return str(DEFAULT_MODEL_DIR)


__all__ = ["DEFAULT_MODEL_DIR", "default_model_path"]
