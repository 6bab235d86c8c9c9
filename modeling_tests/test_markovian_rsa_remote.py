"""Markovian RSA against a real OpenAI-compatible HTTP server on 127.0.0.1, started by the tests in a thread."""

import copy
import threading
import time

import pytest
import torch
from http_fixtures import Misbehaving, scripted_completion, serve
from rsa_fixtures import QUESTION, make_tokenizer, tiny_rsa_model
from tokenizers import processors

from zaya_hf.generation_zaya import MarkovianRSAConfig, encode_chat
from zaya_hf.serving import (
    Cancellation,
    EndpointError,
    EndpointTimeoutError,
    MalformedResponseError,
    MarkovianRSAConfig as ServingConfig,
    OpenAICompletionsEngine,
    RequestCancelled,
    RequestForm,
    run_markovian_rsa,
)
from zaya_hf.serving.openai_engine import STANDARD_COMPLETION_FIELDS

GREEDY = {"do_sample": False}


class ModelServer:
    """An OpenAI completions endpoint backed by the tiny model: greedy, one prompt at a time, stops at EOS."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.lock = threading.Lock()
        self.bodies = []

    def completion(self, body) -> dict:
        prompt = body["prompt"]
        eos = self.tokenizer.eos_token_id
        with self.lock, torch.no_grad():
            out = self.model.generate(torch.tensor([prompt]), max_new_tokens=body["max_tokens"], do_sample=False,
                                      eos_token_id=eos, pad_token_id=self.tokenizer.pad_token_id)
        new = out[0, len(prompt):].tolist()
        stopped = eos in new
        new = new[: new.index(eos) + 1] if stopped else new
        text = self.tokenizer.decode(new[:-1] if stopped else new, skip_special_tokens=body["skip_special_tokens"])
        return {"id": "cmpl-test", "object": "text_completion", "model": body["model"],
                "choices": [{"index": 0, "text": text, "finish_reason": "stop" if stopped else "length"}],
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(new),
                          "total_tokens": len(prompt) + len(new)}}

    def __call__(self, path, body):
        if path == "/v1/models":
            return 200, {"object": "list", "data": [{"id": "tiny-zaya", "object": "model"}]}, {}
        assert path == "/v1/completions"
        with self.lock:
            self.bodies.append(body)
        return 200, self.completion(body), {}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_rsa_model(tokenizer, seed=3)


def configured_engine(url: str, **kwargs) -> OpenAICompletionsEngine:
    """An engine whose request form is configured (token-id prompts, non-standard fields): it negotiates nothing,
    so a refusal is the answer to the rollout itself."""
    return OpenAICompletionsEngine(url, prompt_format="tokens", extensions=True, **kwargs)


PARAMS = dict(rounds=2, population=4, subset_size=2, rollout_tokens=6, tail_tokens=3, sampling=GREEDY, seed=9)


def test_remote_run_equals_the_local_run(model, tokenizer):
    server = ModelServer(model, tokenizer)
    with serve(server) as url:
        engine = OpenAICompletionsEngine(url, max_concurrency=3)  # model=None: asks /v1/models
        remote = run_markovian_rsa(engine, QUESTION, tokenizer, ServingConfig(**PARAMS), progress=False)
    local = model.generate_markovian_rsa(QUESTION, tokenizer, progress=False, **PARAMS)
    assert engine.model == "tiny-zaya"
    assert [r.completions for r in remote.rounds] == [r.completions for r in local.rounds]
    assert [r.subsets for r in remote.rounds] == [r.subsets for r in local.rounds]
    assert [r.prompt_lengths for r in remote.rounds] == [r.prompt_lengths for r in local.rounds]
    assert [r.completion_tokens for r in remote.rounds] == [r.completion_tokens for r in local.rounds]
    assert remote.generated_tokens == local.generated_tokens == engine.usage.completion_tokens
    assert engine.usage.requests == 12 and engine.usage.retries == 0
    assert engine.usage.prompt_tokens == sum(sum(r.prompt_lengths) for r in remote.rounds)
    # What went over the wire: token-id prompts, the round budgets, greedy, special tokens kept.
    body = server.bodies[0]
    assert isinstance(body["prompt"], list) and all(isinstance(t, int) for t in body["prompt"])
    assert body["max_tokens"] == 6 and body["temperature"] == 0.0 and body["skip_special_tokens"] is False
    assert len({b["seed"] for b in server.bodies}) == 12  # one distinct seed per rollout


def test_sampling_parameters_are_sent_as_openai_fields():
    engine = OpenAICompletionsEngine("http://127.0.0.1:1", model="m", extra_body={"stop": ["END"]})  # no request
    body = engine.request_body([1, 2], 16, {"temperature": 0.6, "top_k": 40, "repetition_penalty": 1.1}, seed=5)
    assert body == {"model": "m", "prompt": [1, 2], "max_tokens": 16, "stream": False,
                    "skip_special_tokens": False, "temperature": 0.6, "top_p": 1.0, "top_k": 40,
                    "repetition_penalty": 1.1, "seed": 5, "stop": ["END"]}


def test_concurrent_requests_respect_the_limit():
    limit = 3
    barrier = threading.Barrier(limit, timeout=20)  # passes only once `limit` requests are in flight together
    lock = threading.Lock()
    in_flight = [0, 0]  # now, most seen

    def respond(path, body):
        with lock:
            in_flight[0] += 1
            in_flight[1] = max(in_flight)
        try:
            barrier.wait()
        except threading.BrokenBarrierError:  # the last requests of a round are fewer than `limit`
            pass
        with lock:
            in_flight[0] -= 1
        return 200, scripted_completion(body), {}

    with serve(respond) as url:
        # The request form is configured: negotiating it would send the first rollout alone.
        engine = configured_engine(url, model="m", max_concurrency=limit)
        batch = engine.generate([[1, 2, 3]] * 6, max_new_tokens=8, sampling={}, seed=None)
    assert in_flight[1] == limit
    assert [c.text for c in batch.completions] == ["<think> w </think> \\boxed{3}"] * 6
    assert engine.usage.completion_tokens == 30 and engine.usage.requests == 6


def test_transient_failures_are_retried_with_backoff(tokenizer):
    failures = iter([(503, {"error": "overloaded"}, {}), (429, {"error": "slow down"}, {"Retry-After": "0"}), None])
    seen = []
    lock = threading.Lock()

    def respond(path, body):
        with lock:
            seen.append(body["prompt"])
            failure = next(failures, "ok")
        if failure != "ok":
            return failure  # a 503, a 429, then a dropped connection
        return 200, scripted_completion(body), {}

    progress = []
    with serve(respond) as url:
        engine = OpenAICompletionsEngine(url, model="m", max_concurrency=1, initial_backoff=0.01, max_backoff=0.05)
        batch = engine.generate([[1], [1, 2]], max_new_tokens=4, sampling={}, seed=None, on_progress=progress.append)
        result = run_markovian_rsa(engine, QUESTION, tokenizer,
                                   MarkovianRSAConfig(rounds=1, population=2, subset_size=2, tail_tokens=2),
                                   progress=False)
    assert engine.usage.retries == 3 and len(seen) == 3 + 2 + 4
    assert [c.text for c in batch.completions] == ["<think> w </think> \\boxed{1}", "<think> w </think> \\boxed{2}"]
    assert progress == [1, 1]
    assert result.generated_tokens == 4 * 5 and len(result.final_answers) == 2


def test_persistent_failures_give_up_after_the_retries():
    calls = []

    def respond(path, body):
        calls.append(path)
        return 502, {"error": "bad gateway"}, {}

    with serve(respond) as url:
        engine = configured_engine(url, model="m", max_retries=2, initial_backoff=0.01)
        with pytest.raises(EndpointError, match="after 3 attempts: HTTP 502"):
            engine.generate([[1]], max_new_tokens=4, sampling={}, seed=None)
    assert len(calls) == 3


def test_client_errors_are_not_retried():
    calls = []

    def respond(path, body):
        calls.append(path)
        return 400, {"error": {"message": "max_tokens is too large"}}, {}

    with serve(respond) as url:
        engine = configured_engine(url, model="m", initial_backoff=0.01)
        with pytest.raises(EndpointError, match="HTTP 400.*max_tokens is too large"):
            engine.generate([[1]], max_new_tokens=4, sampling={}, seed=None)
    assert len(calls) == 1


def test_a_failed_batch_stops_its_other_requests_before_returning():
    """One rollout is refused for good while another keeps getting 503: generate() raises the refusal, the other
    request stops retrying, and nothing is sent after the call returned. (Counted against what the engine had sent
    by then, not against what the server had logged: on a loaded machine the server's thread may log a request that
    was sent before the return only after it.)"""
    calls = []

    def respond(path, body):
        calls.append(body["prompt"])
        if body["prompt"] == [1]:
            time.sleep(0.2)  # the other request is already in its retry loop
            return 400, {"error": {"message": "prompt too long"}}, {}
        return 503, {"error": {"message": "busy"}}, {}

    with serve(respond) as url:
        engine = configured_engine(url, model="m", max_retries=100, initial_backoff=0.02, max_backoff=0.02)
        with pytest.raises(EndpointError, match="HTTP 400.*prompt too long"):
            engine.generate([[1], [2]], max_new_tokens=4, sampling={}, seed=None)
        retries = engine.usage.retries
        time.sleep(0.3)
        # sent by the return: [1] once, [2] once plus once per retry counted (each counted before its backoff)
        assert engine.usage.retries == retries and len(calls) <= retries + 2
    assert 1 <= retries < 100


def test_an_abort_during_the_backoff_sends_no_further_request():
    """The batch fails while another request sleeps in its backoff: that request wakes and gives up at once,
    without one more attempt."""
    calls = []
    lock = threading.Lock()

    def respond(path, body):
        with lock:
            calls.append(body["prompt"])
        if body["prompt"] == [1]:
            time.sleep(0.2)  # the other request is already waiting out its (long) backoff
            return 400, {"error": {"message": "prompt too long"}}, {}
        return 503, {"error": {"message": "busy"}}, {}

    with serve(respond) as url:
        engine = configured_engine(url, model="m", max_retries=3, initial_backoff=30, max_backoff=30)
        start = time.perf_counter()
        with pytest.raises(EndpointError, match="HTTP 400.*prompt too long"):
            engine.generate([[1], [2]], max_new_tokens=4, sampling={}, seed=None)
        assert time.perf_counter() - start < 10
    assert calls.count([2]) == 1 and engine.usage.retries == 1


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"object": "error"}, r"need choices\[0\].text and usage.completion_tokens"),
        ({"choices": [{"text": "hi"}]}, r"usage.completion_tokens"),
        ({"choices": [{"text": 3}], "usage": {"completion_tokens": 1}}, "must be a string"),
        (b"<html>gateway</html>", "did not return JSON"),
        ([1, 2], "not an object"),
    ],
)
def test_malformed_responses_raise_a_clear_error(payload, message):
    with serve(lambda path, body: (200, payload, {})) as url:
        engine = OpenAICompletionsEngine(url, model="m", initial_backoff=0.01)
        with pytest.raises(MalformedResponseError, match=message):
            engine.generate([[1], [2]], max_new_tokens=4, sampling={}, seed=None)
    assert engine.usage.retries == 0


def test_model_discovery_and_url_checks():
    with serve(lambda path, body: (200, {"data": []}, {})) as url:
        with pytest.raises(MalformedResponseError, match="pass model="):
            OpenAICompletionsEngine(url + "/v1/").model
    with pytest.raises(ValueError, match="http"):
        OpenAICompletionsEngine("127.0.0.1:8000", model="m")
    assert OpenAICompletionsEngine("http://127.0.0.1:1/v1/", model="m").base_url == "http://127.0.0.1:1/v1"


# -- deadlines: a server that trickles or stalls cannot hold a rollout past them ------------------------------------


def test_a_trickling_server_fails_at_the_deadline():
    """One byte every 0.25 s never trips a per-read timeout: the attempt's wall-clock limit (1 s) ends the first
    attempt, the rollout's deadline (1.6 s) the second, counted as one retry."""
    server = Misbehaving("trickle")
    with serve(server) as url:
        engine = configured_engine(url, model="m", timeout=1.0, deadline=1.6, max_retries=5, initial_backoff=0.05)
        start = time.monotonic()
        with pytest.raises(EndpointTimeoutError, match=r"deadline of 1.6 s \(2 attempts"):
            engine.generate([[1]], max_new_tokens=4, sampling={}, seed=None)
        elapsed = time.monotonic() - start
    assert 1.6 <= elapsed < 1.6 + 0.75
    assert engine.usage.retries == 1 and server.requests == 2


def test_a_stalled_server_fails_after_the_counted_retries():
    server = Misbehaving("stall")
    with serve(server) as url:
        engine = configured_engine(url, model="m", timeout=0.5, deadline=30, max_retries=2, initial_backoff=0.05)
        start = time.monotonic()
        with pytest.raises(EndpointError, match=r"still failing after 3 attempts: no complete answer within 0.5 s"):
            engine.generate([[1]], max_new_tokens=4, sampling={}, seed=None)
        elapsed = time.monotonic() - start
        deadline = time.monotonic() + 5
        while server.left < 3 and time.monotonic() < deadline:  # the server notices each abandoned attempt
            time.sleep(0.05)
    assert 1.5 <= elapsed < 1.5 + 0.75
    assert engine.usage.retries == 2 and server.requests == 3 and server.left == 3


def test_a_cancellation_closes_the_requests_in_flight():
    server = Misbehaving("stall")
    cancellation = Cancellation()
    with serve(server) as url:
        engine = configured_engine(url, model="m", max_concurrency=2)
        outcome = []

        def run():
            try:
                engine.generate([[1], [2], [3]], max_new_tokens=4, sampling={}, seed=None, cancellation=cancellation)
            except RequestCancelled as error:
                outcome.append(error)

        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 5
        while server.requests < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        cancellation.cancel()
        thread.join(timeout=5)
        while (server.left < 2 or engine.usage.cancelled < 2) and time.monotonic() < deadline + 5:
            time.sleep(0.02)
    assert len(outcome) == 1
    # Two rollouts were in flight (the cap), the third never started: two requests closed, two counted.
    assert server.requests == 2 and server.left == 2 and engine.usage.cancelled == 2


# -- request forms: servers that refuse token-id prompts or non-standard fields --------------------------------------


class TransformersServeLike:
    """Refuses what `transformers serve` refuses (fields outside OpenAI's schema: 422; token-id prompts: 400) and
    tokenizes text prompts as it does (`tokenizer(prompt)`, special tokens added), recording the ids it got."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.refused = 0
        self.prompt_ids = []
        self.lock = threading.Lock()

    def __call__(self, path, body):
        unexpected = set(body) - STANDARD_COMPLETION_FIELDS
        with self.lock:
            if unexpected:
                self.refused += 1
                return 422, {"detail": f"Unexpected fields in the request: {unexpected}"}, {}
            if not isinstance(body["prompt"], str):
                self.refused += 1
                return 400, {"detail": "prompt must be a string."}, {}
            ids = self.tokenizer(body["prompt"])["input_ids"]
            self.prompt_ids.append(ids)
        return 200, {"choices": [{"text": "<think> 3 </think> \\boxed{7}", "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": len(ids), "completion_tokens": 5}}, {}


def bos_adding(tokenizer):
    """A copy of `tokenizer` whose encoding adds `<bos>` itself, as Gemma-style tokenizers (and ZAYA1's) do."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tokenizer.bos_token_id)]
    )
    return tokenizer


@pytest.mark.parametrize("adds_bos", [False, True])
def test_a_server_that_refuses_token_ids_and_extensions_gets_exact_text_prompts(tokenizer, adds_bos):
    tokenizer = bos_adding(tokenizer) if adds_bos else tokenizer
    server = TransformersServeLike(tokenizer)
    config = MarkovianRSAConfig(rounds=1, population=3, subset_size=2, rollout_tokens=8, tail_tokens=4, seed=1,
                                sampling={"temperature": 0.8})
    with serve(server) as url, OpenAICompletionsEngine(url, model="m", tokenizer=tokenizer) as engine:
        result = run_markovian_rsa(engine, QUESTION, tokenizer, config, progress=False)
        form = engine.form
    assert form == RequestForm(token_prompts=False, extensions=False)
    assert server.refused == 3  # negotiated once: (ids, extensions), (ids), (text, extensions) refused
    # Every prompt the server tokenized is exactly the one the algorithm built (no doubled BOS, no drift).
    built = [length for record in result.rounds for length in record.prompt_lengths]
    assert [len(ids) for ids in server.prompt_ids] == built and len(built) == 6
    question_ids = encode_chat(tokenizer, [{"role": "user", "content": QUESTION}])
    assert server.prompt_ids[0] == question_ids and question_ids.count(tokenizer.bos_token_id) == 1


def test_text_prompts_of_the_embedded_tokenizer_re_encode_exactly():
    from transformers import AutoTokenizer

    from zaya_hf import default_model_path
    from zaya_hf.generation_zaya import aggregation_messages, candidate_tail

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    engine = OpenAICompletionsEngine("http://127.0.0.1:1", model="m", tokenizer=tokenizer)  # sends nothing
    tails = [candidate_tail("<think>\n7+5-3\n=12-3\n=9\n</think>\n\\boxed{9} é ✓", 6, "tokens", tokenizer)] * 2
    prompts = [encode_chat(tokenizer, [{"role": "user", "content": "Compute 7+5-3.  Café ✓ \t x"}]),
               encode_chat(tokenizer, aggregation_messages(None, "Compute 7+5-3.", tails))]
    for ids in prompts:
        assert tokenizer(engine.prompt_text(ids), add_special_tokens=True)["input_ids"] == ids
    engine.close()


def test_refused_extensions_are_an_error_when_the_sampling_needs_them(tokenizer):
    with serve(TransformersServeLike(tokenizer)) as url:
        engine = OpenAICompletionsEngine(url, model="m", tokenizer=tokenizer)
        with pytest.raises(EndpointError, match="refuses non-standard fields, so the sampling's top_k=40"):
            engine.generate([[1, 2]], max_new_tokens=4, sampling={"temperature": 0.6, "top_k": 40}, seed=None)


def test_token_id_prompts_need_a_tokenizer_where_refused():
    def respond(path, body):
        return (400, {"detail": "prompt must be a string."}, {}) if not isinstance(body["prompt"], str) else None

    with serve(respond) as url:
        engine = OpenAICompletionsEngine(url, model="m", extensions=False)
        with pytest.raises(EndpointError, match="refused every request form.*text prompts: no tokenizer="):
            engine.generate([[1, 2]], max_new_tokens=4, sampling={}, seed=None)
