"""Croppable and static caches, compiled decoding, speculative decoding (the package's CPU fast paths: test_ops.py)."""

import copy

import pytest
import torch
from conftest import left_padded_batch, make_pair, tiny_config
from transformers import CompileConfig, StaticCache

from zaya_hf import ZayaCache, ZayaForCausalLM, predict_cache_nbytes


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@pytest.fixture(scope="module")
def model():
    return make_pair(tiny_config(cca_time0=3, cca_time1=2), seed=21)[0]


@torch.no_grad()
def test_crop_rolls_every_state_back_exactly(model):
    ids = torch.randint(3, 101, (2, 16))
    cache = ZayaCache(model.config)
    model(ids[:, :8], cache=cache, use_cache=True)
    cache.activate_past_recording()
    model(ids[:, 8:12], cache=cache, use_cache=True)  # a 4-token draft...
    model(ids[:, 12:13], cache=cache, use_cache=True)  # ...and one more step
    cache.crop(-3)  # keep 8 + 2 tokens
    assert cache.get_seq_length() == 10
    continued = model(ids[:, 10:16], cache=cache, use_cache=True).logits
    assert (continued - model(ids).logits[:, 10:]).abs().max().item() <= 1e-5
    with pytest.raises(RuntimeError, match="only 6 were recorded"):
        cache.crop(-7)


@torch.no_grad()
def test_reserved_room_decodes_in_place_and_equals_the_full_forward(model):
    """With a max length (as generate() sets it) full-attention layers write decode steps into reserved room:
    few reallocations, never more than the max length held, same logits; crop and batch ops keep working."""
    ids = torch.randint(3, 101, (2, 30))
    cache = ZayaCache(model.config)
    cache.set_max_length(29)
    model(ids[:, :6], cache=cache, use_cache=True)
    layer = next(layer for layer in cache.layers if type(layer).__name__ == "ZayaCacheLayer")
    buffers, logits = set(), []
    for t in range(6, 24):
        logits.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
        buffers.add(layer._key_buffer.data_ptr())
        assert layer.keys.data_ptr() == layer._key_buffer.data_ptr()  # a view of the buffer, not a copy
    assert len(buffers) <= 3  # 12 -> 24 -> 29 tokens of room, not one allocation per step
    assert (torch.cat(logits, dim=1) - model(ids[:, :24]).logits[:, 6:]).abs().max().item() <= 1e-5
    assert cache.nbytes <= predict_cache_nbytes(model.config, 2, 29, torch.float32)

    cache.activate_past_recording()
    model(ids[:, 24:27], cache=cache, use_cache=True)
    cache.crop(-2)  # the next step overwrites the two dropped columns in place
    step = model(ids[:, 25:26], cache=cache, use_cache=True).logits
    assert (step - model(ids[:, :26]).logits[:, 25:]).abs().max().item() <= 1e-5

    cache.batch_select_indices(torch.tensor([1]))  # a new (unbuffered) tensor: the next update reallocates
    step = model(ids[1:, 26:27], cache=cache, use_cache=True).logits
    assert (step - model(ids[1:, :27]).logits[:, 26:]).abs().max().item() <= 1e-5


@torch.no_grad()
def test_cca_state_after_a_prompt_does_not_keep_the_prompt_window_alive(model):
    cache = ZayaCache(model.config)
    model(torch.randint(3, 101, (2, 20)), cache=cache, use_cache=True)
    for layer in cache.layers:
        for state in (layer.conv_states[0], layer.recurrent_states[0]):
            assert state.untyped_storage().nbytes() == state.numel() * state.element_size()


def test_crop_without_recording_fails_clearly(model):
    cache = ZayaCache(model.config)
    with torch.no_grad():
        model(torch.randint(3, 101, (1, 5)), cache=cache, use_cache=True)
    with pytest.raises(RuntimeError, match="activate_past_recording"):
        cache.crop(-1)


@torch.no_grad()
def test_bf16_decode_steps_equal_the_reference_bit_for_bit():
    """The CPU decode fast paths (CCA conv as a state update, one-token experts) round like transformers' ZAYA in
    bf16: each step's logits are identical."""
    ours, reference = make_pair(tiny_config(cca_time0=3, cca_time1=2), seed=25, dtype=torch.bfloat16)
    ids, mask, _ = left_padded_batch(seed=26)
    cache = ZayaCache(ours.config)
    logits = ours(ids, attention_mask=mask, cache=cache, use_cache=True).logits
    expected = reference(ids, attention_mask=mask, use_cache=True)
    for _ in range(4):
        assert torch.equal(logits, expected.logits)
        step = expected.logits[:, -1:].argmax(-1)
        mask = torch.cat([mask, torch.ones_like(step)], dim=-1)
        logits = ours(step, attention_mask=mask, cache=cache, use_cache=True).logits
        expected = reference(step, attention_mask=mask, cache=expected.past_key_values, use_cache=True)


@torch.no_grad()
def test_generate_compiles_on_cpu_when_given_a_compile_config():
    """A left-padded batch of 2 (the fused batch 1-2 path, padding included) decodes to the eager tokens."""
    model = make_pair(tiny_config(), seed=23)[0]  # fresh: nothing compiled yet
    ids, mask, _ = left_padded_batch(seed=24, lengths=(9, 6))
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    eager = model.generate(ids, **kwargs)
    config = CompileConfig(fullgraph=True, dynamic=False)
    compiled = model.generate(ids, cache_implementation="static", compile_config=config, **kwargs)
    assert hasattr(model, "_compiled_call"), "generate() did not compile the decode step on CPU"
    assert not config._compile_all_devices  # the caller's config is left alone
    assert torch.equal(compiled, eager)


@torch.no_grad()
def test_static_cache_generation_equals_dynamic(model):
    ids, mask, _ = left_padded_batch(seed=22)
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    dynamic = model.generate(ids, **kwargs)
    out = model.generate(ids, cache_implementation="static", return_dict_in_generate=True, **kwargs)
    assert type(out.cache) is StaticCache
    assert torch.equal(out.sequences, dynamic)


@torch.no_grad()
def test_static_cache_forward_equals_dynamic_logits(model):
    ids = torch.randint(3, 101, (2, 12))
    static, dynamic = StaticCache(config=model.config, max_cache_len=16), ZayaCache(model.config)
    for a, b in ((0, 7), (7, 8), (8, 9), (9, 12)):
        ls = model(ids[:, a:b], cache=static, use_cache=True).logits
        ld = model(ids[:, a:b], cache=dynamic, use_cache=True).logits
        assert (ls - ld).abs().max().item() <= 1e-5
    static.reset()
    assert static.get_conv_state(0) is None and static.get_recurrent_state(0) is None
    again = model(ids[:, :7], cache=static, use_cache=True).logits
    assert (again - model(ids[:, :7]).logits).abs().max().item() <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("dtype, batch, tolerance", [(torch.float32, 2, 1e-5), (torch.bfloat16, 1, 2e-2)])
def test_compiled_decode_step_equals_eager(model, dtype, batch, tolerance):
    """The batches where the compiled step fuses every product (fp32: 1-2 rows, bf16: 1); bf16 rounds differently."""
    model = copy.deepcopy(model).to(dtype)
    ids = torch.randint(3, 101, (batch, 9))
    eager_cache, compiled_cache = (StaticCache(config=model.config, max_cache_len=16) for _ in range(2))
    model(ids[:, :6], cache=eager_cache, use_cache=True)
    model(ids[:, :6], cache=compiled_cache, use_cache=True)
    compiled = torch.compile(model.forward, fullgraph=True, dynamic=False)
    for t in range(6, 9):
        step = ids[:, t : t + 1]
        eager = model(step, cache=eager_cache, use_cache=True).logits
        compiled_logits = compiled(step, cache=compiled_cache, use_cache=True).logits
        assert (compiled_logits.float() - eager.float()).abs().max().item() <= tolerance


@torch.no_grad()
def test_compiled_bf16_decode_step_calls_the_native_kernel_for_large_weights():
    """A model whose weights reach `BF16_NATIVE_MIN_WEIGHT_ELEMENTS`: the compiled bf16 step calls zaya_hf's kernel
    as an opaque op for its 2-D weights (the gathered expert weights stay fused) and equals the eager step within
    bf16 rounding."""
    from torch._inductor.compile_fx import compile_fx

    from zaya_hf.ops import native

    if native.BF16_MATVEC is None:
        pytest.skip(f"the kernels were not built here: {native.NATIVE_UNAVAILABLE}")
    config = tiny_config(hidden_size=128, moe_intermediate_size=128, vocab_size=256, num_hidden_layers=2,
                         layer_types=["hybrid", "hybrid_sliding"])
    model = make_pair(config, seed=29)[0].to(torch.bfloat16)
    graphs = []

    def inductor_recording_graphs(graph, inputs):
        graphs.append(str(graph.graph))
        return compile_fx(graph, inputs)

    ids = torch.randint(3, 256, (1, 8))
    eager_cache, compiled_cache = (StaticCache(config=model.config, max_cache_len=12) for _ in range(2))
    model(ids[:, :6], cache=eager_cache, use_cache=True)
    model(ids[:, :6], cache=compiled_cache, use_cache=True)
    compiled = torch.compile(model.forward, fullgraph=True, dynamic=False, backend=inductor_recording_graphs)
    for t in range(6, 8):
        step = ids[:, t : t + 1]
        eager = model(step, cache=eager_cache, use_cache=True).logits
        compiled_logits = compiled(step, cache=compiled_cache, use_cache=True).logits
        assert (compiled_logits.float() - eager.float()).abs().max().item() <= 2e-2
    assert graphs and all("zaya_hf.bf16_matvec" in graph for graph in graphs)


@torch.no_grad()
@pytest.mark.parametrize("batch", [1])
def test_prompt_lookup_decoding_equals_greedy(model, batch):
    pattern = torch.randint(3, 101, (batch, 6))
    ids = torch.cat([pattern, pattern, pattern[:, :3]], dim=1)  # repetitive, so that lookups get accepted
    greedy = model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0)
    lookup = model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0, prompt_lookup_num_tokens=4)
    assert torch.equal(lookup, greedy)


@torch.no_grad()
def test_assistant_model_decoding_equals_greedy(model):
    assistant = make_pair(tiny_config(num_hidden_layers=2, layer_types=["hybrid", "hybrid_sliding"]), seed=23)[0]
    ids = torch.randint(3, 101, (1, 10))
    greedy = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)
    assisted = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0, assistant_model=assistant)
    # The model itself as its own draft accepts every candidate: exercises multi-token verification and crop(0).
    self_assisted = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0, assistant_model=model)
    assert torch.equal(assisted, greedy)
    assert torch.equal(self_assisted, greedy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_cache_nbytes_matches_prediction(dtype):
    config = tiny_config()
    model = ZayaForCausalLM(config).to(dtype).eval()
    for batch, length in ((1, 3), (2, 13)):
        cache = ZayaCache(config)
        model(torch.randint(3, 101, (batch, length)), cache=cache, use_cache=True)
        assert cache.nbytes == predict_cache_nbytes(config, batch, length, dtype)


def test_kv_bytes_per_token_of_zaya1_8b():
    from zaya_hf import ZayaConfig

    config = ZayaConfig()  # ZAYA1-8B sizes
    per_token = predict_cache_nbytes(config, 1, 2, torch.bfloat16) - predict_cache_nbytes(config, 1, 1, torch.bfloat16)
    assert per_token == config.num_hidden_layers * 1024  # 2 x 2 kv heads x 128 x 2 bytes per layer
    fixed_per_layer = (predict_cache_nbytes(config, 1, 1, torch.bfloat16) - per_token) // config.num_hidden_layers
    assert fixed_per_layer == 5376
