"""generate() modes on ZAYA: greedy, seeded sampling, beam search, left-padded batches."""

import torch
from conftest import left_padded_batch, make_pair


@torch.no_grad()
def test_left_padded_batch_greedy_equals_each_prompt_alone(pair):
    ours, _ = pair
    ids, mask, rows = left_padded_batch(seed=11)
    batched = ours.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    for i, row in enumerate(rows):
        alone = ours.generate(row[None], max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert torch.equal(batched[i, -10:], alone[0, -10:])


@torch.no_grad()
def test_seeded_sampling_is_reproducible_and_matches_reference(pair):
    ours, reference = pair
    ids, mask, _ = left_padded_batch(seed=12)
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=True, top_p=0.9, temperature=1.0, pad_token_id=0)
    torch.manual_seed(123)
    first = ours.generate(ids, **kwargs)
    torch.manual_seed(123)
    second = ours.generate(ids, **kwargs)
    torch.manual_seed(123)
    theirs = reference.generate(ids, **kwargs)
    assert torch.equal(first, second)
    assert torch.equal(first, theirs)


@torch.no_grad()
def test_num_return_sequences_sampling_shapes(pair):
    ours, _ = pair
    torch.manual_seed(0)
    out = ours.generate(torch.randint(3, 101, (2, 5)), do_sample=True, num_return_sequences=3, max_new_tokens=4,
                        pad_token_id=0)
    assert out.shape == (6, 9)


@torch.no_grad()
def test_bf16_greedy_generation_matches_reference():
    ours, reference = make_pair(seed=13, dtype=torch.bfloat16)
    ids, mask, _ = left_padded_batch(seed=13)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kwargs), reference.generate(ids, **kwargs))
