"""Markovian RSA through `OpenAICompletionsEngine` against `transformers serve` (transformers' own server and its own
ZAYA implementation) running the embedded model on 127.0.0.1: the answers of the local engine, under greedy decoding.

`transformers serve` refuses token-id prompts and non-standard fields, so this also shows the engine's negotiation
and exact text prompts on a real server. Needs `transformers[serving]` (in the `dev` extra).
"""

import os
import socket
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("fastapi", reason="transformers serve needs transformers[serving] (pip install 'zaya-hf[dev]')")
from transformers.utils.import_utils import is_serve_available  # noqa: E402

if not is_serve_available():
    pytest.skip("transformers serve needs transformers[serving] (pip install 'zaya-hf[dev]')", allow_module_level=True)

import httpx  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from zaya_hf import default_model_path  # noqa: E402
from zaya_hf.generation_zaya import LocalGenerationEngine, MarkovianRSAConfig, run_markovian_rsa  # noqa: E402
from zaya_hf.serving import OpenAICompletionsEngine, RequestForm  # noqa: E402

STARTUP_SECONDS = 120  # import, model load; the loop below stops by itself


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def transformers_server(tmp_path_factory):
    port = free_port()
    log = (tmp_path_factory.mktemp("transformers-serve") / "server.log").open("w+")  # uvicorn logs every request
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", "from transformers.cli.transformers import main; main()", "serve",
               default_model_path(), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
               "--dtype", "float32", "--log-level", "error"]
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < end:
            if process.poll() is not None:
                log.seek(0)
                pytest.fail(f"transformers serve exited with {process.returncode}: {log.read()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            pytest.fail(f"transformers serve did not answer /health within {STARTUP_SECONDS} s")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)
        log.close()


def test_markovian_rsa_through_transformers_serve_matches_the_local_engine(transformers_server):
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    config = MarkovianRSAConfig(rounds=1, population=3, subset_size=2, rollout_tokens=48, tail_tokens=24,
                                sampling={"do_sample": False}, seed=5)
    questions = ["Compute 7+5-3+8.", "Compute 21-8+3+3-1."]
    with OpenAICompletionsEngine(transformers_server, tokenizer=tokenizer, max_concurrency=3) as engine:
        remote = [run_markovian_rsa(engine, q, tokenizer, config, progress=False) for q in questions]
        form, usage = engine.form, engine.usage
    model = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32).eval()
    local = [run_markovian_rsa(LocalGenerationEngine(model, tokenizer), q, tokenizer, config, progress=False)
             for q in questions]

    assert form == RequestForm(token_prompts=False, extensions=False)  # what transformers serve accepts
    for r, l in zip(remote, local):
        assert [x.completions for x in r.rounds] == [x.completions for x in l.rounds]
        assert [x.completion_tokens for x in r.rounds] == [x.completion_tokens for x in l.rounds]
        assert r.answer == l.answer and r.final_answers == l.final_answers
    # The server tokenised every text prompt to the ids the algorithm built (the engine checks usage.prompt_tokens).
    assert usage.prompt_tokens == sum(sum(x.prompt_lengths) for r in remote for x in r.rounds)
    assert usage.requests == 2 * 6 and usage.completion_tokens == sum(r.generated_tokens for r in remote)
