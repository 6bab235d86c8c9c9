"""`zaya-hf serve-rsa`: an OpenAI-compatible Markovian RSA server (FastAPI on uvicorn).

A drop-in for Zyphra's proxy (the fields of `rsa_request`), in front of an OpenAI-compatible upstream
(`UpstreamBackend`: vLLM, SGLang, `transformers serve`, through `OpenAICompletionsEngine`) or a model in this process
(`LocalBackend`: `LocalGenerationEngine`). What is ours, on top of FastAPI/uvicorn/httpx: the request semantics,
`stream=true` (one `rsa_progress` chunk per round, then the answer as chat-completion chunks), per-round results and
token usage in the response, the per-request token budget, one concurrency cap shared by every request (the
engine's slots: no upstream call above it), and cancellation of a request's upstream calls when its client
disconnects (counted in `/health`).

Each RSA request runs `run_markovian_rsa` on a worker thread (the algorithm and the tokenizer are synchronous);
its rollouts go to the engine's own event loop, and the request's `Cancellation` closes them.
"""

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as error:  # pragma: no cover - the serve extra
    raise ImportError("zaya-hf serve-rsa needs FastAPI and uvicorn: pip install 'zaya-hf[serve]'") from error

from ..generation_zaya import (
    THINK_END,
    LocalGenerationEngine,
    MarkovianRSAResult,
    aggregation_messages,
    candidate_tail,
    encode_chat,
    extract_boxed_answer,
    majority_vote,
    question_text,
    run_markovian_rsa,
)
from .openai_engine import (
    Cancellation,
    EndpointError,
    EndpointTimeoutError,
    OpenAICompletionsEngine,
    RequestCancelled,
)
from .rsa_request import (
    RequestError,
    RSARequest,
    _Fields,
    _messages,
    _sampling,
    is_rsa_request,
    parse_rsa_request,
    strip_rsa_fields,
)

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 5.0  # an SSE comment while a round runs: proxies keep the stream open
DISCONNECT_POLL_SECONDS = 0.1  # how often a non-streaming request checks whether its client left
THINK_START = "<think>"


@dataclass
class ServerStats:
    """Counters served by `/health`."""

    rsa_requests: int = 0
    active_rsa_requests: int = 0
    cancelled_requests: int = 0  # RSA requests whose client left before the answer


# ----------------------------------------------------------------------------------------------------------------
# Backends: where rollouts and plain requests go
# ----------------------------------------------------------------------------------------------------------------


class UpstreamBackend:
    """An OpenAI-compatible upstream. Rollouts and pass-through requests share the engine's slots."""

    def __init__(self, engine: OpenAICompletionsEngine, tokenizer):
        self.engine = engine
        self.tokenizer = tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.model

    async def start(self) -> None:
        """Ask the upstream for its model now (not on the first request, from the server's loop)."""
        await asyncio.wrap_future(self.engine.run(self.engine.served_model()))

    def rollout_engine(self, cancellation: Cancellation, max_concurrency: int | None):
        return _BoundEngine(self.engine.generate, cancellation=cancellation, max_concurrency=max_concurrency)

    def upstream_usage(self) -> dict:
        return vars(self.engine.usage).copy()

    async def plain(self, method: str, path: str, body: dict | None) -> Response:
        """The request forwarded unchanged; the upstream's answer returned unchanged (streams streamed)."""
        engine = self.engine
        try:
            if body is not None and body.get("stream"):
                return await self._forward_stream(path, body)
            response = await asyncio.wrap_future(engine.run(engine.forward(method, path, body)))
        except asyncio.TimeoutError:
            return _upstream_error(504, f"the upstream gave no answer within {engine.deadline or engine.timeout} s")
        except Exception as error:  # httpx transport errors
            return _upstream_error(502, f"the upstream failed: {type(error).__name__}: {error}")
        return Response(response.content, status_code=response.status_code,
                        media_type=response.headers.get("content-type"))

    async def _forward_stream(self, path: str, body: dict) -> Response:
        engine = self.engine
        stream = engine.forward_stream(path, body)
        head = await asyncio.wrap_future(engine.run(_next(stream)))

        async def chunks():
            try:
                while (chunk := await asyncio.wrap_future(engine.run(_next(stream)))) is not _END:
                    yield chunk
            finally:
                engine.run(stream.aclose())  # closes the upstream stream (also when our client left)

        return StreamingResponse(chunks(), status_code=head.status_code,
                                 media_type=head.headers.get("content-type"))

    async def models(self) -> Response:
        return await self.plain("GET", "/models", None)


class LocalBackend:
    """A model in this process. One batch runs at a time (the model's device is the cap, so `rsa_max_concurrency`,
    a cap on upstream calls, has nothing to limit here); a cancelled request stops at its next round."""

    def __init__(self, model, tokenizer, model_name: str):
        self.engine = LocalGenerationEngine(model, tokenizer)
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.lock = threading.Lock()
        self.default_max_tokens = model.generation_config.max_new_tokens or 256

    def rollout_engine(self, cancellation: Cancellation, max_concurrency: int | None):
        def generate(prompts, **kwargs):
            with self.lock:
                if cancellation.cancelled:
                    raise RequestCancelled("the request was cancelled.")
                return self.engine.generate(prompts, **kwargs)

        return _BoundEngine(generate)

    def upstream_usage(self) -> None:
        return None

    async def start(self) -> None:
        pass

    async def plain(self, method: str, path: str, body: dict | None) -> Response:
        """Plain chat and text completions, generated here (no RSA)."""
        if path not in ("/chat/completions", "/completions"):
            return _error(RequestError(f"no route /v1{path} on this server", status=404, error_type="not_found"))
        try:
            request = _PlainRequest.parse(body or {}, chat=path == "/chat/completions", tokenizer=self.tokenizer,
                                          default_max_tokens=self.default_max_tokens, model=self.model_name)
        except RequestError as error:
            return _error(error)
        engine = self.rollout_engine(Cancellation(), None)
        batch = await asyncio.to_thread(
            engine.generate, [request.prompt] * request.n, max_new_tokens=request.max_tokens,
            sampling=request.sampling, seed=request.seed,
        )
        return request.response(batch.completions, self.model_name)

    async def models(self) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": 0, "owned_by": "zaya-hf"}]})


class _BoundEngine:
    """A RolloutEngine for one request: `generate` with the request's cancellation and cap bound in."""

    def __init__(self, generate: Callable, **bound):
        self._generate = generate
        self._bound = bound

    def generate(self, prompts, **kwargs):
        return self._generate(prompts, **kwargs, **self._bound)


class _RoundReporter:
    """Calls `on_round(index, batch)` after each round (one `generate` call per round)."""

    def __init__(self, engine, on_round: Callable):
        self.engine, self.on_round, self.rounds = engine, on_round, 0

    def generate(self, prompts, **kwargs):
        batch = self.engine.generate(prompts, **kwargs)
        self.on_round(self.rounds, batch)
        self.rounds += 1
        return batch


_END = object()


async def _next(stream):
    """The next item of an async iterator, `_END` at its end (StopAsyncIteration cannot cross a future)."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return _END


# ----------------------------------------------------------------------------------------------------------------
# Plain (non-RSA) requests of the local backend
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _PlainRequest:
    chat: bool
    prompt: list[int]
    n: int
    max_tokens: int
    sampling: dict
    seed: int | None
    stream: bool
    model: str

    FIELDS = frozenset({"model", "messages", "prompt", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                        "seed", "max_tokens", "max_completion_tokens", "n", "stream", "stream_options", "user"})

    @classmethod
    def parse(cls, body: dict, chat: bool, tokenizer, default_max_tokens: int, model: str) -> "_PlainRequest":
        unknown = sorted(set(body) - cls.FIELDS - ({"prompt"} if chat else {"messages"}))
        unknown += ["prompt"] if chat and "prompt" in body else ["messages"] if not chat and "messages" in body else []
        if unknown:
            raise RequestError(f"{unknown[0]!r} is not supported by this server.", param=unknown[0])
        fields = _Fields(body)
        if chat:
            prompt = encode_chat(tokenizer, _messages(body.get("messages")))
        else:
            text = body.get("prompt")
            if isinstance(text, list) and text and all(isinstance(t, int) and not isinstance(t, bool) for t in text):
                if not all(0 <= t < len(tokenizer) for t in text):
                    raise RequestError(f"prompt holds token ids outside the vocabulary (0..{len(tokenizer) - 1}).",
                                       param="prompt")
                prompt = list(text)
            elif isinstance(text, str) and text:
                prompt = list(tokenizer(text, add_special_tokens=True)["input_ids"])
            else:
                raise RequestError("prompt must be a non-empty string or a list of token ids.", param="prompt")
        sampling = _sampling(fields.number("temperature", 1.0, minimum=0.0), fields.number("top_p", 1.0, minimum=0.0),
                             fields.integer("top_k", None), fields.number("min_p", None, minimum=0.0),
                             fields.number("repetition_penalty", None, minimum=0.0))
        max_tokens = fields.integer("max_completion_tokens", fields.integer("max_tokens", default_max_tokens,
                                                                            minimum=1), minimum=1)
        return cls(chat, prompt, fields.integer("n", 1, minimum=1), max_tokens, sampling, fields.integer("seed", None),
                   fields.flag("stream", False), model)

    def response(self, completions, model: str) -> Response:
        created, completion_id = int(time.time()), f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
        usage = _usage(len(self.prompt) * len(completions), sum(c.num_tokens for c in completions))
        if self.chat:
            choices = [{"index": i, "message": _assistant_message(c.text), "finish_reason": _finish(c)}
                       for i, c in enumerate(completions)]
            payload = {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
                       "choices": choices, "usage": usage}
        else:
            choices = [{"index": i, "text": c.text, "finish_reason": _finish(c)} for i, c in enumerate(completions)]
            payload = {"id": completion_id, "object": "text_completion", "created": created, "model": model,
                       "choices": choices, "usage": usage}
        if not self.stream:
            return JSONResponse(payload)

        def events():
            for i, choice in enumerate(choices):
                if self.chat:
                    delta = {"role": "assistant", **{k: v for k, v in choice["message"].items() if k != "role"}}
                    yield _sse(_chunk(completion_id, created, model, [{"index": i, "delta": delta}]))
                    yield _sse(_chunk(completion_id, created, model,
                                      [{"index": i, "delta": {}, "finish_reason": choice["finish_reason"]}]))
                else:
                    yield _sse({**payload, "choices": [choice], "usage": None})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


# ----------------------------------------------------------------------------------------------------------------
# Markovian RSA requests
# ----------------------------------------------------------------------------------------------------------------


class RSARun:
    """One RSA request on its worker thread: the run, its cancellation, and the response built from the result."""

    def __init__(self, backend, request: RSARequest, model: str):
        self.backend, self.request, self.model = backend, request, model
        self.cancellation = Cancellation()
        self.id = f"chatcmpl-rsa-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.last_batch = None

    def run(self, on_round: Callable | None = None) -> MarkovianRSAResult:
        engine = self.backend.rollout_engine(self.cancellation, self.request.max_concurrency)

        def report(index, batch):
            self.last_batch = batch  # the final round's, once the run is done: its completions' finish reasons
            if self.request.debug:
                logger.info("%s round %d/%d: %d rollouts, %d tokens", self.id, index, self.request.config.rounds,
                            len(batch.completions), sum(c.num_tokens for c in batch.completions))
            if on_round is not None:
                on_round(index, batch)

        return run_markovian_rsa(_RoundReporter(engine, report), self.request.messages, self.backend.tokenizer,
                                 self.request.config, progress=False)

    def progress_chunk(self, index: int, batch) -> dict:
        answers = [extract_boxed_answer(c.text) for c in batch.completions]
        progress = {"round": index, "rounds": self.request.config.rounds, "completions": len(batch.completions),
                    "completion_tokens": sum(c.num_tokens for c in batch.completions), "answers": answers,
                    "majority_answer": majority_vote(answers)}
        return {**_chunk(self.id, self.created, self.model, []), "rsa_progress": progress}

    def choices(self, result: MarkovianRSAResult) -> list[dict]:
        """Zyphra's: every final aggregation is a choice. Majority: the first final candidate with the majority
        answer (the first candidate when none has an answer)."""
        final = result.rounds[-1]
        indices = range(len(final.completions))
        if self.request.selection == "majority":
            chosen = next((i for i, a in enumerate(result.final_answers) if a is not None and a == result.answer), 0)
            indices = [chosen]
        return [{"index": position, "message": _assistant_message(final.completions[i]),
                 "finish_reason": _finish(self.last_batch.completions[i])} for position, i in enumerate(indices)]

    def usage(self, result: MarkovianRSAResult) -> dict:
        return _usage(sum(sum(r.prompt_lengths) for r in result.rounds), result.generated_tokens)

    def metadata(self, result: MarkovianRSAResult) -> dict:
        """Zyphra's `rsa_metadata` keys, then the per-round results of this server."""
        rounds = []
        for record in result.rounds:
            answers = [extract_boxed_answer(text) for text in record.completions]
            row = {"round": record.index, "completions": len(record.completions),
                   "completion_tokens": record.completion_tokens, "generated_tokens": record.generated_tokens,
                   "prompt_tokens": record.prompt_lengths, "subsets": [list(s) for s in record.subsets],
                   "answers": answers, "majority_answer": majority_vote(answers)}
            if self.request.return_completions:
                row["texts"] = record.completions
            rounds.append(row)
        history = [record.generated_tokens / len(record.completions) for record in result.rounds]
        return {**self.request.zyphra, "rsa_token_count_history": history, "rsa_selection": self.request.selection,
                "answer": result.answer, "final_answers": result.final_answers, "rounds": rounds}

    def aggregation_prompt(self, result: MarkovianRSAResult) -> list[dict]:
        """The final round's first aggregation prompt (Zyphra's `return_aggregation_prompt`)."""
        config, previous, final = self.request.config, result.rounds[-2], result.rounds[-1]
        tails = [candidate_tail(previous.completions[j], config.tail_tokens, config.tail_unit, self.backend.tokenizer,
                                config.answer_tail) for j in final.subsets[0]]
        return aggregation_messages(config.prompt_template, question_text(self.request.messages), tails)

    def response(self, result: MarkovianRSAResult) -> dict:
        payload = {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                   "choices": self.choices(result), "usage": self.usage(result)}
        self._extras(payload, result)
        return payload

    def _extras(self, payload: dict, result: MarkovianRSAResult) -> None:
        if self.request.return_metadata:
            payload["rsa_metadata"] = self.metadata(result)
        if self.request.return_aggregation_prompt:
            payload["aggregation_prompt"] = self.aggregation_prompt(result)

    def final_chunks(self, result: MarkovianRSAResult):
        """The answer in OpenAI's chunk format: per choice a content delta and a finish chunk, then (with
        stream_options.include_usage) the usage chunk; the RSA metadata rides on the last chunk."""
        chunks = []
        for choice in self.choices(result):
            delta = {"role": "assistant", **{k: v for k, v in choice["message"].items() if k != "role"}}
            chunks.append(_chunk(self.id, self.created, self.model, [{"index": choice["index"], "delta": delta}]))
            chunks.append(_chunk(self.id, self.created, self.model,
                                 [{"index": choice["index"], "delta": {}, "finish_reason": choice["finish_reason"]}]))
        if self.request.include_usage:
            chunks.append({**_chunk(self.id, self.created, self.model, []), "usage": self.usage(result)})
        self._extras(chunks[-1], result)
        return chunks


def build_app(backend, *, max_request_tokens: int | None = None, max_active_requests: int = 64) -> FastAPI:
    """The ASGI app. `max_request_tokens` caps every RSA request's worst-case decode tokens; `max_active_requests`
    RSA requests run at once (more wait for a worker thread); upstream calls are capped by the backend."""
    stats = ServerStats()
    workers = ThreadPoolExecutor(max_workers=max_active_requests, thread_name_prefix="rsa-request")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await backend.start()
        yield
        workers.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="zaya-hf serve-rsa", lifespan=lifespan)
    app.state.stats, app.state.backend = stats, backend

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error):
        return _error(RequestError(str(error.detail), status=error.status_code,
                                   error_type="not_found" if error.status_code == 404 else "invalid_request_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": backend.model_name, **vars(stats), "upstream": backend.upstream_usage()}

    @app.get("/v1/models")
    async def models():
        return await backend.models()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        if not is_rsa_request(body):
            return await backend.plain("POST", "/chat/completions", body)
        try:
            rsa = parse_rsa_request(body, max_request_tokens)
            if body.get("model") not in (None, backend.model_name):
                raise RequestError(f"The model {body['model']!r} does not exist; this server serves "
                                   f"{backend.model_name!r}.", param="model", status=404, error_type="not_found")
        except RequestError as error:
            return _error(error)
        if rsa is None:  # rsa_t: 0 is a plain request, as in Zyphra's proxy
            return await backend.plain("POST", "/chat/completions", strip_rsa_fields(body))
        run = RSARun(backend, rsa, backend.model_name)
        stats.rsa_requests += 1
        return _stream_rsa(run, stats, workers) if rsa.stream else await _answer_rsa(run, request, stats, workers)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _json_body(request)
        return body if isinstance(body, Response) else await backend.plain("POST", "/completions", body)

    return app


async def _answer_rsa(run: RSARun, request: Request, stats: ServerStats, workers) -> Response:
    """A non-streaming RSA request: the run on a worker thread while the client is watched; a client that leaves
    cancels the run (and its upstream calls)."""
    loop = asyncio.get_running_loop()
    stats.active_rsa_requests += 1
    future = loop.run_in_executor(workers, run.run)
    try:
        while not future.done():
            await asyncio.wait({future}, timeout=DISCONNECT_POLL_SECONDS)
            if not future.done() and await request.is_disconnected():
                run.cancellation.cancel()
                stats.cancelled_requests += 1
                return Response(status_code=499)  # nobody reads it: nginx's "client closed request"
        return JSONResponse(run.response(future.result()))
    except Exception as error:  # the run failed: the upstream, the request, or a cancellation
        return _run_error(error)
    finally:
        stats.active_rsa_requests -= 1


def _stream_rsa(run: RSARun, stats: ServerStats, workers) -> StreamingResponse:
    """A streaming RSA request: `rsa_progress` chunks per round and SSE heartbeats while rounds run, then the
    answer. Starlette cancels this generator when the client disconnects; that cancels the run."""

    async def events():
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stats.active_rsa_requests += 1
        future = loop.run_in_executor(
            workers, run.run, lambda index, batch: loop.call_soon_threadsafe(queue.put_nowait, (index, batch))
        )
        future.add_done_callback(lambda _: queue.put_nowait(_END))
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), HEARTBEAT_SECONDS)
                except asyncio.TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                if item is _END:
                    break
                yield _sse(run.progress_chunk(*item))
            error = future.exception()
            if error is not None:
                yield _sse(json.loads(_run_error(error).body))
            else:
                for chunk in run.final_chunks(future.result()):
                    yield _sse(chunk)
            yield "data: [DONE]\n\n"
        finally:
            stats.active_rsa_requests -= 1
            if not future.done():  # the client left
                run.cancellation.cancel()
                stats.cancelled_requests += 1

    return StreamingResponse(events(), media_type="text/event-stream")


# ----------------------------------------------------------------------------------------------------------------
# OpenAI formats
# ----------------------------------------------------------------------------------------------------------------


def _assistant_message(text: str) -> dict:
    """The answer as `content` and the thinking as `reasoning_content` / `reasoning` (the names vLLM's and SGLang's
    reasoning parsers use), split at the last `</think>`; a text without one is all content."""
    head, sep, answer = text.rpartition(THINK_END)
    if not sep:
        return {"role": "assistant", "content": text}
    reasoning = head.strip().removeprefix(THINK_START).strip()
    return {"role": "assistant", "content": answer.strip(), "reasoning_content": reasoning, "reasoning": reasoning}


def _finish(completion) -> str:
    return "stop" if completion.finished else "length"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _chunk(chunk_id: str, created: int, model: str, choices: list) -> dict:
    return {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _error(error: RequestError) -> JSONResponse:
    return JSONResponse(error.payload(), status_code=error.status)


def _upstream_error(status: int, message: str) -> JSONResponse:
    return _error(RequestError(message, status=status, error_type="upstream_error"))


def _run_error(error: BaseException) -> JSONResponse:
    """A failed run as an HTTP error: 400 for a bad request found late, 504 for a deadline, 502 for any other
    upstream failure, 499 for a cancellation."""
    if isinstance(error, RequestError):
        return _error(error)
    if isinstance(error, RequestCancelled):
        return _error(RequestError(str(error), status=499, error_type="cancelled"))
    if isinstance(error, EndpointTimeoutError):
        return _upstream_error(504, f"the upstream timed out: {error}")
    if isinstance(error, EndpointError):
        return _upstream_error(502, f"the upstream failed: {error}")
    if isinstance(error, ValueError):  # e.g. a prompt the tokenizer or chat template refuses
        return _error(RequestError(str(error)))
    logger.exception("Markovian RSA request failed", exc_info=error)
    return _error(RequestError(f"internal error: {type(error).__name__}: {error}", status=500, error_type="server_error"))


async def _json_body(request: Request):
    try:
        body = json.loads(await request.body())
    except ValueError as error:
        return _error(RequestError(f"the request body is not valid JSON: {error}"))
    if not isinstance(body, dict):
        return _error(RequestError("the request body must be a JSON object."))
    return body


__all__ = ["LocalBackend", "RSARun", "ServerStats", "UpstreamBackend", "build_app"]
