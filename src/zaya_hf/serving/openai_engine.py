"""Markovian RSA rollouts on an OpenAI-compatible server (vLLM, SGLang, `transformers serve`), over httpx.

Why `/v1/completions` with the chat template rendered here rather than `/v1/chat/completions`: the client
tokenizes, so the server prefills exactly the tokens the local engine would (prompt bounds hold to the token, and
vLLM's prefix cache shares round 0's question), and no server-side reasoning parser moves the thinking out of the
text the tails are cut from.

Servers differ in what they accept, so the first rollout negotiates once (unless configured):
* prompts as token ids (vLLM, SGLang) or, where those are refused (`transformers serve`: HTTP 400 "prompt must be a
  string"), as text decoded so that the server's tokenizer re-encodes it to the same ids (checked here before
  sending, and against the `usage.prompt_tokens` the server reports);
* the non-standard fields `skip_special_tokens`, `top_k`, `min_p`, `repetition_penalty` (vLLM, SGLang) or, where
  they are refused (`transformers serve`: HTTP 422 "Unexpected fields"), OpenAI's standard fields only — then a
  sampling dict that needs one of them is an error, never silently dropped.

Every rollout has a total deadline (`deadline`, all attempts and backoffs) and every attempt a wall-clock limit
(`timeout`, connect to last byte): a server that trickles bytes or stalls cannot hold a request past them.
"""

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

try:
    import httpx
except ImportError as error:  # pragma: no cover - httpx comes with huggingface-hub
    raise ImportError("zaya_hf.serving needs httpx: pip install 'zaya-hf[serve]'") from error

from ..generation_zaya import THINK_END, Completion, RolloutBatch, is_greedy

logger = logging.getLogger(__name__)

TRANSIENT_STATUS = frozenset({408, 429}) | frozenset(range(500, 600))
# What a server answers to a request form it does not accept (unknown fields, token-id prompts).
REFUSED_FORM_STATUS = frozenset({400, 422})
# Sized for reasoning rollouts (40K tokens at ~20 tokens/s under load is ~35 minutes) but bounded: no stuck
# server holds a rollout longer than DEFAULT_DEADLINE, retries included.
DEFAULT_TIMEOUT = 3600.0  # seconds, one attempt, connect to last byte
DEFAULT_DEADLINE = 7200.0  # seconds, one rollout, every attempt and backoff
DEFAULT_CONNECT_TIMEOUT = 30.0
STANDARD_COMPLETION_FIELDS = frozenset(
    {"model", "prompt", "max_tokens", "n", "stream", "temperature", "top_p", "seed", "stop", "frequency_penalty",
     "presence_penalty", "logit_bias", "logprobs", "echo", "best_of", "suffix", "user", "stream_options"}
)
EXTENSION_SAMPLING_KEYS = ("top_k", "min_p", "repetition_penalty")
PROMPT_FORMATS = ("auto", "tokens", "text")


class EndpointError(RuntimeError):
    """The server refused a request, or kept failing after every retry."""


class MalformedResponseError(EndpointError):
    """The server answered, but not with an OpenAI completions response."""


class EndpointTimeoutError(EndpointError):
    """A rollout ran past its deadline."""


class RequestCancelled(EndpointError):
    """The rollouts were cancelled (`Cancellation.cancel`), e.g. because the client that asked for them left."""


@dataclass
class EndpointUsage:
    """Totals over the engine's lifetime, as reported by the server's `usage` fields. `cancelled` counts requests
    abandoned while in flight or in a backoff (a failed batch, a `Cancellation`)."""

    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cancelled: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0


@dataclass(frozen=True)
class RequestForm:
    """How rollouts are sent to this server: token-id or text prompts, with or without non-standard fields."""

    token_prompts: bool
    extensions: bool


class Cancellation:
    """A handle to cancel every rollout started under it, from any thread: in-flight requests are closed (the
    server sees the client leave) and `generate` raises `RequestCancelled`."""

    def __init__(self):
        self._lock = threading.Lock()
        self._futures: set[concurrent.futures.Future] = set()
        self.cancelled = False

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            futures, self._futures = list(self._futures), set()
        for future in futures:
            future.cancel()

    def track(self, future: concurrent.futures.Future) -> None:
        with self._lock:
            if not self.cancelled:
                self._futures.add(future)
                future.add_done_callback(self._forget)
                return
        future.cancel()

    def _forget(self, future) -> None:
        with self._lock:
            self._futures.discard(future)


class _TransientError(Exception):
    def __init__(self, message: str, retry_after: float | None = None, timed_out: bool = False):
        super().__init__(message)
        self.retry_after, self.timed_out = retry_after, timed_out


class _RefusedError(EndpointError):
    """HTTP 400/422: the server does not accept this request (perhaps its form)."""


class _EventLoopThread:
    """A private asyncio loop on a daemon thread: the engine's HTTP client, concurrency slots and retries live
    there, so the synchronous `generate` of the RolloutEngine protocol and an async server can both use it."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="zaya-openai-engine", daemon=True)
        self.thread.start()

    def submit(self, coroutine: Coroutine) -> concurrent.futures.Future:
        if threading.current_thread() is self.thread:
            raise RuntimeError("the engine's synchronous API cannot be called from its own event loop.")
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
        if not self.loop.is_running():
            self.loop.close()


class OpenAICompletionsEngine:
    """A `RolloutEngine` that sends each rollout as one `/v1/completions` request, at most `max_concurrency` at a
    time over all calls (all rounds, all threads, all requests of a server built on it). Connection errors,
    timeouts, 408, 429 and 5xx are retried up to `max_retries` times with exponential backoff (`initial_backoff` ·
    2^attempt with jitter, capped at `max_backoff`; a `Retry-After` header is honoured up to the cap) while the
    rollout's `deadline` allows; other HTTP errors and malformed responses raise at once.

    ```python
    >>> engine = OpenAICompletionsEngine("http://127.0.0.1:8000", model="Zyphra/ZAYA1-8B", tokenizer=tokenizer)
    >>> result = run_markovian_rsa(engine, "What is 1+1?", tokenizer, MarkovianRSAConfig(rounds=2))
    ```

    Args:
        model: the served model's name; None asks the server (`GET /v1/models`, the first model) on first use.
        tokenizer: the model's tokenizer; needed to send text prompts to servers that refuse token ids.
        prompt_format: "auto" (token ids, text where refused), "tokens" or "text".
        extensions: send `skip_special_tokens`, `top_k`, `min_p`, `repetition_penalty` (True), only OpenAI's
            standard fields (False), or find out on the first rollout (None).
        timeout: seconds one attempt may take, connect to last byte. deadline: seconds one rollout may take,
            every attempt and backoff included.
        extra_body: merged into every request body (e.g. `{"stop": [...]}`).
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        tokenizer=None,
        api_key: str | None = None,
        max_concurrency: int = 16,
        max_retries: int = 5,
        initial_backoff: float = 0.5,
        max_backoff: float = 30.0,
        timeout: float = DEFAULT_TIMEOUT,
        deadline: float | None = DEFAULT_DEADLINE,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        prompt_format: str = "auto",
        extensions: bool | None = None,
        extra_body: dict | None = None,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}.")
        if max_concurrency < 1 or max_retries < 0:
            raise ValueError("max_concurrency must be >= 1 and max_retries >= 0.")
        if not timeout > 0 or (deadline is not None and not deadline > 0):
            raise ValueError(f"timeout and deadline must be > 0 seconds, got {timeout} and {deadline}.")
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}.")
        if prompt_format == "text" and tokenizer is None:
            raise ValueError("prompt_format='text' needs the tokenizer to decode prompts with: pass tokenizer=.")
        base_url = base_url.rstrip("/")
        self.base_url = base_url if base_url.endswith("/v1") else base_url + "/v1"
        self.tokenizer = tokenizer
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.timeout = timeout
        self.deadline = deadline
        self.extra_body = dict(extra_body or {})
        self.usage = EndpointUsage()
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._connect_timeout = min(connect_timeout, timeout)
        self._model = model
        self._forms = [
            RequestForm(token_prompts, ext)
            for token_prompts in {"auto": (True, False), "tokens": (True,), "text": (False,)}[prompt_format]
            for ext in ((True, False) if extensions is None else (extensions,))
        ]
        self.form: RequestForm | None = self._forms[0] if len(self._forms) == 1 else None
        self._runner = _EventLoopThread()
        self._client: httpx.AsyncClient | None = None
        self._slots: asyncio.Semaphore | None = None
        self._negotiation: asyncio.Lock | None = None
        self._warned_defaults = False

    # -- lifetime ----------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection pool and stop the engine's event loop (idempotent)."""
        if self._runner.loop.is_closed():
            return
        if self._client is not None:
            self._runner.submit(self._client.aclose()).result(timeout=10)
        self._runner.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, coroutine: Coroutine) -> concurrent.futures.Future:
        """Schedule `coroutine` (one of the engine's async methods) on the engine's loop."""
        return self._runner.submit(coroutine)

    def _ensure_loop_state(self) -> None:
        """The client and the slots belong to the engine's loop: created there, on first use."""
        if self._client is None:
            self._client = httpx.AsyncClient(
                headers=self._headers,
                timeout=httpx.Timeout(self.timeout, connect=self._connect_timeout),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=self.max_concurrency),
            )
            self._slots = asyncio.Semaphore(self.max_concurrency)
            self._negotiation = asyncio.Lock()

    @property
    def model(self) -> str:
        """The served model's name (asks the server once when none was given)."""
        if self._model is None:
            self.run(self.served_model()).result()
        return self._model

    # -- requests ----------------------------------------------------------------------------------------------

    async def _attempt(self, method: str, path: str, body: dict | None, timeout: float) -> dict:
        """One HTTP exchange within `timeout` seconds in all; returns the decoded JSON object."""
        self._ensure_loop_state()
        url = self.base_url + path
        try:
            response = await asyncio.wait_for(self._client.request(method, url, json=body), timeout)
        except asyncio.TimeoutError:
            raise _TransientError(f"no complete answer within {timeout:.3g} s", timed_out=True) from None
        except httpx.HTTPError as error:  # refused / reset / dropped connections, transport timeouts
            timed_out = isinstance(error, httpx.TimeoutException)
            raise _TransientError(f"{type(error).__name__}: {error}", timed_out=timed_out) from None
        if response.status_code >= 400:
            detail = response.text[:500]
            if response.status_code in TRANSIENT_STATUS:
                raise _TransientError(f"HTTP {response.status_code}: {detail}", _retry_after(response.headers))
            error_type = _RefusedError if response.status_code in REFUSED_FORM_STATUS else EndpointError
            raise error_type(f"{url} answered HTTP {response.status_code}: {detail}")
        try:
            payload = response.json()
        except ValueError:
            raise MalformedResponseError(f"{url} did not return JSON: {response.text[:200]!r}") from None
        if not isinstance(payload, dict):
            raise MalformedResponseError(f"{url} returned {type(payload).__name__}, not an object.")
        return payload

    async def request(self, method: str, path: str, body: dict | None = None) -> dict:
        """`_attempt`, retried on transient failures while the deadline allows."""
        end = None if self.deadline is None else time.monotonic() + self.deadline
        for attempt in itertools.count():
            try:
                timeout = self.timeout if end is None else min(self.timeout, end - time.monotonic())
                return await self._attempt(method, path, body, timeout)
            except _TransientError as error:
                if attempt == self.max_retries:  # a server that never answered in time is a timeout
                    raise (EndpointTimeoutError if error.timed_out else EndpointError)(
                        f"{self.base_url}{path} still failing after {self.max_retries + 1} attempts: {error}"
                    ) from None
                delay = self.initial_backoff * 2**attempt * random.uniform(0.8, 1.2)
                delay = min(delay if error.retry_after is None else error.retry_after, self.max_backoff)
                if end is not None and time.monotonic() + delay >= end:
                    raise EndpointTimeoutError(
                        f"{self.base_url}{path}: no answer within the deadline of {self.deadline:.3g} s "
                        f"({attempt + 1} attempts; last: {error})"
                    ) from None
                self.usage.retries += 1
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def served_model(self) -> str:
        if self._model is None:
            payload = await self.request("GET", "/models")
            try:
                self._model = payload["data"][0]["id"]
            except (KeyError, IndexError, TypeError):
                raise MalformedResponseError(
                    f"{self.base_url}/models lists no model ({_preview(payload)}); pass model= explicitly."
                ) from None
        return self._model

    async def forward(self, method: str, path: str, body: dict | None) -> httpx.Response:
        """One request passed through unchanged (no retries: the caller sees the server's own answer), in a slot."""
        self._ensure_loop_state()
        async with self._slot():
            request = self._client.build_request(method, self.base_url + path, json=body)
            return await asyncio.wait_for(self._client.send(request), self.deadline or self.timeout)

    async def forward_stream(self, path: str, body: dict) -> AsyncIterator:
        """A streamed request passed through unchanged: yields the `httpx.Response` (headers), then its bytes.
        Holds a slot while the stream is open; the deadline bounds the whole stream."""
        self._ensure_loop_state()
        async with self._slot():
            request = self._client.build_request("POST", self.base_url + path, json=body)
            deadline = time.monotonic() + (self.deadline or self.timeout)
            response = await asyncio.wait_for(self._client.send(request, stream=True), self.timeout)
            try:
                yield response
                chunks = response.aiter_raw()
                while True:
                    try:
                        chunk = await asyncio.wait_for(chunks.__anext__(), max(deadline - time.monotonic(), 0))
                    except StopAsyncIteration:
                        return
                    yield chunk
            finally:
                await response.aclose()

    @contextlib.asynccontextmanager
    async def _slot(self):
        """One of the engine's `max_concurrency` upstream slots, shared by every caller."""
        async with self._slots:
            self.usage.in_flight += 1
            self.usage.peak_in_flight = max(self.usage.peak_in_flight, self.usage.in_flight)
            try:
                yield
            finally:
                self.usage.in_flight -= 1

    # -- the request body --------------------------------------------------------------------------------------

    def request_body(self, prompt: list[int], max_new_tokens: int, sampling: dict, seed: int | None,
                     form: RequestForm | None = None) -> dict:
        """The JSON of one rollout in `form` (default: token ids with the non-standard fields). Filters the sampling
        dict does not name are sent switched off (top_p=1, and with extensions top_k=-1, which vLLM and SGLang read
        as "no top-k"), so the model's generation_config cannot add them."""
        form = form or RequestForm(token_prompts=True, extensions=True)
        body = {"model": self._model, "prompt": prompt if form.token_prompts else self.prompt_text(prompt),
                "max_tokens": max_new_tokens, "stream": False}
        named = {key: sampling[key] for key in EXTENSION_SAMPLING_KEYS if key in sampling}
        if is_greedy(sampling):
            body["temperature"] = 0.0
            named.pop("top_k", None), named.pop("min_p", None)  # no effect without sampling
        else:
            body.update(temperature=sampling.get("temperature", 1.0), top_p=sampling.get("top_p", 1.0))
        if form.extensions:
            body["skip_special_tokens"] = False  # keeps `</think>` where the tokenizer marks it special
            if not is_greedy(sampling):
                body["top_k"] = -1
            body.update(named)
        elif named:
            raise EndpointError(
                f"{self.base_url} refuses non-standard fields, so the sampling's "
                f"{', '.join(f'{k}={v}' for k, v in named.items())} cannot be sent; use a server that accepts them "
                "(vLLM, SGLang) or a sampling with temperature and top_p only."
            )
        if seed is not None:
            body["seed"] = seed
        body.update(self.extra_body)
        return body

    def prompt_text(self, ids: list[int]) -> str:
        """`ids` as text that the server's tokenizer (the same as ours, adding its special tokens as servers do)
        encodes back to exactly `ids`: decoded without cleanup, and without a leading BOS that encoding adds."""
        if self.tokenizer is None:
            raise EndpointError(f"{self.base_url} refuses token-id prompts: pass tokenizer= to send text prompts.")

        def decode(part):
            return self.tokenizer.decode(part, skip_special_tokens=False, clean_up_tokenization_spaces=False)

        candidates = [decode(ids)]
        if ids and ids[0] == self.tokenizer.bos_token_id:
            candidates.append(decode(ids[1:]))
        for text in candidates:
            if list(self.tokenizer(text, add_special_tokens=True)["input_ids"]) == list(ids):
                return text
        raise EndpointError(
            f"a prompt of {len(ids)} tokens does not survive decoding and re-encoding with the tokenizer, so it "
            f"cannot be sent as text exactly to {self.base_url}; use a server that accepts token-id prompts."
        )

    def _check_form(self, form: RequestForm, sampling: dict) -> None:
        if form.extensions:
            return
        if self.tokenizer is not None and THINK_END in self.tokenizer.all_special_tokens:
            raise EndpointError(
                f"{self.base_url} refuses skip_special_tokens=False, and this tokenizer marks {THINK_END} as special: "
                "the server would drop it from completions and the tails could not be cut."
            )
        if not is_greedy(sampling) and not self._warned_defaults:
            self._warned_defaults = True
            logger.warning("%s refuses non-standard fields: top_k and min_p are not sent, the server's defaults "
                           "for them apply to sampled rollouts.", self.base_url)

    # -- one rollout -------------------------------------------------------------------------------------------

    async def acomplete(self, prompt: list[int], max_new_tokens: int, sampling: dict, seed: int | None) -> Completion:
        """One rollout: a `/v1/completions` request for `prompt` (token ids), in one of the engine's slots."""
        await self.served_model()
        self._ensure_loop_state()
        async with self._slot():
            try:
                if self.form is None:
                    payload, form = await self._negotiate(prompt, max_new_tokens, sampling, seed)
                else:
                    form = self.form
                    self._check_form(form, sampling)
                    payload = await self.request(
                        "POST", "/completions", self.request_body(prompt, max_new_tokens, sampling, seed, form)
                    )
            except asyncio.CancelledError:
                self.usage.cancelled += 1
                raise
        return self._completion(payload, prompt, form)

    async def _negotiate(self, prompt, max_new_tokens, sampling, seed) -> tuple[dict, RequestForm]:
        """The first rollout tries the request forms in order of preference; the first one accepted is kept for
        every later rollout. Rollouts that arrive meanwhile wait for the outcome."""
        async with self._negotiation:
            if self.form is not None:  # decided while this rollout waited
                self._check_form(self.form, sampling)
                body = self.request_body(prompt, max_new_tokens, sampling, seed, self.form)
                return await self.request("POST", "/completions", body), self.form
            refusals = []
            for form in self._forms:
                if not form.token_prompts and self.tokenizer is None:
                    refusals.append("text prompts: no tokenizer= to decode them with")
                    continue
                try:
                    self._check_form(form, sampling)
                    body = self.request_body(prompt, max_new_tokens, sampling, seed, form)
                    payload = await self.request("POST", "/completions", body)
                except _RefusedError as error:
                    refusals.append(f"{_describe(form)}: {error}")
                    continue
                self.form = form
                if form != self._forms[0]:
                    logger.info("%s: sending %s", self.base_url, _describe(form))
                return payload, form
        raise EndpointError(f"{self.base_url} refused every request form; " + " | ".join(refusals))

    def _completion(self, payload: dict, prompt: list[int], form: RequestForm) -> Completion:
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
            raise MalformedResponseError(
                f"choices[0].text must be a string and usage.completion_tokens an int: {_preview(payload)}"
            )
        if not form.token_prompts and prompt_tokens != len(prompt):
            raise EndpointError(
                f"{self.base_url} tokenised a text prompt into {prompt_tokens} tokens where the tokenizer gives "
                f"{len(prompt)}: the server's tokenizer is not this one."
            )
        self.usage.requests += 1
        self.usage.prompt_tokens += prompt_tokens
        self.usage.completion_tokens += completion_tokens
        return Completion(text, completion_tokens, choice.get("finish_reason") == "stop")

    # -- the RolloutEngine interface ---------------------------------------------------------------------------

    async def agenerate(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        sampling: dict,
        seed: int | None,
        on_progress: Callable[[int], None] | None = None,
        max_concurrency: int | None = None,
    ) -> RolloutBatch:
        """All prompts of a round concurrently (at most `max_concurrency` of them at once, within the engine's
        slots). The first rollout that fails for good cancels the others; this returns only once none is running,
        so nothing touches `usage` or the server afterwards."""
        limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None

        async def rollout(index: int, prompt: list[int]) -> Completion:
            if limit is None:
                completion = await self.acomplete(prompt, max_new_tokens, sampling, _request_seed(seed, index))
            else:
                async with limit:
                    completion = await self.acomplete(prompt, max_new_tokens, sampling, _request_seed(seed, index))
            if on_progress is not None:
                on_progress(1)
            return completion

        tasks = [asyncio.ensure_future(rollout(i, prompt)) for i, prompt in enumerate(prompts)]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)]
        if failures:
            raise failures[0]
        return RolloutBatch(results)

    def generate(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        sampling: dict,
        seed: int | None,
        on_progress: Callable[[int], None] | None = None,
        cancellation: Cancellation | None = None,
        max_concurrency: int | None = None,
    ) -> RolloutBatch:
        """`agenerate` run on the engine's loop, from a synchronous caller (`run_markovian_rsa`). With a
        `cancellation`, cancelling it stops the batch and this raises `RequestCancelled`."""
        if cancellation is not None and cancellation.cancelled:
            raise RequestCancelled("the request was cancelled.")
        future = self.run(self.agenerate(prompts, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                                         on_progress=on_progress, max_concurrency=max_concurrency))
        if cancellation is not None:
            cancellation.track(future)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise RequestCancelled("the request was cancelled.") from None


def _describe(form: RequestForm) -> str:
    prompts = "token-id prompts" if form.token_prompts else "text prompts"
    return f"{prompts} {'with' if form.extensions else 'without'} non-standard fields"


def _request_seed(round_seed: int | None, index: int) -> int | None:
    """A distinct sampling seed per rollout of a round, in the range servers accept."""
    return None if round_seed is None else (round_seed * 65_537 + index) % (2**31 - 1)


def _retry_after(headers) -> float | None:
    try:
        return max(0.0, float(headers.get("Retry-After")))
    except (TypeError, ValueError):
        return None


def _preview(payload: Any) -> str:
    return json.dumps(payload)[:300]


__all__ = [
    "Cancellation",
    "EndpointError",
    "EndpointTimeoutError",
    "EndpointUsage",
    "MalformedResponseError",
    "OpenAICompletionsEngine",
    "RequestCancelled",
    "RequestForm",
]
