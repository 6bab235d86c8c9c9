"""transformers' conventions the model follows: the loss's kwargs, tuple outputs, every RoPE type, packed sequences,
transformers' own cache classes in generate()."""

import pytest
import torch
from conftest import make_pair, randomize, tiny_config
from transformers import DynamicCache
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from zaya_hf import ZayaConfig, ZayaForCausalLM, ZayaModel


@torch.no_grad()
def test_shift_labels_give_transformers_loss_on_the_given_targets(pair):
    """With sequence parallelism the caller passes labels already shifted (`shift_labels`); they must be used as they
    are, not shifted again, and `num_items_in_batch` must divide the sum."""
    model, _ = pair
    ids = torch.randint(3, 101, (2, 9))
    targets = torch.randint(3, 101, (2, 9))
    targets[0, :3] = -100
    out = model(ids, shift_labels=targets, num_items_in_batch=torch.tensor(11))
    expected = ForCausalLMLoss(out.logits, None, model.config.vocab_size, shift_labels=targets, num_items_in_batch=11)
    assert torch.equal(out.loss, expected)
    plain = model(ids, labels=ids).loss  # labels are shifted inside
    assert torch.equal(plain, ForCausalLMLoss(out.logits, ids, model.config.vocab_size))
    assert not torch.equal(out.loss, plain)


@torch.no_grad()
def test_return_dict_false_gives_tuples(pair):
    model, _ = pair
    ids = torch.randint(3, 101, (2, 5))
    causal = model(ids, labels=ids, return_dict=False)
    base = model.model(ids, return_dict=False, use_cache=False, output_hidden_states=True)
    assert type(causal) is tuple and type(base) is tuple
    assert torch.equal(causal[0], model(ids, labels=ids).loss) and causal[1].shape == (2, 5, 101)
    assert torch.equal(base[0], model.model(ids).last_hidden_state) and len(base[1]) == model.config.num_hidden_layers + 1


ROPE_TYPES = {
    "linear": {"factor": 4.0},
    "dynamic": {"factor": 4.0},
    "yarn": {"factor": 4.0, "original_max_position_embeddings": 32},
    "longrope": {"short_factor": [1.0, 1.5, 2.0, 2.5], "long_factor": [3.0] * 4, "original_max_position_embeddings": 32},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
}


@pytest.mark.parametrize("rope_type", list(ROPE_TYPES))
@torch.no_grad()
def test_every_rope_type_gives_transformers_frequencies(rope_type):
    """Per layer type, with partial rotary factor 0.5: the inverse frequencies and the attention scaling are those of
    transformers' own RoPE functions, and the model runs (dynamic and longrope past the original length)."""
    params = {"rope_type": rope_type, "rope_theta": 10_000.0, "partial_rotary_factor": 0.5, **ROPE_TYPES[rope_type]}
    config = tiny_config(max_position_embeddings=64, rope_parameters={
        "hybrid": dict(params, rope_theta=5e5), "hybrid_sliding": params,
    })
    model = ZayaModel(config).eval()
    rotary = model.rotary_emb
    for layer_type in ("hybrid", "hybrid_sliding"):
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None, layer_type=layer_type)
        assert inv_freq.shape == (4,)  # head_dim 16 x 0.5 rotary dims, one frequency per pair
        assert torch.equal(getattr(rotary, f"{layer_type}_inv_freq"), inv_freq)
        assert getattr(rotary, f"{layer_type}_attention_scaling") == scaling
    default = ZayaModel(tiny_config()).rotary_emb
    if rope_type != "dynamic":  # dynamic rescales only past max_position_embeddings
        assert not torch.equal(rotary.hybrid_sliding_inv_freq, default.hybrid_sliding_inv_freq)
    assert torch.isfinite(model(torch.randint(3, 101, (1, 80))).last_hidden_state).all()


def test_unknown_rope_type_is_refused():
    with pytest.raises(Exception, match="rope_type 'spiral' of 'hybrid' is not a RoPE type transformers implements"):
        tiny_config(rope_parameters={
            "hybrid": {"rope_type": "spiral", "rope_theta": 1e4}, "hybrid_sliding": {"rope_type": "default", "rope_theta": 1e4},
        })


def packed_and_alone(model, lengths=(5, 7, 4), seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, 101, (n,), generator=gen) for n in lengths]
    packed = torch.cat(rows)[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return rows, packed, positions


@pytest.mark.parametrize("layer_types", [["hybrid", "hybrid_sliding"], ["hybrid", "hybrid"]])
def test_packed_sequences_equal_the_sequences_run_alone(layer_types):
    """One row of three sequences with restarting position_ids (padding-free collators, TRL's padding_free): the
    logits and the gradients of the summed loss equal those of the three run one by one."""
    config = tiny_config(num_hidden_layers=2, layer_types=layer_types, sliding_window=4, cca_time0=3, cca_time1=2)
    torch.manual_seed(0)
    model = randomize(ZayaForCausalLM(config), seed=1).eval()
    rows, packed, positions = packed_and_alone(model)
    labels = packed.clone()
    labels[0, [0, 5, 12]] = -100  # each sequence's first token has no prediction target in the rows alone
    out = model(packed, position_ids=positions, labels=labels)
    out.loss.backward()
    packed_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    alone_logits, total = [], 0.0
    for row in rows:
        alone = model(row[None], labels=row[None])
        alone_logits.append(alone.logits[0])
        total = total + alone.loss * (len(row) - 1)
    (total / sum(len(row) - 1 for row in rows)).backward()
    assert (out.logits[0] - torch.cat(alone_logits)).abs().max().item() <= 1e-5
    assert out.cache is None  # packed rows run without a cache unless asked for (which is refused)
    for name, param in model.named_parameters():
        if param.grad is not None:
            scale = max(param.grad.abs().max().item(), 1e-6)
            assert (packed_grads[name] - param.grad).abs().max().item() <= 1e-5 * max(scale, 1.0), name


@torch.no_grad()
def test_packed_sequences_from_cu_seq_lens_and_what_is_refused(pair):
    model, _ = pair
    rows, packed, positions = packed_and_alone(model)
    by_positions = model(packed, position_ids=positions).logits
    cu_seq_lens = torch.tensor([0, 5, 12, 16])
    assert torch.equal(model(packed, cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens).logits, by_positions)
    assert torch.equal(model(packed, position_ids=positions, attention_mask=torch.ones_like(packed)).logits, by_positions)
    with pytest.raises(ValueError, match="run without a cache"):
        model(packed, position_ids=positions, use_cache=True)
    with pytest.raises(ValueError, match="take no attention_mask"):
        mask = torch.ones_like(packed)
        mask[0, 0] = 0
        model(packed, position_ids=positions, attention_mask=mask)


@torch.no_grad()
def test_generate_with_a_transformers_dynamic_cache_equals_the_default(pair):
    model, reference = pair
    ids = torch.randint(3, 101, (2, 6))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = model.generate(ids, **kwargs)
    assert torch.equal(model.generate(ids, cache=DynamicCache(config=model.config), **kwargs), expected)
    assert torch.equal(reference.generate(ids, **kwargs), expected)
    with pytest.raises(TypeError, match="conv and recurrent state"):
        model.generate(ids, cache=DynamicCache(), **kwargs)


def test_config_derives_the_conv_width_once():
    assert ZayaConfig(cca_time0=3, cca_time1=2).cca_conv_width == 3
    assert ZayaConfig().cca_conv_width == 2  # ZAYA1-8B
