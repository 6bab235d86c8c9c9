"""Markovian RSA on a tiny ZAYA through its own generate(): batching, fan-out, accounting, bounded memory."""

import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from rsa_fixtures import QUESTION, make_tokenizer, tiny_rsa_model

from zaya_hf import ZayaCache
from zaya_hf.generation_zaya import (
    LocalGenerationEngine,
    MarkovianRSAConfig,
    aggregation_messages,
    encode_chat,
    question_messages,
    question_text,
    run_markovian_rsa,
)

GREEDY = {"do_sample": False}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_rsa_model(tokenizer, seed=0)


STOP_EVERY = 4


@pytest.fixture(scope="module")
def eos_model(tokenizer):
    """A tiny ZAYA whose rollouts end at EOS after 1..STOP_EVERY tokens, depending on the row's prompt length: its
    EOS logit is lifted whenever the next position is a multiple of STOP_EVERY (position ids count real tokens
    only, so this holds with left padding too). Random tiny models rarely emit EOS on their own."""
    model = tiny_rsa_model(tokenizer, seed=1)
    eos = tokenizer.eos_token_id

    def stop_at_positions(module, args, kwargs, output):
        if kwargs.get("position_ids") is not None:
            next_position = kwargs["position_ids"][:, -1] + 1  # [B]
        else:  # an unpadded call without position ids (the shared-prefix prefill): the cache length is next
            next_position = torch.tensor(kwargs["cache"].get_seq_length())
        output.logits[:, -1, eos] += 1e4 * (next_position % STOP_EVERY == 0)

    model.register_forward_hook(stop_at_positions, with_kwargs=True)
    return model


def generate_alone(model, tokenizer, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Plain greedy generate() of one unpadded prompt; the new tokens up to and including EOS."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    new = out[0, len(prompt):].tolist()
    return new[: new.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in new else new


def varied_prompts(tokenizer, count=3):
    """Prompts of different lengths: aggregation prompts over 1..count tails."""
    tails = ["r0c0k1 r0c0k2", "r0c1k3", "r0c2k4 r0c2k5 r0c2k6 r0c2k7"]
    problem = question_text(question_messages(QUESTION))
    return [encode_chat(tokenizer, aggregation_messages(None, problem, tails[: i + 1])) for i in range(count)]


@torch.no_grad()
@pytest.mark.parametrize("which", ["model", "eos_model"])
def test_batched_left_padded_round_equals_each_prompt_alone(request, tokenizer, which):
    model = request.getfixturevalue(which)
    prompts = varied_prompts(tokenizer)
    assert len({len(p) for p in prompts}) == 3
    batch = LocalGenerationEngine(model, tokenizer).generate(prompts, max_new_tokens=12, sampling=GREEDY, seed=None)
    for prompt, completion in zip(prompts, batch.completions):
        alone = generate_alone(model, tokenizer, prompt, 12)
        assert completion.num_tokens == len(alone)
        assert completion.finished == (alone[-1] == tokenizer.eos_token_id)
        assert tokenizer(completion.text)["input_ids"] == alone[: len(alone) - completion.finished]
    if which == "eos_model":  # the padding-after-EOS path is exercised: rows stop at different lengths
        assert len({c.num_tokens for c in batch.completions}) > 1 and any(c.finished for c in batch.completions)


@torch.no_grad()
def test_round_zero_prefills_the_question_once_and_fans_it_out(model, tokenizer):
    prompt = encode_chat(tokenizer, question_messages(QUESTION))
    shapes = []
    hook = model.model.register_forward_pre_hook(lambda module, args, kwargs: shapes.append(
        tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        batch = LocalGenerationEngine(model, tokenizer).generate([prompt] * 4, max_new_tokens=6, sampling=GREEDY,
                                                                 seed=None)
    finally:
        hook.remove()
    assert shapes[0] == (1, len(prompt) - 1)  # the shared prefix, once
    assert all(shape == (4, 1) for shape in shapes[1:])  # then only one new token per row and step
    alone = generate_alone(model, tokenizer, prompt, 6)
    assert all(c.num_tokens == len(alone) for c in batch.completions)
    assert all(tokenizer(c.text)["input_ids"] == alone[: len(alone) - c.finished] for c in batch.completions)


@torch.no_grad()
def test_chunked_fan_out_equals_one_batch(model, tokenizer):
    prompt = encode_chat(tokenizer, question_messages(QUESTION))
    whole = LocalGenerationEngine(model, tokenizer).generate([prompt] * 5, max_new_tokens=5, sampling=GREEDY,
                                                             seed=None)
    chunked = LocalGenerationEngine(model, tokenizer, max_batch_size=2).generate(
        [prompt] * 5, max_new_tokens=5, sampling=GREEDY, seed=None)
    assert whole.completions == chunked.completions


class RecordingEngine(LocalGenerationEngine):
    """Keeps every round's prompts, and how many ZayaCaches are alive when a round starts (none should be)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prompts = []
        self.caches_alive_at_round_start = []

    def generate(self, prompts, **kwargs):
        self.prompts.append(prompts)
        self.caches_alive_at_round_start.append(len(LIVE_CACHES))
        return super().generate(prompts, **kwargs)


LIVE_CACHES = weakref.WeakSet()


@pytest.fixture
def track_caches(monkeypatch):
    """Every ZayaCache built from now on goes into LIVE_CACHES, which holds it only as long as something else does."""
    init = ZayaCache.__init__

    def tracked_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        LIVE_CACHES.add(self)

    monkeypatch.setattr(ZayaCache, "__init__", tracked_init)


@torch.no_grad()
def test_token_accounting_equals_the_tokens_generated(eos_model, tokenizer):
    engine = RecordingEngine(eos_model, tokenizer)
    config = MarkovianRSAConfig(rounds=2, population=4, subset_size=2, rollout_tokens=10, tail_tokens=4,
                                sampling=GREEDY, seed=5)
    result = run_markovian_rsa(engine, QUESTION, tokenizer, config, progress=False)
    counts = []
    for record, prompts in zip(result.rounds, engine.prompts):
        # What generate() really produces for each prompt on its own: new tokens up to and including EOS.
        generated = [len(generate_alone(eos_model, tokenizer, prompt, 10)) for prompt in prompts]
        assert record.completion_tokens == generated and record.generated_tokens == sum(generated)
        counts += generated
    assert result.generated_tokens == sum(counts)
    assert 0 < min(counts) < max(counts)  # rollouts stopped at EOS after different numbers of tokens


@torch.no_grad()
def test_rounds_zero_equals_plain_parallel_sampling(model, tokenizer):
    result = model.generate_markovian_rsa(QUESTION, tokenizer, rounds=0, population=3, rollout_tokens=8, seed=7,
                                          sampling={"temperature": 1.0, "top_k": 20}, progress=False)
    prompt = torch.tensor([encode_chat(tokenizer, question_messages(QUESTION))] * 3)
    torch.manual_seed(7)  # round 0 samples tokens with `seed + 0`
    plain = model.generate(prompt, do_sample=True, temperature=1.0, top_k=20, top_p=1.0, max_new_tokens=8,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    texts = []
    for row in plain[:, prompt.shape[1]:].tolist():
        row = row[: row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
        texts.append(tokenizer.decode(row))
    assert len(result.rounds) == 1 and result.final_texts == texts
    assert len(set(texts)) > 1  # really sampled


@torch.no_grad()
@pytest.mark.parametrize("tail_unit", ["tokens", "words"])
def test_memory_is_bounded_whatever_the_number_of_rounds(model, tokenizer, tail_unit, track_caches):
    population, subset, tau, beta = 4, 2, 6, 10
    problem = question_text(question_messages(QUESTION))
    # |q| + C·τ + template: an aggregation prompt whose C tails hold τ tokens (= τ words here) each.
    full_tails = [" ".join(["r0c0k1"] * tau)] * subset
    prompt_bound = len(encode_chat(tokenizer, aggregation_messages(None, problem, full_tails)))

    def cache_bytes(rows: int, length: int) -> int:
        cache = ZayaCache(model.config)
        model(torch.full((rows, length), 5), cache=cache, use_cache=True, logits_to_keep=1)
        return cache.nbytes

    # A round's cache holds at most (longest prompt + β - 1) tokens per row (the last token is never fed back).
    cache_bound = cache_bytes(population, prompt_bound + beta - 1)
    peaks = {}
    for rounds in (1, 4):
        engine = RecordingEngine(model, tokenizer)
        config = MarkovianRSAConfig(rounds=rounds, population=population, subset_size=subset, rollout_tokens=beta,
                                    tail_tokens=tau, tail_unit=tail_unit, sampling=GREEDY, seed=0)
        result = run_markovian_rsa(engine, QUESTION, tokenizer, config, progress=False)
        assert engine.caches_alive_at_round_start == [0] * (rounds + 1)  # no cache crosses a round boundary
        for record in result.rounds[1:]:
            assert max(record.prompt_lengths) <= prompt_bound
            assert record.peak_cache_bytes <= cache_bound
        peaks[rounds] = [record.peak_cache_bytes for record in result.rounds]
    # Later rounds need no more memory than the first aggregation round did.
    assert max(peaks[4][1:]) <= cache_bound and peaks[4][:2] == peaks[1][:2]


def test_generation_module_travels_as_remote_code(model, tokenizer, tmp_path, monkeypatch):
    """save_pretrained ships generation_zaya.py next to modeling_zaya.py; a process that never imports zaya_hf
    loads the folder with trust_remote_code and runs Markovian RSA. Optional imports are guarded."""
    from transformers.dynamic_module_utils import get_imports

    from zaya_hf import generation_zaya

    assert set(get_imports(generation_zaya.__file__)) <= {"collections", "copy", "dataclasses", "random", "re",
                                                          "threading", "torch", "typing"}
    monkeypatch.setattr(type(model), "_auto_class", "AutoModelForCausalLM")
    monkeypatch.setattr(type(model.config), "_auto_class", "AutoConfig")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "generation_zaya.py").exists()
    script = (
        "import sys\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "assert 'zaya_hf' not in sys.modules and type(model).__module__.startswith('transformers_modules')\n"
        "result = model.generate_markovian_rsa('What is three plus four ?', AutoTokenizer.from_pretrained(sys.argv[1]),\n"
        "    rounds=1, population=2, subset_size=2, rollout_tokens=3, tail_tokens=2, progress=False)\n"
        "print(result.generated_tokens, len(result.rounds))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    generated, rounds = map(int, done.stdout.split()[-2:])
    assert rounds == 2 and 2 <= generated <= 2 * 2 * 3


def test_example_runs_offline_in_demo_mode():
    example = Path(__file__).resolve().parents[1] / "examples" / "markovian_rsa.py"
    done = subprocess.run([sys.executable, str(example), "--demo", "--rounds", "1", "--population", "2",
                           "--rollout-tokens", "4", "--tail-tokens", "2", "--reference", "9"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "at most 16 decode tokens" in done.stdout  # 2 rollouts x 2 rounds x 4 tokens
    assert "round 1: 2 rollouts" in done.stdout and "mean accuracy" in done.stdout
