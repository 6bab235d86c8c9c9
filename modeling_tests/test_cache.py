"""ZayaCache: incremental decoding equals the full forward, and every batch operation carries all CCA state."""

import pytest
import torch
from conftest import left_padded_batch, make_pair, tiny_config

from zaya_hf import ZayaCache, ZayaForCausalLM


@pytest.fixture
def model():
    return make_pair(tiny_config(cca_time0=3, cca_time1=2))[0]


@torch.no_grad()
def test_prefill_then_one_token_steps_equal_full_forward(model):
    ids = torch.randint(3, 101, (2, 14))
    full = model(ids).logits
    cache = ZayaCache(model.config)
    steps = [model(ids[:, :5], cache=cache, use_cache=True).logits]
    for t in range(5, ids.shape[1]):
        steps.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    assert cache.get_seq_length() == ids.shape[1]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


@torch.no_grad()
def test_multi_token_continuation_equals_full_forward(model):
    ids = torch.randint(3, 101, (2, 15))
    full = model(ids).logits
    cache = ZayaCache(model.config)
    chunks = [model(ids[:, a:b], cache=cache, use_cache=True).logits for a, b in ((0, 1), (1, 7), (7, 9), (9, 15))]
    assert (torch.cat(chunks, dim=1) - full).abs().max().item() <= 1e-5


@torch.no_grad()
def test_left_padded_incremental_decoding_matches_unpadded_rows(model):
    ids, mask, rows = left_padded_batch(seed=2)
    new = torch.randint(3, 101, (ids.shape[0], 4))
    cache = ZayaCache(model.config)
    model(ids, attention_mask=mask, cache=cache, use_cache=True)
    logits = []
    for t in range(new.shape[1]):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits.append(model(new[:, t : t + 1], attention_mask=mask, cache=cache, use_cache=True).logits)
    logits = torch.cat(logits, dim=1)
    for i, row in enumerate(rows):
        alone = model(torch.cat([row, new[i]])[None]).logits[0, -new.shape[1] :]
        assert (logits[i] - alone).abs().max().item() <= 1e-5


@torch.no_grad()
def test_fan_out_with_batch_repeat_interleave_continues_like_fresh_runs(model):
    prompts = torch.randint(3, 101, (2, 9))
    continuation = torch.randint(3, 101, (6, 5))  # 3 different continuations per prompt
    cache = ZayaCache(model.config)
    model(prompts, cache=cache, use_cache=True)
    cache.batch_repeat_interleave(3)
    fanned = model(continuation, cache=cache, use_cache=True).logits
    fresh = model(torch.cat([prompts.repeat_interleave(3, dim=0), continuation], dim=1)).logits[:, -5:]
    assert (fanned - fresh).abs().max().item() <= 1e-5

    # Then keep rows 4, 0 (in that order) and continue one more token: still exact.
    keep = torch.tensor([4, 0])
    cache.batch_select_indices(keep)
    step = torch.randint(3, 101, (2, 1))
    selected = model(step, cache=cache, use_cache=True).logits
    history = torch.cat([prompts.repeat_interleave(3, dim=0), continuation], dim=1)[keep]
    assert (selected - model(torch.cat([history, step], dim=1)).logits[:, -1:]).abs().max().item() <= 1e-5


def cca_state(cache, layer_idx: int = 0):
    return cache.get_conv_state(layer_idx), cache.get_recurrent_state(layer_idx)


@torch.no_grad()
def test_every_batch_operation_moves_the_cca_state(model):
    cache = ZayaCache(model.config)
    model(torch.randint(3, 101, (3, 7)), cache=cache, use_cache=True)
    conv, value = (t.clone() for t in cca_state(cache))
    assert conv.shape == (3, (4 + 2) * 16, (3 - 1) + (2 - 1)) and value.shape == (3, 2 * 16 // 2)

    cache.reorder_cache(torch.tensor([2, 0, 1]))
    assert torch.equal(cca_state(cache)[0], conv[[2, 0, 1]])
    assert torch.equal(cca_state(cache)[1], value[[2, 0, 1]])
    cache.batch_repeat_interleave(2)
    assert torch.equal(cca_state(cache)[1], value[[2, 0, 1]].repeat_interleave(2, dim=0))
    cache.batch_select_indices(torch.tensor([1, 4]))
    assert torch.equal(cca_state(cache)[0], conv[[2, 1]])
    assert cache.layers[0].keys.shape[0] == 2
    cache.reset()
    assert cca_state(cache) == (None, None) and cache.get_seq_length() == 0


@torch.no_grad()
def test_beam_search_matches_reference():
    ours, reference = make_pair(seed=4)
    ids, mask, _ = left_padded_batch(seed=4, lengths=(7, 5))
    kwargs = dict(attention_mask=mask, max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False,
                  pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kwargs), reference.generate(ids, **kwargs))


@torch.no_grad()
def test_transformers_caches_work_and_one_without_cca_state_is_refused(model):
    from transformers import DynamicCache, StaticCache

    ids = torch.randint(3, 101, (2, 6))
    expected = model(ids).logits
    for cache in (DynamicCache(config=model.config), StaticCache(config=model.config, max_cache_len=8)):
        prefill = model(ids[:, :4], cache=cache, use_cache=True).logits
        steps = [model(ids[:, i : i + 1], cache=cache, use_cache=True).logits for i in (4, 5)]
        assert (torch.cat([prefill, *steps], dim=1) - expected).abs().max().item() <= 1e-5, type(cache).__name__
    with pytest.raises(TypeError, match=r"conv and recurrent state in each of its 4 layers.*DynamicCache\(config=config\)"):
        model(ids, cache=DynamicCache(), use_cache=True)


def test_generate_uses_zaya_cache(model):
    out = model.generate(torch.randint(3, 101, (2, 4)), max_new_tokens=3, do_sample=False,
                         return_dict_in_generate=True, pad_token_id=0)
    assert isinstance(out.cache if hasattr(out, "cache") else out.past_key_values, ZayaCache)
