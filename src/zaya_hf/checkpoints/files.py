"""Reading and writing checkpoint folders: safetensors shards, their index, and the files that travel with them.

Readers look at headers first and read one tensor at a time; the writer holds at most one output shard in memory, so a
conversion never has the whole model in memory. Outputs are written into a staging folder that becomes the output
folder only once everything was written and verified: a failed run leaves nothing behind and never touches its input.
"""

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers.utils.hub import convert_file_size_to_int

from ..modeling_zaya import SAFETENSORS_DTYPES, _preview, check_floating, count_non_finite, non_finite_error
from .errors import CheckpointError, CorruptCheckpointError, UnknownLayoutError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"

# Files that belong with the weights but are not weights: copied unchanged by conversions and exports.
COMPANION_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
TOKENIZER_FILES = COMPANION_FILES[1:]


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UnknownLayoutError(f"{path.parent} has no {path.name}: not a checkpoint folder.") from None
    except json.JSONDecodeError as error:
        raise CorruptCheckpointError(f"{path} is not valid JSON: {error}.") from None


def write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")


class CheckpointReader:
    """The tensors of a safetensors checkpoint folder: a single `model.safetensors`, or shards listed by
    `model.safetensors.index.json`.

    Opening checks every shard header (a truncated file fails here), that every tensor has a floating-point dtype,
    and that the index and the shards agree: each indexed tensor is in its shard, each tensor of a shard is indexed,
    no tensor is stored twice. Tensors are then read one at a time, memory-mapped, and each read is checked for
    NaN/inf (one sum per tensor: reading dominates), so whatever reads the whole checkpoint checks all of it.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._handles = {}
        self.location: dict[str, str] = {}  # tensor name -> shard file name
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{self.folder}: no such folder.")
        index_path = self.folder / INDEX_FILE
        if index_path.exists():
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CorruptCheckpointError(f"{index_path} has no 'weight_map'.")
            shard_names = sorted(set(weight_map.values()))
        elif (self.folder / SINGLE_FILE).exists():
            weight_map, shard_names = None, [SINGLE_FILE]
        else:
            others = sorted(p.name for p in self.folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
            found = f"; found {_preview(others)}" if others else ""
            raise UnknownLayoutError(
                f"{self.folder} has neither {SINGLE_FILE} nor {INDEX_FILE}{found}. "
                "Only safetensors checkpoints (single file, or shards with an index) are supported."
            )

        for shard_name in shard_names:
            path = self.folder / shard_name
            if not path.is_file():
                raise CorruptCheckpointError(f"{INDEX_FILE} lists shard {shard_name}, which is not in {self.folder}.")
            try:
                handle = safe_open(path, framework="pt")
                dtypes = {name: handle.get_slice(name).get_dtype() for name in handle.keys()}
            except SafetensorError as error:
                raise CorruptCheckpointError(f"Shard {path} is truncated or corrupt: {error}.") from None
            self._handles[shard_name] = handle
            for name, dtype in dtypes.items():
                check_floating(name, SAFETENSORS_DTYPES.get(dtype, torch.uint8), str(path))
                if name in self.location:
                    raise CorruptCheckpointError(f"Tensor {name} is stored twice: in {self.location[name]} and {shard_name}.")
                self.location[name] = shard_name

        if weight_map is not None:
            unindexed = sorted(set(self.location) - set(weight_map))
            if unindexed:
                details = [f"{name} (in {self.location[name]})" for name in unindexed]
                raise CorruptCheckpointError(f"{INDEX_FILE} has no entry for {len(unindexed)} tensor(s): {_preview(details)}.")
            misplaced = sorted(name for name, shard in weight_map.items() if self.location.get(name) != shard)
            if misplaced:
                details = [f"{name} (indexed in {weight_map[name]})" for name in misplaced]
                raise CorruptCheckpointError(
                    f"{len(misplaced)} tensor(s) of {INDEX_FILE} are not in the shard it names: {_preview(details)}."
                )

    @property
    def names(self) -> list[str]:
        return list(self.location)

    @property
    def shard_names(self) -> list[str]:
        return list(self._handles)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.location[name]].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._finite(name, self._handles[self.location[name]].get_tensor(name))

    def get_rows(self, name: str, rows: int) -> torch.Tensor:
        """The first `rows` rows of a tensor, without reading the rest."""
        return self._finite(name, self._handles[self.location[name]].get_slice(name)[:rows])

    def _finite(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        (bad,) = count_non_finite([tensor])
        if bad:
            raise non_finite_error([(name, bad)], str(self.folder / self.location[name]))
        return tensor

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles = {}

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class ShardedWriter:
    """Writes tensors, in the order given, into `model-0000i-of-0000n.safetensors` shards of at most `max_shard_size`
    (a larger tensor gets a shard of its own) and `model.safetensors.index.json`. Holds one shard in memory."""

    def __init__(self, folder: Path, max_shard_size: int | str = "5GB"):
        self.folder = folder
        self.max_shard_bytes = convert_file_size_to_int(max_shard_size)
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []  # tensor names per written shard
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        # A clone: slices of one stacked tensor share storage, which safetensors refuses to write.
        self._pending[name] = tensor.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        save_file(self._pending, self.folder / self._temporary_name(len(self._shards)), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    @staticmethod
    def _temporary_name(shard: int) -> str:
        return f"model-{shard + 1:05d}.safetensors.partial"

    def close(self) -> None:
        """Write the last shard, give every shard its final name, write the index."""
        if self._pending:
            self._flush()
        weight_map = {}
        for shard, names in enumerate(self._shards):
            final_name = f"model-{shard + 1:05d}-of-{len(self._shards):05d}.safetensors"
            (self.folder / self._temporary_name(shard)).rename(self.folder / final_name)
            weight_map.update(dict.fromkeys(names, final_name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        write_json(self.folder / INDEX_FILE, index)


def copy_companion_files(source: Path, destination: Path, names: tuple[str, ...] = COMPANION_FILES) -> list[str]:
    """Copy the tokenizer and generation files present in `source`; returns the names copied."""
    copied = [name for name in names if (source / name).is_file()]
    for name in copied:
        shutil.copyfile(source / name, destination / name)
    return copied


@contextlib.contextmanager
def staged_output(output_dir: str | os.PathLike, input_dir: str | os.PathLike | None = None) -> Iterator[Path]:
    """A staging folder beside `output_dir` that becomes `output_dir` when the block succeeds and is deleted when it
    fails, with the parent folders it had to create. Refuses an output that is the input, lies inside it or contains
    it, or is a non-empty folder."""
    output = Path(output_dir).resolve()
    if input_dir is not None:
        source = Path(input_dir).resolve()
        if output == source or source in output.parents or output in source.parents:
            raise CheckpointError(f"The output folder {output} overlaps the input {source}: refusing to write there.")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"The output {output} already exists and is not an empty folder: refusing to overwrite it.")
    created = [folder for folder in (output.parent, *output.parent.parents) if not folder.exists()]  # deepest first
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        yield staging
        if output.exists():
            output.rmdir()  # empty, checked above
        staging.rename(output)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in created:
            with contextlib.suppress(OSError):  # not empty: something else wrote there meanwhile
                folder.rmdir()
        if isinstance(error, CheckpointError) and str(staging) in str(error):  # name the output, not a deleted folder
            raise type(error)(str(error).replace(str(staging), f"{output} (not written)")) from None
        raise
