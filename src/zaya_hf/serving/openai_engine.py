"""Markovian RSA rollouts on an OpenAI-compatible server (vLLM, SGLang, ...), standard library only.

Why `/v1/completions` with token-id prompts rather than `/v1/chat/completions`: the client renders the chat
template and tokenizes, so the server prefills exactly the tokens the local engine would (prompt bounds hold to the
token, and vLLM's prefix cache shares round 0's question), and no server-side reasoning parser moves the thinking
out of the text the tails are cut from.
"""

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from http.client import HTTPException

from ..generation_zaya import Completion, RolloutBatch, is_greedy

TRANSIENT_STATUS = frozenset({408, 429}) | frozenset(range(500, 600))


class EndpointError(RuntimeError):
    """The server refused a request, or kept failing after every retry."""


class MalformedResponseError(EndpointError):
    """The server answered, but not with an OpenAI completions response."""


@dataclass
class EndpointUsage:
    """Totals over the engine's lifetime, as reported by the server's `usage` fields."""

    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _TransientError(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class OpenAICompletionsEngine:
    """A `RolloutEngine` that sends each rollout as one `/v1/completions` request, at most `max_concurrency` at a
    time. Connection errors, timeouts, 408, 429 and 5xx are retried up to `max_retries` times with exponential
    backoff (`initial_backoff` · 2^attempt, capped at `max_backoff`; a `Retry-After` header is honoured up to
    the cap); other HTTP errors and malformed responses raise at once.

    ```python
    >>> engine = OpenAICompletionsEngine("http://127.0.0.1:8000", model="Zyphra/ZAYA1-8B")
    >>> result = run_markovian_rsa(engine, "What is 1+1?", tokenizer, MarkovianRSAConfig(rounds=2))
    ```

    `model=None` asks the server (`GET /v1/models`) and takes the first model it serves. `extra_body` is merged into
    every request body (e.g. `{"stop": [...]}`); `skip_special_tokens=False` is sent so that `</think>` survives.
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        api_key: str | None = None,
        max_concurrency: int = 16,
        max_retries: int = 5,
        initial_backoff: float = 0.5,
        max_backoff: float = 30.0,
        timeout: float = 3600.0,
        extra_body: dict | None = None,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}.")
        if max_concurrency < 1 or max_retries < 0:
            raise ValueError("max_concurrency must be >= 1 and max_retries >= 0.")
        base_url = base_url.rstrip("/")
        self.base_url = base_url if base_url.endswith("/v1") else base_url + "/v1"
        self.api_key = api_key
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.timeout = timeout
        self.extra_body = dict(extra_body or {})
        self.usage = EndpointUsage()
        self._usage_lock = threading.Lock()
        self.model = model or self._served_model()

    # -- requests ----------------------------------------------------------------------------------------------

    def _request(self, path: str, body: dict | None = None, abort: threading.Event | None = None) -> dict:
        """One HTTP exchange, retried on transient failures; returns the decoded JSON object. Once `abort` is set
        (another request of the same batch failed for good) a transient failure is not retried."""
        abort = abort or threading.Event()
        for attempt in range(self.max_retries + 1):
            try:
                return self._request_once(path, body)
            except _TransientError as error:
                abandoned = EndpointError(f"{self.base_url}{path} abandoned after {error}: the batch failed")
                if abort.is_set():
                    raise abandoned from error
                if attempt == self.max_retries:
                    raise EndpointError(
                        f"{self.base_url}{path} still failing after {self.max_retries + 1} attempts: {error}"
                    ) from error
                with self._usage_lock:
                    self.usage.retries += 1
                delay = self.initial_backoff * 2**attempt if error.retry_after is None else error.retry_after
                if abort.wait(min(delay, self.max_backoff)):  # set during the backoff: no retry
                    raise abandoned from error
        raise AssertionError("unreachable")

    def _request_once(self, path: str, body: dict | None) -> dict:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body).encode()
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:
            detail = error.read()[:500].decode(errors="replace")
            if error.code in TRANSIENT_STATUS:
                raise _TransientError(f"HTTP {error.code}: {detail}", _retry_after(error.headers)) from None
            raise EndpointError(f"{self.base_url}{path} answered HTTP {error.code}: {detail}") from None
        except (OSError, HTTPException) as error:  # refused / reset / dropped connections, timeouts
            raise _TransientError(f"{type(error).__name__}: {error}") from None
        try:
            payload = json.loads(raw)
        except ValueError:
            raise MalformedResponseError(
                f"{self.base_url}{path} did not return JSON: {raw[:200].decode(errors='replace')!r}"
            ) from None
        if not isinstance(payload, dict):
            raise MalformedResponseError(f"{self.base_url}{path} returned {type(payload).__name__}, not an object.")
        return payload

    def _served_model(self) -> str:
        payload = self._request("/models")
        try:
            return payload["data"][0]["id"]
        except (KeyError, IndexError, TypeError):
            raise MalformedResponseError(
                f"{self.base_url}/models lists no model ({_preview(payload)}); pass model= explicitly."
            ) from None

    # -- the RolloutEngine interface ---------------------------------------------------------------------------

    def request_body(self, prompt: list[int], max_new_tokens: int, sampling: dict, seed: int | None) -> dict:
        """The JSON of one rollout. Filters the sampling dict does not name are sent switched off (top_p=1,
        top_k=-1, which vLLM and SGLang read as "no top-k"), so the model's generation_config cannot add them."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_new_tokens, "n": 1, "stream": False,
                "skip_special_tokens": False}
        if is_greedy(sampling):
            body["temperature"] = 0.0
        else:
            body.update(temperature=1.0, top_p=1.0, top_k=-1)
            body.update({k: v for k, v in sampling.items() if k in ("temperature", "top_p", "top_k", "min_p")})
        if "repetition_penalty" in sampling:
            body["repetition_penalty"] = sampling["repetition_penalty"]
        if seed is not None:
            body["seed"] = seed
        body.update(self.extra_body)
        return body

    def complete(
        self,
        prompt: list[int],
        max_new_tokens: int,
        sampling: dict,
        seed: int | None,
        abort: threading.Event | None = None,
    ) -> Completion:
        """One rollout: a `/v1/completions` request for `prompt` (token ids)."""
        payload = self._request("/completions", self.request_body(prompt, max_new_tokens, sampling, seed), abort)
        try:
            choice = payload["choices"][0]
            text = choice["text"]
            completion_tokens = payload["usage"]["completion_tokens"]
            prompt_tokens = payload["usage"].get("prompt_tokens", len(prompt))
        except (KeyError, IndexError, TypeError, AttributeError):
            raise MalformedResponseError(
                "not an OpenAI completions response (need choices[0].text and usage.completion_tokens): "
                f"{_preview(payload)}"
            ) from None
        if not isinstance(text, str) or not isinstance(completion_tokens, int):
            raise MalformedResponseError(f"choices[0].text must be a string and usage.completion_tokens an int: "
                                         f"{_preview(payload)}")
        with self._usage_lock:
            self.usage.requests += 1
            self.usage.prompt_tokens += prompt_tokens
            self.usage.completion_tokens += completion_tokens
        return Completion(text, completion_tokens, choice.get("finish_reason") == "stop")

    def generate(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        sampling: dict,
        seed: int | None,
        on_progress: Callable[[int], None] | None = None,
    ) -> RolloutBatch:
        """All prompts of a round concurrently. The first request that fails for good cancels those not started and
        stops the retries of those in flight; the call returns only once no request of the batch is running, so
        nothing touches `usage` or the server afterwards."""
        pool = ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(prompts)))
        abort = threading.Event()
        try:
            futures = [
                pool.submit(self.complete, prompt, max_new_tokens, sampling, _request_seed(seed, i), abort)
                for i, prompt in enumerate(prompts)
            ]
            if on_progress is not None:
                for future in futures:
                    future.add_done_callback(lambda f: f.cancelled() or f.exception() or on_progress(1))
            wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in futures if f.done() and not f.cancelled() and f.exception()), None)
            if failed is not None:
                raise failed.exception()
            return RolloutBatch([future.result() for future in futures])
        finally:
            abort.set()
            pool.shutdown(wait=True, cancel_futures=True)


def _request_seed(round_seed: int | None, index: int) -> int | None:
    """A distinct sampling seed per rollout of a round, in the range servers accept."""
    return None if round_seed is None else (round_seed * 65_537 + index) % (2**31 - 1)


def _retry_after(headers) -> float | None:
    try:
        return max(0.0, float(headers.get("Retry-After")))
    except (TypeError, ValueError):
        return None


def _preview(payload) -> str:
    return json.dumps(payload)[:300]


__all__ = ["EndpointError", "EndpointUsage", "MalformedResponseError", "OpenAICompletionsEngine"]
