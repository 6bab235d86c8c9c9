"""`zaya-hf serve-rsa` on 127.0.0.1, driven with the official `openai` client: in front of the embedded model (local
engine) and in front of stub upstreams (scripted, failing, stalling, malformed)."""

import json
import threading
import time

import pytest

openai = pytest.importorskip("openai", reason="the serving tests need the openai client (pip install 'zaya-hf[dev]')")
pytest.importorskip("fastapi", reason="serve-rsa needs FastAPI and uvicorn (pip install 'zaya-hf[serve]')")

import httpx  # noqa: E402
import torch  # noqa: E402
from http_fixtures import Misbehaving, serve, serve_app  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from zaya_hf import default_model_path  # noqa: E402
from zaya_hf.generation_zaya import (  # noqa: E402
    LocalGenerationEngine,
    MarkovianRSAConfig,
    extract_boxed_answer,
    run_markovian_rsa,
    split_reasoning,
)
from zaya_hf.serving import OpenAICompletionsEngine  # noqa: E402
from zaya_hf.serving.rsa_server import LocalBackend, UpstreamBackend, build_app  # noqa: E402

QUESTION = "Compute 7+5-3+8."
MESSAGES = [{"role": "user", "content": QUESTION}]
# A small run in Zyphra's field names: T=1, N=4, C=2, β=40, τ=16 words, a final aggregation of 40 tokens.
SMALL_RSA = {"rsa_t": 1, "rsa_n": 4, "rsa_k": 2, "short_resp_len": 40, "tail_window_len": 16, "max_tokens": 40,
             "seed": 3}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def local_server(model, tokenizer):
    """serve-rsa with the embedded model behind the local engine."""
    app = build_app(LocalBackend(model, tokenizer, "zaya-embedded"))
    with serve_app(app) as url:
        yield url, app


def client(url: str, **kwargs) -> "openai.OpenAI":
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, **kwargs)


def test_an_rsa_request_answers_what_run_markovian_rsa_does(local_server, model, tokenizer):
    url, _ = local_server
    response = client(url).chat.completions.create(model="zaya-embedded", messages=MESSAGES, temperature=1.0,
                                                   extra_body={k: v for k, v in SMALL_RSA.items() if k != "max_tokens"},
                                                   max_tokens=SMALL_RSA["max_tokens"])
    # The same run, from the algorithm: Zyphra's semantics in this package's notation.
    config = MarkovianRSAConfig(rounds=1, population=4, subset_size=2, rollout_tokens=40, tail_tokens=16,
                                tail_unit="words", final_tokens=40, final_population=1, selection="aggregate",
                                sampling={"temperature": 1.0, "top_p": 1.0},
                                final_sampling={"temperature": 0.6, "top_p": 0.95, "top_k": 40}, seed=3)
    expected = run_markovian_rsa(LocalGenerationEngine(model, tokenizer), MESSAGES, tokenizer, config, progress=False)

    reasoning, answer = split_reasoning(expected.final_texts[0])
    message = response.choices[0].message
    assert len(response.choices) == 1 and message.content == answer.strip()
    assert message.model_extra["reasoning_content"] == reasoning.strip().removeprefix("<think>").strip()
    metadata = response.model_extra["rsa_metadata"]
    assert [r["answers"] for r in metadata["rounds"]] == [
        [extract_boxed_answer(t) for t in r.completions] for r in expected.rounds]
    assert [r["subsets"] for r in metadata["rounds"]] == [[list(s) for s in r.subsets] for r in expected.rounds]
    assert [r["completion_tokens"] for r in metadata["rounds"]] == [r.completion_tokens for r in expected.rounds]
    assert metadata["answer"] == expected.answer
    assert response.usage.completion_tokens == expected.generated_tokens
    assert response.usage.prompt_tokens == sum(sum(r.prompt_lengths) for r in expected.rounds)


def test_streaming_gives_progress_per_round_then_valid_chunks_of_the_same_answer(local_server):
    url, _ = local_server
    rsa = {k: v for k, v in SMALL_RSA.items() if k != "max_tokens"}
    plain = client(url).chat.completions.create(model="zaya-embedded", messages=MESSAGES, max_tokens=40,
                                                extra_body=rsa)
    chunks = list(client(url).chat.completions.create(model="zaya-embedded", messages=MESSAGES, max_tokens=40,
                                                      extra_body=rsa, stream=True,
                                                      stream_options={"include_usage": True}))
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)  # parsed by the client's own models
    progress = [c.model_extra["rsa_progress"] for c in chunks if "rsa_progress" in (c.model_extra or {})]
    assert [p["round"] for p in progress] == [0, 1] and [p["completions"] for p in progress] == [4, 1]
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        plain.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].model_extra["rsa_metadata"]["rounds"] == plain.model_extra["rsa_metadata"]["rounds"]


def test_plain_requests_are_answered_by_the_local_model(local_server, model, tokenizer):
    url, _ = local_server
    response = client(url).chat.completions.create(model="zaya-embedded", messages=MESSAGES, temperature=0,
                                                   max_tokens=40)
    batch = LocalGenerationEngine(model, tokenizer).generate(
        [tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"]],
        max_new_tokens=40, sampling={"do_sample": False}, seed=None)
    assert response.choices[0].message.content == split_reasoning(batch.completions[0].text)[1].strip()
    assert [m.id for m in client(url).models.list().data] == ["zaya-embedded"]
    assert httpx.get(url + "/health").json()["status"] == "ok"


@pytest.mark.parametrize(
    "fields, param, message",
    [
        ({"rsa_n": 2, "rsa_k": 4}, "rsa_k", r"rsa_k \(4\) cannot exceed rsa_n \(2\)"),
        ({"rsa_t": -1}, "rsa_t", "rsa_t must be >= 0"),
        ({"rsa_t": 1, "rsa_selection": "best"}, "rsa_selection", "must be one of aggregate, majority"),
        ({"rsa_t": 1, "rsa_summarize": True}, "rsa_summarize", "summarised candidates are not supported"),
        ({"rsa_t": 1, "tools": []}, "tools", "'tools' is not supported in Markovian RSA requests"),
        ({"rsa_t": 1, "rsa_n": "many"}, "rsa_n", "rsa_n must be an integer"),
        ({"rsa_t": 2, "rsa_n": 4, "short_resp_len": 100, "rsa_token_budget": 500}, "rsa_token_budget",
         "up to 900 decode tokens"),
    ],
)
def test_bad_rsa_fields_are_a_400_naming_the_field(local_server, fields, param, message):
    url, _ = local_server
    with pytest.raises(openai.BadRequestError) as caught:
        client(url).chat.completions.create(model="zaya-embedded", messages=MESSAGES, max_tokens=100,
                                            extra_body=fields)
    error = caught.value.body
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert __import__("re").search(message, error["message"])


# -- in front of an upstream ------------------------------------------------------------------------------------------


class ScriptedUpstream:
    """An OpenAI completions server that writes `<think> ... </think> \\boxed{7}` after `delay` seconds, records
    every body and the most requests it had in flight at once, and serves a fixed chat completion (plain and
    streamed) for pass-through."""

    CHAT = {"id": "chatcmpl-upstream", "object": "chat.completion", "created": 1, "model": "up",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "from upstream"},
                         "finish_reason": "stop"}], "usage": {"prompt_tokens": 3, "completion_tokens": 2,
                                                              "total_tokens": 5}, "system_fingerprint": "fp-1"}
    STREAM = b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n' \
             b"data: [DONE]\n\n"

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.lock = threading.Lock()
        self.bodies, self.in_flight, self.peak = [], 0, 0

    def __call__(self, path, body):
        if path == "/v1/models":
            return 200, {"object": "list", "data": [{"id": "up", "object": "model"}]}, {}
        if path == "/v1/chat/completions":
            if body.get("stream"):
                return 200, self.STREAM, {"Content-Type": "text/event-stream"}
            return 200, self.CHAT, {}
        with self.lock:
            self.bodies.append(body)
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        time.sleep(self.delay)
        with self.lock:
            self.in_flight -= 1
        text = "<think> " + " ".join(["w"] * 10) + " </think> \\boxed{7}"
        return 200, {"choices": [{"text": text, "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": 13}}, {}


def rsa_server_in_front_of(url, tokenizer, **engine_kwargs):
    engine = OpenAICompletionsEngine(url, tokenizer=tokenizer, **engine_kwargs)
    return build_app(UpstreamBackend(engine, tokenizer)), engine


def test_requests_without_rsa_fields_pass_through_unchanged(tokenizer):
    upstream = ScriptedUpstream()
    with serve(upstream) as up:
        app, engine = rsa_server_in_front_of(up, tokenizer)
        with serve_app(app) as url, engine:
            plain = httpx.post(url + "/v1/chat/completions", json={"model": "up", "messages": MESSAGES})
            streamed = httpx.post(url + "/v1/chat/completions",
                                  json={"model": "up", "messages": MESSAGES, "stream": True})
            chunks = list(client(url).chat.completions.create(model="up", messages=MESSAGES, stream=True))
            models = client(url).models.list()
    assert plain.status_code == 200 and plain.json() == ScriptedUpstream.CHAT
    assert streamed.content == ScriptedUpstream.STREAM
    assert chunks[0].choices[0].delta.content == "hi" and [m.id for m in models.data] == ["up"]
    assert upstream.bodies == []  # no rollout was sent


def test_fifty_requests_share_a_cap_of_eight_upstream_calls(tokenizer):
    # Each upstream answer takes 0.2 s, so that the cap is reached even where the box is slow to accept 50 clients
    # (at 0.02 s a clean CI run peaked at 6); 150 calls, 8 at a time: ~4 s.
    upstream = ScriptedUpstream(delay=0.2)
    with serve(upstream) as up:
        app, engine = rsa_server_in_front_of(up, tokenizer, max_concurrency=8, prompt_format="tokens",
                                             extensions=True)
        with serve_app(app) as url, engine:
            answers, errors = [], []

            def ask():
                try:
                    response = client(url, timeout=60).chat.completions.create(
                        model="up", messages=MESSAGES, max_tokens=16,
                        extra_body={"rsa_t": 1, "rsa_n": 2, "rsa_k": 2, "short_resp_len": 16})
                    answers.append(response.model_extra["rsa_metadata"]["answer"])
                except Exception as error:  # reported below
                    errors.append(error)

            threads = [threading.Thread(target=ask) for _ in range(50)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)
            health = httpx.get(url + "/health").json()
    assert errors == [] and answers == ["7"] * 50
    assert len(upstream.bodies) == 50 * 3  # N=2 rollouts + 1 final aggregation each
    assert upstream.peak == 8 and health["upstream"]["peak_in_flight"] == 8  # saturated, never above


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_disconnects_cancels_its_upstream_requests(tokenizer, stream):
    upstream = Misbehaving("stall")  # answers nothing; counts the requests whose client (serve-rsa) left
    with serve(upstream) as up:
        app, engine = rsa_server_in_front_of(up, tokenizer, model="up", prompt_format="tokens", extensions=True)
        with serve_app(app) as url, engine:
            with pytest.raises(openai.APITimeoutError):  # 3 s: time for the 4 rollouts to reach upstream on a busy box
                response = client(url, timeout=3.0).chat.completions.create(
                    model="up", messages=MESSAGES, max_tokens=16, stream=stream,
                    extra_body={"rsa_t": 1, "rsa_n": 4, "rsa_k": 2, "short_resp_len": 16})
                for _ in response:  # a stream times out while reading
                    pass
            end = time.monotonic() + 10
            while (upstream.left < 4 or httpx.get(url + "/health").json()["upstream"]["cancelled"] < 4) \
                    and time.monotonic() < end:
                time.sleep(0.05)
            health = httpx.get(url + "/health").json()
    assert upstream.requests == 4 and upstream.left == 4  # every round-0 rollout was closed upstream
    assert health["cancelled_requests"] == 1 and health["upstream"]["cancelled"] == 4
    assert health["upstream"]["in_flight"] == 0 and health["active_rsa_requests"] == 0


@pytest.mark.parametrize(
    "respond, status, message",
    [
        (lambda path, body: (500, {"error": "boom"}, {}), 502, "still failing after 2 attempts: HTTP 500"),
        (lambda path, body: (200, b"<html>oops</html>", {}), 502, "did not return JSON"),
        (Misbehaving("stall"), 504, "no complete answer within"),
    ],
)
def test_upstream_failures_are_502_and_timeouts_504(tokenizer, respond, status, message):
    with serve(respond) as up:
        app, engine = rsa_server_in_front_of(up, tokenizer, model="up", prompt_format="tokens", extensions=True,
                                             max_retries=1, initial_backoff=0.01, timeout=0.5, deadline=1.0)
        with serve_app(app) as url, engine:
            start = time.monotonic()
            with pytest.raises(openai.APIStatusError) as caught:
                client(url, timeout=30).chat.completions.create(
                    model="up", messages=MESSAGES, max_tokens=16,
                    extra_body={"rsa_t": 1, "rsa_n": 2, "rsa_k": 2, "short_resp_len": 16})
            elapsed = time.monotonic() - start
    assert caught.value.status_code == status and message in caught.value.body["message"]
    assert elapsed < 5  # nothing hangs past the deadline


def test_a_body_written_for_zyphras_proxy_works_unchanged(tokenizer):
    """The body of Zyphra's example client (`openai_chat_completion_with_rsa.py`: rsa_t=8, rsa_n=32, rsa_k=4,
    short_resp_len=32768, rsa_tail_window, tail_window_len=4096, rsa_final_n=1, final_temperature=0.6,
    temperature=1.0, max_tokens=61440, return_aggregation_prompt, rsa_debug), and a minimal one that leaves every
    field to the defaults but rsa_t; both run with Zyphra's semantics."""
    upstream = ScriptedUpstream()
    zyphra_body = {"model": "up", "messages": MESSAGES, "temperature": 1.0, "max_tokens": 61440,
                   "rsa_t": 8, "rsa_n": 32, "rsa_k": 4, "short_resp_len": 32768, "rsa_tail_window": True,
                   "tail_window_len": 4096, "rsa_final_n": 1, "final_temperature": 0.6,
                   "return_aggregation_prompt": True, "rsa_debug": True}
    with serve(upstream) as up:
        app, engine = rsa_server_in_front_of(up, tokenizer, max_concurrency=32)
        with serve_app(app) as url, engine:
            explicit = httpx.post(url + "/v1/chat/completions", json=zyphra_body, timeout=120)
            explicit_bodies, upstream.bodies = upstream.bodies, []
            minimal = httpx.post(url + "/v1/chat/completions", timeout=60,
                                 json={"model": "up", "messages": MESSAGES, "rsa_t": 1})
    for response, bodies, rounds in ((explicit, explicit_bodies, 8), (minimal, upstream.bodies, 1)):
        assert response.status_code == 200, response.text
        payload = response.json()
        # T rounds of N=32 rollouts of short_resp_len tokens, then rsa_final_n=1 aggregation of max_tokens.
        assert len(bodies) == 32 * rounds + 1
        assert [b["max_tokens"] for b in bodies] == [32768] * 32 * rounds + [61440]
        assert all(b["temperature"] == 1.0 and b["top_p"] == 1.0 for b in bodies[:-1])
        assert {k: bodies[-1][k] for k in ("temperature", "top_p", "top_k")} == {"temperature": 0.6, "top_p": 0.95,
                                                                                 "top_k": 40}
        assert len(payload["choices"]) == 1 and payload["choices"][0]["message"]["content"] == "\\boxed{7}"
        assert payload["choices"][0]["message"]["reasoning"] == " ".join(["w"] * 10)
        metadata = payload["rsa_metadata"]
        assert {k: metadata[k] for k in ("rsa_iterations", "rsa_n", "rsa_k", "short_resp_len", "tail_window_len",
                                         "rsa_final_n", "rsa_tail_window", "use_pacore")} == {
            "rsa_iterations": rounds, "rsa_n": 32, "rsa_k": 4, "short_resp_len": 32768, "tail_window_len": 4096,
            "rsa_final_n": 1, "rsa_tail_window": True, "use_pacore": False}
        assert len(metadata["rsa_token_count_history"]) == rounds + 1
        assert payload["usage"]["completion_tokens"] == 13 * len(bodies)
    prompt = explicit.json()["aggregation_prompt"]
    assert prompt[0]["role"] == "user" and "[[ Problem ]]:\nCompute 7+5-3+8." in prompt[0]["content"]
    assert "aggregation_prompt" not in minimal.json()
    # Tails are whitespace words: each of the 4 candidates the prompt reads is its 10 reasoning words.
    assert prompt[0]["content"].count(" ".join(["w"] * 10)) == 4
    assert json.loads(json.dumps(explicit.json()))  # plain JSON, as Zyphra's clients expect


def test_the_serve_rsa_command_fails_in_one_line_on_bad_options(capsys):
    from zaya_hf.cli.main import main

    assert main(["serve-rsa", "--tokenizer", "x"]) == 2
    assert "--tokenizer goes with --upstream" in capsys.readouterr().err
    assert main(["serve-rsa", "--upstream", "http://127.0.0.1:9", "--timeout", "0.5", "--deadline", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--upstream http://127.0.0.1:9:" in err and "deadline of 1 s" in err
