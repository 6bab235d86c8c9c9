"""The ZAYA implementation that test_transformers_suite.py and test_generation_suite.py run against.

`ZAYA_SUITE_TARGET=zaya_hf` (the default) tests this package; `ZAYA_SUITE_TARGET=native` runs the identical tests
against transformers' own ZAYA (`transformers.models.zaya`), so that the two can be compared on the installed
transformers version.
"""

import os

import pytest
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import zaya_hf

TARGET_PACKAGES = {"zaya_hf": "zaya_hf", "native": "transformers.models.zaya"}
TARGET = os.environ.get("ZAYA_SUITE_TARGET", "zaya_hf")
if TARGET not in TARGET_PACKAGES:
    raise ValueError(f"ZAYA_SUITE_TARGET must be one of {sorted(TARGET_PACKAGES)}, got {TARGET!r}.")
if TARGET == "native":
    from transformers.models.zaya import ZayaConfig, ZayaForCausalLM, ZayaModel
else:
    from zaya_hf import ZayaConfig, ZayaForCausalLM, ZayaModel

__all__ = ["TARGET", "TARGET_PACKAGES", "ZayaConfig", "ZayaForCausalLM", "ZayaModel", "target_auto_classes"]


@pytest.fixture(scope="class")
def target_auto_classes():
    """The Auto classes resolve model_type "zaya" to the target's classes while a test class runs (importing
    zaya_hf registers its own classes for the whole process; some tests load through AutoModel)."""
    if TARGET == "native":
        AutoConfig.register("zaya", ZayaConfig, exist_ok=True)
        AutoModel.register(ZayaConfig, ZayaModel, exist_ok=True)
        AutoModelForCausalLM.register(ZayaConfig, ZayaForCausalLM, exist_ok=True)
    yield
    zaya_hf.register_auto_classes()
