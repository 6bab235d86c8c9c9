"""Our equivalent of transformers' `GenerationTesterMixin`, which the transformers sdist does not carry.

Written against the public tests/generation/test_utils.py of the transformers 5.2x series (read for reference, not
copied). Each check of the mixin that transformers' own ZAYA test module runs is here, or named where an existing
test covers it; the mixin's stateful / not-compilable skips (which transformers' ZAYA declares) are checks zaya_hf
must pass, so for zaya_hf they fail instead of skipping. `ZAYA_SUITE_TARGET=native` runs them against
transformers' ZAYA (suite_target.py).

mixin test                                              here
------------------------------------------------------  -----------------------------------------------------------
greedy / sample / beam search / beam sample generate,   test_generate_outputs[*] (sequence length; scores, logits,
  their *_dict_output(s) and *_dict_outputs_use_cache     attentions, hidden states and cache, with and without cache)
generate_without_input_ids                              test_generate_without_input_ids
left_padding_compatibility                              test_left_padding_compatibility
past_key_values_format                                  test_cache_format
generate_from_inputs_embeds (greedy, beam search),      test_generate_from_inputs_embeds[*],
  generate_from_random_inputs_embeds                      test_generate_from_random_inputs_embeds
generate_continue_from_past_key_values                  test_generate_continue_from_cache
generate_continue_from_inputs_embeds                    test_generate_continue_from_inputs_embeds
recurrent_layers_mask_padding_on_continued_forward      test_recurrent_state_masks_padding_on_continued_forward
generate_with_static_cache,                             test_generate_with_static_cache[*],
  generate_from_inputs_embeds_with_static_cache           test_generate_from_inputs_embeds_with_static_cache
generate_compile_model_forward_fullgraph,               test_generate_compiled_fullgraph (one compilation for the
  generate_compilation_all_outputs,                       three: equal to eager, all outputs, no recompilation)
  static_cache_no_recompile_with_smaller_length
assisted_decoding_matches_greedy_search (random, same)  test_assisted_decoding_matches_greedy[*]
prompt_lookup_decoding_matches_greedy_search            test_prompt_lookup_decoding_matches_greedy
assisted_decoding_sample                                test_assisted_decoding_sample
prompt_lookup_decoding_stops_at_eos                     not repeated: it tests PromptLookupCandidateGenerator alone
generate_methods_with_logits_to_keep,                   test_logits_to_keep
  forward_with_logits_to_keep
inherits_generation_mixin,                              test_generation_api
  prepare_inputs_for_generation_kwargs_forwards
generate_with_and_without_position_ids                  test_generate_with_and_without_position_ids
eager/sdpa_padding_matches_padding_free_with_position_ids  test_padding_matches_padding_free[*] (fp32, 1e-5)

Not here: the flash-attention, multi-accelerator, quanto-cache and MTP tests (hardware or packages CI lacks, or no
MTP layers); eager_matches_sdpa_generate (slow in transformers; test_parity.py compares logits with transformers'
ZAYA); custom_4d_attention_mask (its tree mask cannot isolate the branches for CCA, whose causal convolution mixes
each token with the one before it in the sequence; transformers skips it for sliding-window configs anyway).
Contrastive search, group and constrained beam search and DoLa left transformers' core in v5 for Hub
`custom_generate` repositories, which need the network.
"""

import pytest
import torch
from conftest import randomize
from suite_target import TARGET, ZayaConfig, ZayaForCausalLM, target_auto_classes
from transformers import GenerationMixin
from transformers.cache_utils import Cache, DynamicCache, LinearAttentionCacheLayerMixin, StaticCache
from transformers.generation import CompileConfig, GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput

pytestmark = pytest.mark.usefixtures(target_auto_classes.__name__)

MAX_NEW_TOKENS = 3
BATCH, PROMPT = 2, 7
MOE_TOLERANCE = 1e-3  # what transformers allows MoE models between two generate paths (routing at the margin)
GENERATION = dict(
    vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    num_experts=4, moe_intermediate_size=16, router_hidden_size=8, layer_types=["hybrid", "hybrid_sliding"],
    # Longer than any sequence here: the per-step attention shapes below are those of full attention.
    sliding_window=64, max_position_embeddings=512,
    pad_token_id=0, bos_token_id=1, eos_token_id=None,  # no EOS: every call generates exactly max_new_tokens
)


def make_model(seed: int = 0, attn_implementation: str = "eager", **overrides) -> ZayaForCausalLM:
    """A tiny randomised model (scales, temperatures and biases away from their init, so that positions and every
    state matter), eager attention so that attentions can be returned."""
    torch.manual_seed(seed)
    config = ZayaConfig(**{**GENERATION, **overrides})
    model = ZayaForCausalLM._from_config(config, attn_implementation=attn_implementation)
    return randomize(model, seed).eval()


def prompts(seed: int = 0, batch: int = BATCH) -> dict:
    """Left-padded prompts: the second row starts with two pad tokens."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, GENERATION["vocab_size"], (batch, PROMPT), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    if batch > 1:
        attention_mask[1, :2] = 0
        input_ids[1, :2] = GENERATION["pad_token_id"]
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def require_support(model_class, feature: str) -> None:
    """transformers' mixin skips stateful models for assisted decoding and packing, and models without
    `_can_compile_fullgraph` for static caches and compilation. zaya_hf must support all of them: fail, not skip."""
    # transformers 5.25 dropped `_is_stateful` (and the skips it drove); earlier versions read it
    stateful, compilable = getattr(model_class, "_is_stateful", False), model_class._can_compile_fullgraph
    declared, flag = {
        "assisted decoding": (not stateful, "_is_stateful = True"),
        "packed sequences": (not stateful, "_is_stateful = True"),
        "static cache": (compilable, "_can_compile_fullgraph = False"),
        "compilation": (compilable, "_can_compile_fullgraph = False"),
    }[feature]
    if declared:
        return
    message = f"{model_class.__module__}.{model_class.__name__} sets {flag}"
    if TARGET == "zaya_hf":
        pytest.fail(f"{message}: zaya_hf must support {feature}.")
    pytest.skip(f"{message}, so transformers' generation tests skip {feature} for it.")


def assert_similar_generations(expected, actual, atol: float = MOE_TOLERANCE) -> None:
    """Equal sequences, or sequences that part only where the scores up to the first difference are close."""
    if torch.equal(expected.sequences, actual.sequences):
        return
    generated = expected.sequences.shape[1] - len(expected.scores)
    for row in range(expected.sequences.shape[0]):
        differs = (expected.sequences[row] != actual.sequences[row]).nonzero()
        if len(differs):
            step = differs[0].item() - generated
            torch.testing.assert_close(actual.scores[step][row], expected.scores[step][row], atol=atol, rtol=atol)


def assert_caches_equal(first: Cache, second: Cache) -> None:
    """Every tensor held by every layer (keys, values and the CCA states, whatever the layer calls them)."""
    assert type(first) is type(second) and len(first.layers) == len(second.layers)

    def tensors(layer) -> dict:
        held = {}
        for name, value in vars(layer).items():
            if isinstance(value, torch.Tensor):
                held[name] = value
            elif isinstance(value, dict):
                held.update({f"{name}[{k}]": v for k, v in value.items() if isinstance(v, torch.Tensor)})
        return held

    for layer_1, layer_2 in zip(first.layers, second.layers):
        held_1, held_2 = tensors(layer_1), tensors(layer_2)
        assert held_1.keys() == held_2.keys()
        for name in held_1:
            torch.testing.assert_close(held_1[name], held_2[name], msg=lambda m, name=name: f"{name}: {m}")


def check_cache_format(cache, batch: int, length: int, config) -> None:
    """transformers' hybrid linear-attention cache layout, as its generation tests check it: a `Cache` with one
    layer per decoder layer, keys/values `[B, K, length, D]`, and the CCA state under the standard linear-attention
    layer interface: conv state `[B, (H + K) * D, W]` (W = cca_time0 + cca_time1 - 2; longer while past recording
    is on) and delayed-value state `[B, K * D / 2]`."""
    assert isinstance(cache, Cache), type(cache)
    assert len(cache.layers) == config.num_hidden_layers
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    conv_shape = (batch, (heads + kv_heads) * head_dim, config.cca_time0 + config.cca_time1 - 2)
    for layer in cache.layers:
        assert layer.keys.shape == layer.values.shape == (batch, kv_heads, length, head_dim), layer.keys.shape
        assert isinstance(layer, LinearAttentionCacheLayerMixin), f"{type(layer).__name__} is no linear-attention layer"
        assert layer.number_of_states == 1
        conv = layer.conv_states[0]
        if layer.record_past:
            assert conv.shape[:-1] == conv_shape[:-1] and conv.shape[-1] >= conv_shape[-1], conv.shape
        else:
            assert conv.shape == conv_shape, conv.shape
        assert layer.recurrent_states[0].shape == (batch, kv_heads * head_dim // 2)


def check_generate_outputs(output, config, batch: int, *, use_cache: bool, num_beams: int = 1, num_return: int = 1,
                           max_cache_len: int | None = None) -> None:
    """Shapes of everything `return_dict_in_generate=True` returns, step by step."""
    rows = batch * max(num_beams, num_return)  # the batch generate runs internally
    total = PROMPT + MAX_NEW_TOKENS
    assert isinstance(output, GenerateBeamDecoderOnlyOutput if num_beams > 1 else GenerateDecoderOnlyOutput)
    assert output.sequences.shape == (batch * num_return, total)
    for per_step in (output.scores, output.logits):
        assert isinstance(per_step, tuple) and len(per_step) == MAX_NEW_TOKENS
        assert all(step.shape == (rows, config.vocab_size) for step in per_step)
    assert len(output.attentions) == len(output.hidden_states) == MAX_NEW_TOKENS
    for step, (attentions, hidden_states) in enumerate(zip(output.attentions, output.hidden_states)):
        query_length = 1 if use_cache and step > 0 else PROMPT + step
        key_length = max_cache_len or PROMPT + step
        assert len(attentions) == config.num_hidden_layers
        assert all(a.shape == (rows, config.num_attention_heads, query_length, key_length) for a in attentions)
        assert len(hidden_states) == config.num_hidden_layers + 1
        assert all(h.shape == (rows, query_length, config.hidden_size) for h in hidden_states)
    if use_cache:
        check_cache_format(output.cache, rows, max_cache_len or total - 1, config)
    else:
        assert output.cache is None


MODES = {
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True, num_return_sequences=2, top_k=10, top_p=0.7, temperature=0.7),
    "beam_search": dict(do_sample=False, num_beams=2, length_penalty=2.0, early_stopping=False),
    "beam_sample": dict(do_sample=True, num_beams=2, length_penalty=2.0, early_stopping=False),
}
ALL_OUTPUTS = dict(
    return_dict_in_generate=True, output_scores=True, output_logits=True, output_attentions=True,
    output_hidden_states=True,
)


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
@pytest.mark.parametrize("mode", list(MODES))
def test_generate_outputs(mode, use_cache):
    model = make_model()
    torch.manual_seed(0)
    output = model.generate(
        **prompts(), **MODES[mode], **ALL_OUTPUTS, max_new_tokens=MAX_NEW_TOKENS, use_cache=use_cache,
        repetition_penalty=1.2, bad_words_ids=[[1, 0]], remove_invalid_values=True,
    )
    check_generate_outputs(
        output, model.config, BATCH, use_cache=use_cache, num_beams=MODES[mode].get("num_beams", 1),
        num_return=MODES[mode].get("num_return_sequences", 1),
    )


def test_generate_without_input_ids():
    model = make_model()
    sequences = model.generate(do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    assert sequences.shape == (1, 1 + MAX_NEW_TOKENS) and sequences[0, 0] == model.config.bos_token_id


@torch.no_grad()
def test_left_padding_compatibility():
    """32 left pads (masked, with position ids counting only real tokens) leave the next-token logits unchanged."""
    model = make_model()
    inputs = prompts()

    def forward(input_ids, attention_mask):
        position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits[:, -1]

    pads = torch.full((BATCH, 32), GENERATION["pad_token_id"])
    padded_ids = torch.cat([pads, inputs["input_ids"]], dim=1)
    padded_mask = torch.cat([torch.zeros_like(pads), inputs["attention_mask"]], dim=1)
    expected = forward(inputs["input_ids"], inputs["attention_mask"])
    torch.testing.assert_close(forward(padded_ids, padded_mask), expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_cache_format():
    model = make_model()
    output = model(**prompts(), use_cache=True)
    check_cache_format(output.cache, BATCH, PROMPT, model.config)


@pytest.mark.parametrize("num_beams", [1, 2], ids=["greedy", "beam_search"])
def test_generate_from_inputs_embeds(num_beams):
    model = make_model()
    inputs = prompts()
    input_ids = inputs.pop("input_ids")
    kwargs = dict(return_dict_in_generate=True, output_scores=True, num_beams=num_beams, do_sample=False,
                  max_new_tokens=5, use_cache=True, **inputs)
    from_ids = model.generate(input_ids=input_ids, **kwargs)
    assert from_ids.sequences.shape == (BATCH, PROMPT + 5)
    inputs_embeds = model.get_input_embeddings()(input_ids)
    from_embeds = model.generate(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)
    assert_similar_generations(from_ids, from_embeds)
    # Without input_ids the output holds only the new tokens, the same ones.
    from_embeds_alone = model.generate(inputs_embeds=inputs_embeds, **kwargs)
    from_embeds.sequences = from_embeds.sequences[:, PROMPT:]
    assert_similar_generations(from_embeds_alone, from_embeds)


def test_generate_from_random_inputs_embeds():
    model = make_model()
    input_ids = prompts()["input_ids"]
    kwargs = dict(return_dict_in_generate=True, output_scores=True, do_sample=False, max_new_tokens=5)
    inputs_embeds = model.get_input_embeddings()(input_ids)
    from_embeds = model.generate(input_ids, inputs_embeds=inputs_embeds, **kwargs)
    from_random = model.generate(input_ids, inputs_embeds=torch.rand_like(inputs_embeds), **kwargs)
    for expected, random in zip(from_embeds.scores, from_random.scores):
        assert not torch.allclose(expected, random)


def test_generate_continue_from_cache():
    """4 new tokens in one call equal 3 and then 1 more from the returned cache; the final caches are equal."""
    model = make_model()
    inputs = prompts()
    kwargs = dict(do_sample=False, return_dict_in_generate=True, output_scores=True, use_cache=True)
    at_once = model.generate(**inputs, **kwargs, max_new_tokens=4)
    first = model.generate(**inputs, **kwargs, max_new_tokens=3)
    mask = torch.nn.functional.pad(inputs["attention_mask"], (0, 3), value=1)
    second = model.generate(input_ids=first.sequences, attention_mask=mask, cache=first.cache, **kwargs,
                            max_new_tokens=1)
    second.scores = first.scores + second.scores
    assert_similar_generations(at_once, second)
    assert_caches_equal(at_once.cache, second.cache)


def test_generate_continue_from_inputs_embeds():
    model = make_model()
    embed = model.get_input_embeddings()
    inputs_embeds = embed(prompts(batch=1)["input_ids"])
    kwargs = dict(do_sample=False, return_dict_in_generate=True, use_cache=True)
    at_once = model.generate(inputs_embeds=inputs_embeds, max_new_tokens=4, **kwargs)
    first = model.generate(inputs_embeds=inputs_embeds, max_new_tokens=3, **kwargs)
    continued = torch.cat([inputs_embeds, embed(first.sequences)], dim=1)
    second = model.generate(inputs_embeds=continued, cache=first.cache, max_new_tokens=1, **kwargs)
    assert torch.cat([first.sequences, second.sequences], dim=1).tolist() == at_once.sequences.tolist()
    assert_caches_equal(at_once.cache, second.cache)


@torch.no_grad()
def test_recurrent_state_masks_padding_on_continued_forward():
    """Padding that arrives in a cached continuation is kept out of the CCA state as in one full forward."""
    model = make_model()
    input_ids = prompts()["input_ids"].clone()
    input_ids[1, :2] = 7  # an ordinary token: the mask alone marks padding
    first, pad = 4, 2
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, first : first + pad] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    full = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    head = model(input_ids=input_ids[:, :first], attention_mask=attention_mask[:, :first],
                 position_ids=position_ids[:, :first], use_cache=True)
    tail = model(input_ids=input_ids[:, first:], attention_mask=attention_mask, position_ids=position_ids[:, first:],
                 cache=head.cache, use_cache=True)
    torch.testing.assert_close(tail.logits[:, -1], full[:, -1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_generate_with_static_cache(dtype):
    model = make_model().to(dtype)
    require_support(type(model), "static cache")
    max_new_tokens = 20
    kwargs = dict(max_new_tokens=max_new_tokens, return_dict_in_generate=True, output_scores=True, use_cache=True)
    static = model.generate(**prompts(), **kwargs, cache_implementation="static")
    assert_similar_generations(model.generate(**prompts(), **kwargs), static)
    assert isinstance(static.cache, StaticCache), type(static.cache)
    check_cache_format(static.cache, BATCH, PROMPT + max_new_tokens - 1, model.config)


def test_generate_from_inputs_embeds_with_static_cache():
    model = make_model()
    require_support(type(model), "static cache")
    inputs = prompts()
    inputs_embeds = model.get_input_embeddings()(inputs.pop("input_ids"))
    output = model.generate(inputs_embeds=inputs_embeds, **inputs, max_new_tokens=10, cache_implementation="static",
                            return_dict_in_generate=True)
    assert isinstance(output.cache, StaticCache), type(output.cache)
    check_cache_format(output.cache, BATCH, PROMPT + 10 - 1, model.config)


def test_generate_compiled_fullgraph():
    """generate() compiles the forward without graph breaks (fullgraph, static shapes) on a static cache, returns
    what eager generation returns, all optional outputs included, and does not recompile for a second batch of the
    same shape nor for a shorter generation."""
    model = make_model()
    require_support(type(model), "compilation")
    torch.compiler.reset()
    batches = [prompts(seed=1), prompts(seed=2)]
    compile_config = CompileConfig(fullgraph=True, dynamic=False)
    compile_config._compile_all_devices = True  # transformers' own tests force compilation on CPU this way
    kwargs = dict(do_sample=False, max_new_tokens=MAX_NEW_TOKENS, use_cache=True, compile_config=compile_config,
                  **ALL_OUTPUTS)
    with torch.compiler.set_stance("force_eager"):
        eager = [model.generate(**batch, **kwargs) for batch in batches]
    assert not hasattr(model, "_compiled_call")  # the default cache is not compileable: no compilation

    compiled = [model.generate(**batch, **kwargs, cache_implementation="static") for batch in batches]
    assert hasattr(model, "_compiled_call")
    for eager_output, compiled_output in zip(eager, compiled):
        assert_similar_generations(eager_output, compiled_output)
    with torch.compiler.set_stance("fail_on_recompile"):
        model.generate(**batches[0], **{**kwargs, "max_new_tokens": 2}, cache_implementation="static")
    # The layouts last, so that a layout failure does not hide the behaviour above.
    max_cache_len = PROMPT + MAX_NEW_TOKENS - 1  # the last token generated is never fed back
    for compiled_output in compiled:
        assert compiled_output.cache.is_compileable and not isinstance(compiled_output.cache, DynamicCache)
        check_generate_outputs(compiled_output, model.config, BATCH, use_cache=True, max_cache_len=max_cache_len)
    assert isinstance(eager[0].cache, DynamicCache), type(eager[0].cache)  # transformers' default cache class


def assisted_kwargs(**overrides) -> dict:
    return {**dict(eos_token_id=-1, max_new_tokens=4, num_beams=1, do_sample=False, use_cache=True), **ALL_OUTPUTS,
            **overrides}


def check_assisted_outputs(output, config) -> None:
    """Assisted steps accept several tokens at once, so only the totals are fixed."""
    assert output.sequences.shape == (1, PROMPT + 4)
    assert len(output.scores) == len(output.logits) == 4
    assert all(step.shape == (1, config.vocab_size) for step in output.scores)
    check_cache_format(output.cache, 1, PROMPT + 4 - 1, config)


@pytest.mark.parametrize("assistant", ["random", "same"])
def test_assisted_decoding_matches_greedy(assistant):
    """Greedy generation with an assistant equals plain greedy generation: with itself as assistant every candidate
    is accepted, with a random model almost none is."""
    model = make_model()
    require_support(type(model), "assisted decoding")
    inputs = prompts(batch=1)
    greedy = model.generate(**inputs, **assisted_kwargs())
    assistant_model = make_model(seed=1) if assistant == "random" else model
    assistant_model.generation_config.num_assistant_tokens = 2
    assistant_model.generation_config.num_assistant_tokens_schedule = "constant"
    assisted = model.generate(**inputs, **assisted_kwargs(assistant_model=assistant_model))
    assert_similar_generations(greedy, assisted)
    for output in (greedy, assisted):
        check_assisted_outputs(output, model.config)


def test_prompt_lookup_decoding_matches_greedy():
    model = make_model()
    require_support(type(model), "assisted decoding")
    inputs = prompts(batch=1)
    inputs["input_ids"][0, 4:] = inputs["input_ids"][0, :3]  # a repeated n-gram, so that lookup proposes tokens
    greedy = model.generate(**inputs, **assisted_kwargs())
    lookup = model.generate(**inputs, **assisted_kwargs(prompt_lookup_num_tokens=2))
    assert_similar_generations(greedy, lookup)
    check_assisted_outputs(lookup, model.config)


def test_assisted_decoding_sample():
    model = make_model()
    require_support(type(model), "assisted decoding")
    model.generation_config.num_assistant_tokens = 2
    model.generation_config.num_assistant_tokens_schedule = "constant"
    torch.manual_seed(0)
    output = model.generate(**prompts(batch=1), **assisted_kwargs(do_sample=True, assistant_model=model))
    check_assisted_outputs(output, model.config)


def test_logits_to_keep():
    model = make_model()
    inputs = prompts()
    with_all_logits = model.generate(**inputs, max_new_tokens=10, do_sample=False, logits_to_keep=0)
    assert with_all_logits.tolist() == model.generate(**inputs, max_new_tokens=10, do_sample=False).tolist()
    with torch.no_grad():
        all_logits = model(**inputs, logits_to_keep=0).logits
        last = model(**inputs, logits_to_keep=1).logits
    vocab_size = GENERATION["vocab_size"]
    assert all_logits.shape == (BATCH, PROMPT, vocab_size) and last.shape == (BATCH, 1, vocab_size)
    torch.testing.assert_close(all_logits[:, -1:], last, rtol=1e-5, atol=1e-5)


def test_generation_api():
    """The causal LM derives from GenerationMixin itself, and `prepare_inputs_for_generation` forwards any kwarg."""
    assert GenerationMixin in ZayaForCausalLM.__bases__
    model = make_model()
    extra = {"output_attentions": True, "output_hidden_states": True, "custom_arg": "test_value", "numeric_arg": 42}
    model_inputs = model.prepare_inputs_for_generation(
        input_ids=torch.tensor([[1, 2, 3], [4, 5, 6]]), position_ids=torch.tensor([[0, 1, 2], [0, 1, 2]]), **extra
    )
    assert "input_ids" in model_inputs
    assert {key: model_inputs.get(key) for key in extra} == extra


def test_generate_with_and_without_position_ids():
    model = make_model()
    inputs = prompts()
    without = model.generate(**inputs, max_new_tokens=5, do_sample=False, use_cache=True)
    mask = inputs["attention_mask"]
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with_positions = model.generate(**inputs, position_ids=position_ids, max_new_tokens=5, do_sample=False)
    assert without.tolist() == with_positions.tolist()


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@torch.no_grad()
def test_padding_matches_padding_free(attn_implementation):
    """One packed row whose position ids restart at 0 for each sequence (as DataCollatorWithFlattening makes)
    gives the logits of the padded batch."""
    model = make_model(attn_implementation=attn_implementation)
    require_support(type(model), "packed sequences")
    gen = torch.Generator().manual_seed(3)
    lengths = [7, 3, 5]
    input_ids = torch.full((len(lengths), max(lengths)), GENERATION["pad_token_id"])
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):  # left padding
        input_ids[row, -length:] = torch.randint(3, GENERATION["vocab_size"], (length,), generator=gen)
        attention_mask[row, -length:] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0) * attention_mask
    padded = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    packed_ids = input_ids[attention_mask.bool()][None]
    packed_positions = torch.cat([torch.arange(length) for length in lengths])[None]
    packed = model(input_ids=packed_ids, position_ids=packed_positions, use_cache=False)
    torch.testing.assert_close(packed.logits[0], padded.logits[attention_mask.bool()], rtol=1e-5, atol=1e-5)

