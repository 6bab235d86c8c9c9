"""Inputs the model refuses at its entry, with the problem named (issue 19's generate-inputs table): token ids out of
range, empty and 1-D inputs, positions past max_position_embeddings, and Markovian RSA sampling dicts out of range."""

import pytest
import torch
from conftest import tiny_config

from zaya_hf import ZayaCache, ZayaForCausalLM
from zaya_hf.generation_zaya import MarkovianRSAConfig

LIMIT = 32  # max_position_embeddings of the test model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ZayaForCausalLM(tiny_config(max_position_embeddings=LIMIT)).eval()


BAD_INPUTS = {
    "id = vocab_size": (lambda: torch.tensor([[5, 101]]), r"Token id 101 is out of range: ids must be in \[0, 101\)"),
    "negative id": (lambda: torch.tensor([[-3, 5]]), r"Token id -3 is out of range"),
    "empty prompt": (lambda: torch.zeros(1, 0, dtype=torch.long), r"Empty input of shape \(1, 0\)"),
    "1-D input_ids": (
        lambda: torch.tensor([5, 6, 7]),
        r"input_ids must be 2-D \[batch, sequence\], got shape \(3,\); .*input_ids\[None\]",
    ),
    "past max_position_embeddings": (
        lambda: torch.full((1, LIMIT + 1), 5),
        rf"Position {LIMIT} is past max_position_embeddings \({LIMIT}\)",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
@torch.no_grad()
def test_forward_and_generate_refuse_bad_inputs_by_name(model, case):
    make, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        model(make())
    with pytest.raises(ValueError, match=message):
        model.generate(make(), max_new_tokens=2, do_sample=False)


@torch.no_grad()
def test_embeddings_of_the_wrong_shape_are_named(model):
    with pytest.raises(ValueError, match=r"inputs_embeds must be \[batch, sequence, 64\], got shape \(3, 64\)"):
        model(inputs_embeds=torch.zeros(3, 64))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(torch.ones(1, 2, dtype=torch.long), inputs_embeds=torch.zeros(1, 2, 64))


@torch.no_grad()
def test_positions_count_the_cache_and_generation_stops_before_it_starts(model):
    cache = ZayaCache(model.config)
    model(torch.full((1, LIMIT - 1), 5), cache=cache, use_cache=True)
    model(torch.full((1, 1), 5), cache=cache, use_cache=True)  # position LIMIT - 1: the last one allowed
    with pytest.raises(ValueError, match=rf"Position {LIMIT} is past"):
        model(torch.full((1, 1), 5), cache=cache, use_cache=True)
    # generate() checks prompt + max_new_tokens once, before any work, rather than failing mid-generation.
    prompt = torch.full((1, LIMIT - 4), 5)
    with pytest.raises(ValueError, match=rf"reach {LIMIT + 1} tokens, past max_position_embeddings \({LIMIT}\): .*at most 4"):
        model.generate(prompt, max_new_tokens=5, do_sample=False)
    assert model.generate(prompt, max_new_tokens=4, do_sample=False, min_new_tokens=4).shape == (1, LIMIT)


def test_only_the_default_rope_bounds_positions():
    from zaya_hf.modeling_zaya import position_limit

    assert position_limit(tiny_config(max_position_embeddings=LIMIT)) == LIMIT
    scaled = tiny_config(max_position_embeddings=LIMIT)
    scaled.rope_parameters["hybrid"] = {**scaled.rope_parameters["hybrid"], "rope_type": "linear", "factor": 4.0}
    assert position_limit(scaled) is None  # a scaled RoPE is the config's claim to run longer


BAD_SAMPLING = {
    "negative temperature": ({"temperature": -1}, r"sampling\['temperature'\] must be >= 0 \(0 is greedy\), got -1"),
    "top_p 0": ({"top_p": 0}, r"sampling\['top_p'\] must be in \(0, 1\], got 0"),
    "fractional top_k": ({"top_k": 2.5}, r"sampling\['top_k'\] must be an integer >= 0"),
    "do_sample as text": ({"do_sample": "yes"}, r"sampling\['do_sample'\] must be True or False"),
    "sampling at temperature 0": ({"do_sample": True, "temperature": 0}, r"do_sample=True with temperature 0"),
}


@pytest.mark.parametrize("case", BAD_SAMPLING, ids=list(BAD_SAMPLING))
def test_sampling_dicts_out_of_range_are_refused(model, case):
    sampling, message = BAD_SAMPLING[case]
    with pytest.raises(ValueError, match=message):
        MarkovianRSAConfig(sampling=sampling)
    with pytest.raises(ValueError, match=message.replace("sampling", "final_sampling", 1)):
        MarkovianRSAConfig(final_sampling=sampling)
    with pytest.raises(ValueError, match=message):
        model.generate_markovian_rsa("Compute 1+1.", tokenizer=None, sampling=sampling)
    assert MarkovianRSAConfig(sampling={"temperature": 0}).sampling == {"temperature": 0}  # greedy, as documented
