"""Serving-side tools (not part of the remote code a checkpoint carries): Markovian RSA on an OpenAI-compatible
server (`OpenAICompletionsEngine`), the OpenAI-compatible Markovian RSA server (`zaya-hf serve-rsa`,
`zaya_hf.serving.rsa_server`, needs the `serve` extra) and the evaluation harness (`zaya-hf eval`,
`zaya_hf.serving.evaluation`). The algorithm itself is `zaya_hf.generation_zaya.run_markovian_rsa`, shared with
the local engine."""

from ..generation_zaya import MarkovianRSAConfig, MarkovianRSAResult, run_markovian_rsa
from .openai_engine import (
    Cancellation,
    EndpointError,
    EndpointTimeoutError,
    EndpointUsage,
    MalformedResponseError,
    OpenAICompletionsEngine,
    RequestCancelled,
    RequestForm,
)

__all__ = [
    "Cancellation",
    "EndpointError",
    "EndpointTimeoutError",
    "EndpointUsage",
    "MalformedResponseError",
    "MarkovianRSAConfig",
    "MarkovianRSAResult",
    "OpenAICompletionsEngine",
    "RequestCancelled",
    "RequestForm",
    "run_markovian_rsa",
]
