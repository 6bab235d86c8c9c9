"""Numerical parity with transformers' own ZAYA (the reference) on the same random weights."""

import pytest
import torch
from conftest import left_padded_batch, make_pair, tiny_config


def test_state_dict_loads_strictly_both_ways(pair):
    ours, reference = pair
    assert set(ours.state_dict()) == set(reference.state_dict())
    assert not ours.load_state_dict(reference.state_dict(), strict=True).missing_keys
    assert not reference.load_state_dict(ours.state_dict(), strict=True).missing_keys


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("padded", [False, True])
@torch.no_grad()
def test_fp32_logits_match(attn_implementation, padded):
    ours, reference = make_pair(tiny_config(attn_implementation=attn_implementation))
    ids, mask, _ = left_padded_batch()
    mask = mask if padded else None
    diff = (ours(ids, attention_mask=mask).logits - reference(ids, attention_mask=mask).logits).abs()
    if padded:  # padded query positions attend to nothing useful; compare real tokens only
        diff = diff[mask.bool()]
    assert diff.max().item() <= 1e-5


@pytest.mark.parametrize("padded", [False, True])
@torch.no_grad()
def test_bf16_logits_bit_identical(padded):
    ours, reference = make_pair(dtype=torch.bfloat16, seed=3)
    ids, mask, _ = left_padded_batch(seed=3)
    mask = mask if padded else None
    ours_logits = ours(ids, attention_mask=mask).logits
    assert ours_logits.dtype == torch.bfloat16
    assert torch.equal(ours_logits, reference(ids, attention_mask=mask).logits)


@torch.no_grad()
def test_skip_class_wins_and_zeroes_the_moe_output():
    ours, reference = make_pair(seed=5)
    # Layer 1's router must pick the skip class for every token.
    for model in (ours, reference):
        model.model.layers[1].mlp.gate.balancing_biases[-1] = 10.0
    ids, _, _ = left_padded_batch(seed=5)
    out = ours(ids, output_router_logits=True)
    router_logits = out.router_logits[1]
    assert router_logits.shape == (ids.numel(), ours.config.num_experts + 1)
    moe_out = ours.model.layers[1].mlp(torch.randn(2, 5, ours.config.hidden_size))[0]
    assert torch.count_nonzero(moe_out) == 0
    assert (out.logits - reference(ids).logits).abs().max().item() <= 1e-5


@torch.no_grad()
def test_greedy_left_padded_generation_identical_to_reference(pair):
    ours, reference = pair
    ids, mask, _ = left_padded_batch(seed=7)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kwargs), reference.generate(ids, **kwargs))


@torch.no_grad()
def test_auxiliary_outputs_have_reference_shapes(pair):
    ours, _ = pair
    ids, mask, _ = left_padded_batch()
    out = ours(ids, attention_mask=mask, output_hidden_states=True, output_router_logits=True)
    n_layers = ours.config.num_hidden_layers
    assert len(out.hidden_states) == n_layers + 1
    assert len(out.router_logits) == n_layers
    assert out.aux_loss is not None and out.aux_loss.ndim == 0
    eager, _ = make_pair(tiny_config(attn_implementation="eager"))
    attn = eager(ids, attention_mask=mask, output_attentions=True).attentions
    assert len(attn) == n_layers and attn[0].shape == (3, 4, ids.shape[1], ids.shape[1])
