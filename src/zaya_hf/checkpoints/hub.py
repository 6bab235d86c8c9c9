"""Export for the Hub: a folder that loads everywhere, with or without zaya_hf installed.

    python conversion/export_remote_code.py MODEL_DIR OUTPUT_DIR [--tokenizer DIR] [--repo-id me/zaya-ft]

The folder holds the weights (current layout, sharded safetensors), config.json with an `auto_map` for AutoConfig,
AutoModel and AutoModelForCausalLM, the flat modeling files (modeling_zaya.py and every file it imports relatively),
the tokenizer files, generation_config.json and a model card. It loads

* with `trust_remote_code=True` from the shipped code, where zaya_hf is not installed;
* without it into transformers' own ZAYA (transformers >= 5.24), the tensor names being the published ones;
* into zaya_hf's classes wherever `import zaya_hf` ran.

`model.save_pretrained` / `model.push_to_hub` of a zaya_hf model write the same weights, config and code files (the
package registers its classes for the Auto classes of saved folders); `push_to_hub` adds its own model card.
"""

import argparse
import dataclasses
import os
import re
import shutil
from pathlib import Path

import torch
from huggingface_hub import ModelCardData
from transformers import GenerationConfig, PreTrainedTokenizerBase
from transformers.dynamic_module_utils import get_relative_imports
from transformers.utils import logging

from .. import modeling_zaya
from ..configuration_zaya import ZayaConfig
from ..modeling_zaya import ZayaForCausalLM
from .convert import open_checked, write_checkpoint
from .errors import CheckpointError
from .files import CONFIG_FILE, TOKENIZER_FILES, copy_companion_files, read_json, staged_output, write_json
from .layouts import current_tensor_shapes
from .verify import CheckpointReport, run_command, verify_checkpoint

logger = logging.get_logger(__name__)

# Imports that break a module loaded as remote code: the files are flattened into one folder without zaya_hf.
_NON_FLAT_IMPORT = re.compile(
    r"^\s*(?:from\s+\.\s+import|from\s+\.\.|from\s+\.\w+\.|import\s+zaya_hf\b|from\s+zaya_hf\b).*$", re.MULTILINE
)


def remote_code_files() -> list[Path]:
    """modeling_zaya.py and, transitively, every module it imports relatively: the code a checkpoint ships.

    Imports are found as `save_pretrained` finds them (transformers' `get_relative_imports`), so the two file sets
    agree; each file is also checked for imports that cannot work once the files sit flat in a Hub folder.
    """
    files: list[Path] = []
    pending = [(Path(modeling_zaya.__file__), None)]  # (file, the file importing it)
    while pending:
        file, importer = pending.pop(0)
        if file in files:
            continue
        if not file.is_file():
            raise CheckpointError(f"{importer.name} imports {file.stem} relatively, but {file} does not exist.")
        bad = _NON_FLAT_IMPORT.search(file.read_text(encoding="utf-8"))
        if bad:
            raise CheckpointError(
                f"{file.name} has `{bad.group(0).strip()}`, which breaks loading as remote code: modules that "
                "travel with a checkpoint import each other only as `from .module import name`."
            )
        files.append(file)
        pending += [(file.parent / f"{name}.py", file) for name in sorted(get_relative_imports(file))]
    return files


def _format_count(count: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.2f}{suffix}"
    return str(count)


def model_card(config: ZayaConfig, repo_id: str, base_model: str | None = None, license: str | None = None) -> str:
    """A model card (README.md) for an exported ZAYA folder: metadata for the Hub and the ways to load it."""
    from .. import __version__  # here, not at the top: the package's __init__ imports this module

    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["zaya", "moe", "custom_code", "zaya_hf"],
        base_model=base_model,
        license=license,
    )
    parameters = sum(torch.Size(shape).numel() for shape in current_tensor_shapes(config).values())
    sliding = config.layer_types.count("hybrid_sliding")
    attention = f", {sliding} of them sliding-window ({config.sliding_window} tokens)" if sliding else ""
    body = f"""
# {repo_id.split("/")[-1]}

A ZAYA1 model ({_format_count(parameters)} parameters): {config.num_hidden_layers} layers of Compressed
Convolutional Attention ({config.num_attention_heads} query / {config.num_key_value_heads} key-value heads{attention})
and a top-1 mixture of {config.num_experts} experts with an MLP router. Exported with zaya_hf {__version__}.

## Load it

With transformers >= 5.24 (its built-in ZAYA implementation):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
model = AutoModelForCausalLM.from_pretrained("{repo_id}", dtype="auto")
```

Anywhere, with the modeling code shipped in this repository (`modeling_zaya.py` and the files it imports):

```python
model = AutoModelForCausalLM.from_pretrained("{repo_id}", dtype="auto", trust_remote_code=True)
```

With the zaya_hf package installed, `import zaya_hf` first and the same calls give its classes (with its
CCA-aware cache for shared-prefix sampling and beam search).

The router's `balancing_biases` stay float32 in any dtype. Tensor names and shapes are those of
`Zyphra/ZAYA1-8B`, so vLLM and SGLang read the weights as they are.
"""
    return f"---\n{data.to_yaml()}\n---\n{body}"


def _finish_export(
    folder: Path,
    config: ZayaConfig,
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None,
    repo_id: str,
    base_model: str | None,
    license: str | None,
) -> bool:
    """Everything beside the weights: code files, `auto_map`, generation config, tokenizer, model card. Returns
    whether the folder has a tokenizer."""
    for file in remote_code_files():
        shutil.copyfile(file, folder / file.name)
    config_json = read_json(folder / CONFIG_FILE)
    config_json["auto_map"] = dict(modeling_zaya.REMOTE_CODE_AUTO_MAP)  # this folder's code, not a repo's
    write_json(folder / CONFIG_FILE, config_json)
    if not (folder / "generation_config.json").exists():
        GenerationConfig.from_model_config(config).save_pretrained(folder)
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        tokenizer.save_pretrained(folder)
    elif tokenizer is not None:
        if not copy_companion_files(Path(tokenizer), folder, TOKENIZER_FILES):
            raise CheckpointError(f"{tokenizer} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...).")
    (folder / "README.md").write_text(model_card(config, repo_id, base_model, license), encoding="utf-8")
    return any((folder / name).exists() for name in TOKENIZER_FILES)


def export_for_hub(
    model_or_dir: ZayaForCausalLM | str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None = None,
    repo_id: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
    max_shard_size: int | str = "5GB",
    progress: bool = True,
) -> CheckpointReport:
    """Write a folder that loads with or without zaya_hf: weights, config with `auto_map`, the flat modeling files,
    tokenizer files, generation config and a model card (README.md). Upload it with `huggingface_hub.upload_folder`
    or `hf upload`.

    Args:
        model_or_dir: a zaya_hf causal LM, or a checkpoint folder in the current or the legacy layout (converted on the
            way; its tokenizer and generation files come along).
        output_dir: a new or empty folder.
        tokenizer: a tokenizer, or a folder with tokenizer files (default: those of `model_or_dir` if a folder).
        repo_id: the Hub repository the card's snippets load from (default: the output folder's name).
        base_model, license: model-card metadata.
    """
    repo_id = repo_id or Path(output_dir).resolve().name
    remote_code_files()  # code that cannot travel fails before anything is written
    if isinstance(model_or_dir, (str, os.PathLike)):
        source = Path(model_or_dir)
        reader, layout, config = open_checked(source)
        with reader, staged_output(output_dir, source) as staging:
            write_checkpoint(reader, layout, "current", config, staging, max_shard_size, progress)
            copy_companion_files(source, staging)
            has_tokenizer = _finish_export(staging, config, tokenizer, repo_id, base_model, license)
            report = verify_checkpoint(staging, values=False)  # write_checkpoint read, and so checked, every value
    elif isinstance(model_or_dir, ZayaForCausalLM):
        with staged_output(output_dir) as staging:
            model_or_dir.save_pretrained(staging, max_shard_size=max_shard_size)
            has_tokenizer = _finish_export(staging, model_or_dir.config, tokenizer, repo_id, base_model, license)
            report = verify_checkpoint(staging)
    else:
        raise TypeError(
            f"export_for_hub takes a ZayaForCausalLM or a checkpoint folder, got {type(model_or_dir).__name__} "
            "(for a PEFT model, export `model.merge_and_unload()`)."
        )
    if not has_tokenizer:
        logger.warning(f"The export in {output_dir} has no tokenizer: pass `tokenizer=` to include one.")
    return dataclasses.replace(report, folder=Path(output_dir))


def main(argv: list[str] | None = None) -> int:
    """Command line: `export SOURCE_DIR OUTPUT_DIR [--tokenizer DIR] [--repo-id ID]`. Returns the exit status."""
    parser = argparse.ArgumentParser(
        description="Write a ZAYA1 checkpoint (current or legacy layout) as a Hub folder that loads with "
        "trust_remote_code=True where zaya_hf is not installed.",
    )
    parser.add_argument("source_dir", type=Path, help="checkpoint folder (config.json + safetensors); only read")
    parser.add_argument("output_dir", type=Path, help="new folder for the export; must not exist or be empty")
    parser.add_argument("--tokenizer", type=Path, help="folder with tokenizer files (default: those in source_dir)")
    parser.add_argument("--repo-id", help="Hub repository named in the model card (default: output folder name)")
    parser.add_argument("--base-model", help="model-card metadata: the model this one was fine-tuned from")
    parser.add_argument("--license", help="model-card metadata: license identifier, e.g. apache-2.0")
    parser.add_argument("--max-shard-size", default="5GB", help="largest weight shard (default 5GB)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    return run_command(
        lambda: export_for_hub(
            args.source_dir,
            args.output_dir,
            tokenizer=args.tokenizer,
            repo_id=args.repo_id,
            base_model=args.base_model,
            license=args.license,
            max_shard_size=args.max_shard_size,
            progress=not args.no_progress,
        )
    )
