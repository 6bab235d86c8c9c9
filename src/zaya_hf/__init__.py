"""zaya_hf: Zyphra's ZAYA1 models as first-class citizens of the Hugging Face stack.

Importing the package registers `ZayaConfig`, `ZayaModel` and `ZayaForCausalLM` with the Auto classes for
`model_type="zaya"`, replacing transformers' built-in ZAYA for this process (same checkpoints, same tensor names).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache_zaya import ZayaCache, predict_cache_nbytes
from .checkpoints import export_for_hub
from .configuration_zaya import ZayaConfig
from .default_model import default_model_path
from .configuration_zaya import CheckpointError, InvalidConfigError
from .modeling_zaya import (
    CorruptCheckpointError,
    InvalidWeightsError,
    MismatchedWeightsError,
    MissingWeightsError,
    UnexpectedWeightsError,
    ZayaForCausalLM,
    ZayaModel,
    ZayaPreTrainedModel,
)
from .ops import install_cpu_forwards  # registers the package's fast paths with ZayaPreTrainedModel
from .quantization import ZayaQuantizationConfig  # registers quant_method "zaya_hf" with transformers

__version__ = "0.1.0"


def register_auto_classes() -> None:
    """Register the package classes with the Auto classes, and for the Auto classes of saved folders: every
    `save_pretrained` / `push_to_hub` ships the flat modeling files and an `auto_map`, so the folder also loads
    with `trust_remote_code=True` where zaya_hf is not installed. Idempotent: safe to call any number of times."""
    AutoConfig.register("zaya", ZayaConfig, exist_ok=True)
    AutoModel.register(ZayaConfig, ZayaModel, exist_ok=True)
    AutoModelForCausalLM.register(ZayaConfig, ZayaForCausalLM, exist_ok=True)
    ZayaConfig.register_for_auto_class("AutoConfig")
    ZayaModel.register_for_auto_class("AutoModel")
    ZayaForCausalLM.register_for_auto_class("AutoModelForCausalLM")


register_auto_classes()

__all__ = [
    "CheckpointError",
    "CorruptCheckpointError",
    "InvalidConfigError",
    "InvalidWeightsError",
    "UnexpectedWeightsError",
    "MismatchedWeightsError",
    "MissingWeightsError",
    "ZayaCache",
    "ZayaConfig",
    "ZayaForCausalLM",
    "ZayaModel",
    "ZayaPreTrainedModel",
    "ZayaQuantizationConfig",
    "default_model_path",
    "export_for_hub",
    "predict_cache_nbytes",
    "register_auto_classes",
]
