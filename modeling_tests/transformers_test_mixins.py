"""transformers' own model-test mixins (`ModelTesterMixin`, `ConfigTester`) for the installed transformers version.

They are not installed with transformers and not copied into this repository: transformers' source distribution on
the package index carries its top-level test modules (tests/test_modeling_common.py, tests/test_configuration_common.py,
...). `load()` downloads that sdist with pip once per transformers version (the only network access of the test
suite; the package index is the one place it may reach), extracts the two modules into
`${XDG_CACHE_HOME:-~/.cache}/zaya_hf/transformers-tests-<version>/` and imports them as the package
`transformers_tests`. When pip cannot get the sdist, `load()` raises `MixinsUnavailable` with pip's message, and
the suite is skipped with it.

The sdist lacks three modules that those two import; they are provided here as generated in-memory modules:

* `generation.test_utils.GenerationTesterMixin` and `exporters.test_export.ExportTesterMixin`: empty placeholders.
  `ModelTesterMixin` derives from `ExportTesterMixin` and one of its tests checks the test class against
  `GenerationTesterMixin`, so the names must exist; neither contributes a test. The generation checks the real
  mixin would run are written in test_generation_suite.py; the torch.export checks are not run.
* `utils.test_configuration_utils.config_common_kwargs`: the common `PreTrainedConfig` arguments, each set to a
  non-default value, that `ConfigTester` passes to the config class and expects back. Built below from
  `PreTrainedConfig`'s own fields.

The extracted directory gets an empty `__init__.py`: test_configuration_common.py calls transformers'
`direct_transformers_import` on its own directory, which executes that file (and then returns the installed
transformers).
"""

import dataclasses
import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import transformers
from transformers import PreTrainedConfig

PACKAGE = "transformers_tests"
MODULES = ("test_modeling_common.py", "test_configuration_common.py")
PIP_TIMEOUT_S = 900


class MixinsUnavailable(RuntimeError):
    """The sdist of the installed transformers version could not be downloaded (no index, or no such version)."""


class GenerationTesterMixin:
    """Placeholder for tests/generation/test_utils.GenerationTesterMixin, which the sdist does not carry."""


class ExportTesterMixin:
    """Placeholder for tests/exporters/test_export.ExportTesterMixin, which the sdist does not carry."""


# A non-default value for every field of PreTrainedConfig that a model config accepts as a plain argument.
_NON_DEFAULT_COMMON_CONFIG_VALUES = {
    "architectures": ["ZayaForCausalLM"],
    "output_hidden_states": True,
    "return_dict": False,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "id2label": {0: "label"},
    "label2id": {"label": 0},
    "problem_type": "regression",
}
# Fields that are not user settings: the version stamp, and the architecture kind of the config class.
_NOT_COMMON_CONFIG_ARGUMENTS = {"transformers_version", "is_encoder_decoder"}


def common_config_kwargs() -> dict:
    """`config_common_kwargs` for ConfigTester. Fails loudly when transformers adds a field not covered above."""
    fields = {field.name for field in dataclasses.fields(PreTrainedConfig)} - _NOT_COMMON_CONFIG_ARGUMENTS
    if fields != set(_NON_DEFAULT_COMMON_CONFIG_VALUES):
        raise RuntimeError(
            f"PreTrainedConfig fields {sorted(fields)} differ from those with a non-default test value "
            f"{sorted(_NON_DEFAULT_COMMON_CONFIG_VALUES)}: update _NON_DEFAULT_COMMON_CONFIG_VALUES."
        )
    return dict(_NON_DEFAULT_COMMON_CONFIG_VALUES)


def cache_dir(version: str = transformers.__version__) -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "zaya_hf" / f"transformers-tests-{version}"


def _download(version: str, folder: str) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", f"transformers=={version}",
        "--no-binary", ":all:", "--no-deps", "--disable-pip-version-check", "-q", "-d", folder,
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        raise MixinsUnavailable(f"`{' '.join(command)}` did not finish within {PIP_TIMEOUT_S} s") from error
    sdists = sorted(Path(folder).glob(f"transformers-{version}.tar.gz"))
    if done.returncode != 0 or not sdists:
        errors = [line for line in done.stderr.splitlines() if "ERROR" in line] or done.stderr.splitlines()[-1:]
        raise MixinsUnavailable(
            f"the sdist of transformers {version} could not be downloaded (`{' '.join(command)}` exited with "
            f"{done.returncode}: {' | '.join(errors) or 'no output'})"
        )
    return sdists[0]


def _extract(sdist: Path, version: str, target: Path) -> None:
    """Extract MODULES into `target`, atomically (a concurrent run sees all of them or none)."""
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        with tarfile.open(sdist) as archive:
            for name in MODULES:
                member = f"transformers-{version}/tests/{name}"
                try:
                    source = archive.extractfile(member)
                except KeyError:
                    raise FileNotFoundError(f"{sdist.name} has no {member}: the test mixins moved") from None
                (staging / name).write_bytes(source.read())
        (staging / "__init__.py").write_text("")
        try:
            staging.rename(target)
        except OSError:  # another run extracted it first
            if not all((target / name).is_file() for name in MODULES):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(f"{PACKAGE}.{name}")
    module.__path__ = []  # a package, so that its submodules import
    module.__dict__.update(attributes)
    sys.modules[module.__name__] = module
    return module


def load() -> tuple[types.ModuleType, types.ModuleType]:
    """(test_modeling_common, test_configuration_common) of the installed transformers version."""
    version = transformers.__version__
    target = cache_dir(version)
    if not all((target / name).is_file() for name in MODULES):
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as folder:
            _extract(_download(version, folder), version, target)
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(target)]
        package.__file__ = str(target / "__init__.py")
        sys.modules[PACKAGE] = package
        _module("generation")
        _module("generation.test_utils", GenerationTesterMixin=GenerationTesterMixin)
        _module("exporters")
        _module("exporters.test_export", ExportTesterMixin=ExportTesterMixin)
        _module("utils")
        _module("utils.test_configuration_utils", config_common_kwargs=common_config_kwargs())
    return (
        importlib.import_module(f"{PACKAGE}.test_modeling_common"),
        importlib.import_module(f"{PACKAGE}.test_configuration_common"),
    )
