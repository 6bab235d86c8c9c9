"""Serving-side tools (not part of the remote code a checkpoint carries): Markovian RSA on an OpenAI-compatible
server. The algorithm itself is `zaya_hf.generation_zaya.run_markovian_rsa`, shared with the local engine."""

from ..generation_zaya import MarkovianRSAConfig, MarkovianRSAResult, run_markovian_rsa
from .openai_engine import EndpointError, EndpointUsage, MalformedResponseError, OpenAICompletionsEngine

__all__ = [
    "EndpointError",
    "EndpointUsage",
    "MalformedResponseError",
    "MarkovianRSAConfig",
    "MarkovianRSAResult",
    "OpenAICompletionsEngine",
    "run_markovian_rsa",
]
