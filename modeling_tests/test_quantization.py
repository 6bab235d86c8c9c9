"""Quantized ZAYA: the formats (against compressed-tensors' and torch's own packing), quantize -> save -> load,
the streaming CLI conversion, logits against bf16, compiled static-cache decode, and every bad input."""

import json
import shutil

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from safetensors.torch import load_file, save_file
from transformers import CompileConfig

import zaya_hf
from zaya_hf import ZayaForCausalLM
from zaya_hf.cli.main import main as cli
from zaya_hf.generation_zaya import encode_chat, question_messages
from zaya_hf.quantization import QuantizationFormatError, QuantizedEmbedding, QuantizedExperts, QuantizedLinear
from zaya_hf.quantization import TiedQuantizedHead, ZayaQuantizationConfig, formats
from zaya_hf.quantization.convert import quantize_checkpoint, weight_footprint
from zaya_hf.quantization.formats import QuantSpec
from zaya_hf.tiny_reasoner.task import held_out_problems

from conftest import randomize, tiny_config

INT8 = dict(bits=8, group_size=None)
INT4 = dict(bits=4, group_size=32)
# Mean per-token KL(bf16 || quantized) of the embedded model over its own greedy working of four held-out questions
# (`prompts`, 96 scored tokens): measured 0.00045 (int8) and 0.0036 (int4, group 32; median 9e-8, the largest 0.23,
# where the working's next digit is a near-tie). The bounds leave 2-3x room.
KL_BOUND = {8: 0.001, 4: 0.01}
WORKING_TOKENS = 24


@pytest.fixture(scope="module")
def embedded():
    return zaya_hf.default_model_path()


@pytest.fixture(scope="module")
def prompts(embedded):
    """Four held-out questions of the model's task, chat-encoded and left-padded, each followed by 24 tokens of the bf16
    model's greedy working: the predictions a quantized model must keep are those of its own task."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded)
    chats = [{"input_ids": encode_chat(tokenizer, question_messages(p.question))} for p in held_out_problems(4)]
    questions = tokenizer.pad(chats, return_tensors="pt")
    model = load(embedded)
    with torch.no_grad():
        ids = model.generate(**questions, max_new_tokens=WORKING_TOKENS, do_sample=False)
    working = ids[:, questions["input_ids"].shape[1]:]
    eos = torch.tensor(model.generation_config.eos_token_id)
    assert working.shape[1] == WORKING_TOKENS and not torch.isin(working, eos).any()  # no working ended (no padding)
    attention_mask = torch.cat([questions["attention_mask"], torch.ones(len(ids), WORKING_TOKENS, dtype=torch.long)], 1)
    return {"input_ids": ids, "attention_mask": attention_mask}


def load(path, **quantization) -> ZayaForCausalLM:
    config = ZayaQuantizationConfig(**quantization) if quantization else None
    return ZayaForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.bfloat16).eval()


def mapped_files(folder) -> set[str]:
    """Files under `folder` this process has memory-mapped (Linux)."""
    with open("/proc/self/maps") as maps:
        return {line.split()[-1] for line in maps if str(folder) in line}


def held_weight_bytes(model: ZayaForCausalLM) -> int:
    """Bytes of the tensors the model holds (each once), less the quantized weights' int64 shapes."""
    persistent = model.state_dict().keys()
    tensors = {t.data_ptr(): t for name, t in [*model.named_parameters(), *model.named_buffers()]
               if name in persistent and not name.endswith("_shape")}
    return sum(t.nbytes for t in tensors.values())


@pytest.mark.parametrize("spec", [QuantSpec(8, None), QuantSpec(4, 32), QuantSpec(4, 128)])
def test_checkpoint_layout_is_compressed_tensors_pack_quantized_and_kernel_layout_is_torchs(spec):
    weight = torch.randn(2, 64, 256, dtype=torch.bfloat16)
    q, scale = formats.quantize(weight, spec, torch.bfloat16)
    assert q.abs().max() <= formats.QMAX[spec.bits] and scale.shape == (2, 64, spec.groups(256))
    packed = formats.pack_int32(q, spec.bits)
    for expert in range(2):  # compressed-tensors' own packing and unpacking of the same integers
        assert torch.equal(pack_to_int32(q[expert], spec.bits), packed[expert])
        assert torch.equal(unpack_from_int32(packed[expert], spec.bits, q[expert].shape), q[expert])
    kernel_q, kernel_scale = formats.to_kernel_layout(q, scale, spec)
    if spec.bits == 4:
        torch_packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q[0].int() + 8, 1)
        assert torch.equal(kernel_q[0], torch_packed)
    back_q, back_scale = formats.from_kernel_layout(kernel_q, kernel_scale, spec, 64)
    assert torch.equal(back_q, q) and torch.equal(back_scale, scale)
    # The kernel computes x @ (q * scale).T, up to bf16 rounding of its output.
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    expected = x.float() @ formats.dequantize(q[1], scale[1], torch.float32).T
    torch.testing.assert_close(formats.kernel_linear(x, kernel_q[1], kernel_scale[1], spec, 64).float(), expected,
                               atol=0.05 * expected.abs().max().item(), rtol=0.02)


@pytest.mark.parametrize("quantization", [INT8, INT4], ids=["int8", "int4"])
def test_quantize_save_load_is_bit_identical_and_logits_stay_close_to_bf16(embedded, prompts, tmp_path, quantization):
    reference, model = load(embedded), load(embedded, **quantization)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, QuantizedExperts) and isinstance(model.lm_head, QuantizedLinear)
    assert weight_footprint(model.config, ZayaQuantizationConfig(**quantization))["memory_bytes"] == held_weight_bytes(model)
    assert type(model.model.layers[0].mlp.gate.down_proj) is not QuantizedLinear  # routers stay bf16 by default
    with torch.no_grad():
        expected = reference(**prompts).logits.float().log_softmax(-1)
        logits = model(**prompts).logits
    working = slice(-WORKING_TOKENS - 1, -1)  # the positions that predict the working
    kl = torch.nn.functional.kl_div(logits[:, working].float().log_softmax(-1), expected[:, working], log_target=True,
                                    reduction="none")
    assert kl.sum(-1).mean() < KL_BOUND[quantization["bits"]]

    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["quantization_config"]["bits"] == quantization["bits"] and saved["tie_word_embeddings"] is False
    reloaded = ZayaForCausalLM.from_pretrained(tmp_path).eval()
    assert not mapped_files(tmp_path)  # nothing of the model is a view of the checkpoint's memory map
    stored = load_file(tmp_path / "model.safetensors")
    assert stored["model.layers.0.mlp.experts.gate_up_proj"].dtype == torch.int32
    original, loaded = model.state_dict(), reloaded.state_dict()
    assert original.keys() == loaded.keys() and all(torch.equal(original[k], loaded[k]) for k in original)
    assert all(torch.equal(stored[k], original[k]) for k in stored)  # the file holds exactly the state dict
    with torch.no_grad():
        assert torch.equal(reloaded(**prompts).logits, logits)


@pytest.mark.parametrize("quantization", [INT8, INT4], ids=["int8", "int4"])
def test_a_quantized_embedding_is_the_tied_heads_table_held_once(embedded, prompts, tmp_path, quantization):
    model = load(embedded, quantize_embedding=True, **quantization)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embedding, QuantizedEmbedding) and isinstance(head, TiedQuantizedHead)
    assert head.embedding is embedding and model.config.tie_word_embeddings
    ids = prompts["input_ids"]  # lookups unpack the rows of the kernel layout: the dequantized table's rows
    assert torch.equal(embedding(ids), embedding.dequantized("weight")[ids])
    with torch.no_grad():
        hidden = torch.randn(3, embedding.embedding_dim, dtype=torch.bfloat16)
        expected = hidden.float() @ embedding.dequantized("weight", torch.float32).T
        torch.testing.assert_close(head(hidden).float(), expected, atol=0.02 * expected.abs().max().item(), rtol=0.02)
        logits = model(**prompts).logits
    qconfig = ZayaQuantizationConfig(quantize_embedding=True, **quantization)
    assert weight_footprint(model.config, qconfig)["memory_bytes"] == held_weight_bytes(model)

    model.save_pretrained(tmp_path)  # tied, as the bf16 checkpoint: the table is stored once, quantized
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is True
    reloaded = ZayaForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.get_output_embeddings().embedding is reloaded.get_input_embeddings() and not mapped_files(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert stored["model.embed_tokens.weight"].dtype == torch.int32 and not any(k.startswith("lm_head") for k in stored)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in reloaded.state_dict().items())
    with torch.no_grad():
        assert torch.equal(reloaded(**prompts).logits, logits)
    converted = tmp_path / "converted"  # the streaming CLI conversion writes the same tensors
    quantize_checkpoint(embedded, converted, qconfig)
    assert load_file(converted / "model.safetensors").keys() == stored.keys()


def test_streaming_cli_conversion_equals_quantizing_on_load(embedded, prompts, tmp_path, capsys):
    output = tmp_path / "int4"
    assert cli(["quantize", embedded, str(output), "--bits", "4", "--group-size", "32"]) == 0
    assert "tensors quantized" in capsys.readouterr().out
    assert (output / "tokenizer.json").is_file()
    converted, on_load = ZayaForCausalLM.from_pretrained(output).eval(), load(embedded, **INT4)
    assert converted.state_dict().keys() == on_load.state_dict().keys()
    assert all(torch.equal(v, on_load.state_dict()[k]) for k, v in converted.state_dict().items())
    with torch.no_grad():
        assert torch.equal(converted(**prompts).logits, on_load(**prompts).logits)
    assert cli(["info", "--model", str(output)]) == 0
    info = capsys.readouterr().out
    assert "int4 group 32: " in info and "weights:" in info


def test_kernels_match_the_dequantized_products_autograd_runs(embedded):
    model = load(embedded, **INT4)
    experts, linear = model.model.layers[1].mlp.experts, model.model.layers[1].self_attn.o_proj
    hidden = torch.randn(7, experts.gate_up_proj_shape[-1].item(), dtype=torch.bfloat16)
    index = torch.tensor([[0], [3], [0], [2], [1], [3], [0]])
    weights = torch.rand(7, 1, dtype=torch.bfloat16)
    with torch.no_grad():
        fast = experts(hidden, index, weights)
        single = torch.cat([experts(hidden[i : i + 1], index[i : i + 1], weights[i : i + 1]) for i in range(7)])
    exact = experts.dequantized_forward(hidden, index[:, 0], weights)
    torch.testing.assert_close(fast, exact, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(single, fast, atol=1e-2, rtol=1e-2)
    x = torch.randn(5, linear.in_features, dtype=torch.bfloat16, requires_grad=True)
    with torch.no_grad():
        fast = linear(x)
    slow = linear(x)  # autograd records x: the dequantized weight is multiplied, gradients reach x
    slow.sum().backward()
    torch.testing.assert_close(fast, slow.detach(), atol=2e-2, rtol=2e-2)
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_compiled_static_cache_decode_runs_quantized_and_matches_eager(tmp_path, fresh_dynamo):
    # Two layers (compile time grows with the layers); every output dimension a multiple of the int4 row block.
    config = tiny_config(num_hidden_layers=2, layer_types=["hybrid", "hybrid_sliding"], head_dim=32, vocab_size=128)
    randomize(ZayaForCausalLM(config)).save_pretrained(tmp_path)
    model = load(tmp_path, **INT4)
    ids = torch.tensor([[5, 17, 99, 3, 42, 8]])
    eager = model.generate(ids, max_new_tokens=8, do_sample=False)
    compiled = model.generate(ids, max_new_tokens=8, do_sample=False, cache_implementation="static",
                              compile_config=CompileConfig(fullgraph=True, dynamic=False))
    assert torch.equal(eager, compiled)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bits=3), "bits=3 is not supported"),
        (dict(bits=4, group_size=48), "group_size=48 with bits=4"),
        (dict(bits=8, group_size=64), "bits=8 quantizes per output channel"),
        (dict(bits=4, group_size=64, zero_point=True), "unknown argument"),
    ],
)
def test_unsupported_settings_raise(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        ZayaQuantizationConfig(**kwargs)


def test_shapes_the_format_cannot_hold_raise_naming_the_tensor_before_anything_is_written(embedded, tmp_path):
    # hidden 96: group 64 does not divide the attention's input features.
    path = tmp_path / "tiny"
    ZayaForCausalLM(tiny_config(hidden_size=96)).save_pretrained(path)
    with pytest.raises(QuantizationFormatError, match=r"model\.layers\.0\.self_attn\.qkv_proj\.q_proj\.weight: 96"):
        load(path, bits=4, group_size=64)
    with pytest.raises(QuantizationFormatError, match="not divisible by group_size=64"):
        quantize_checkpoint(path, tmp_path / "out", ZayaQuantizationConfig(bits=4, group_size=64))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no output, no partial folder
    # The router's 5-class output layer is fewer rows than the int4 kernel's block: padded in the kernel layout only.
    routers_too = load(embedded, bits=4, group_size=32, modules_to_not_convert=[])
    out_proj = routers_too.model.layers[0].mlp.gate.router_mlp.out_proj
    assert out_proj.rows["weight"] == 5 and out_proj.weight.shape[0] == formats.int4_padded_rows(5)
    assert out_proj(torch.randn(1, out_proj.weight_shape[-1].item(), dtype=torch.bfloat16)).shape == (1, 5)


def test_a_quantized_checkpoint_that_disagrees_with_its_config_raises_naming_the_tensor(embedded, tmp_path):
    path = tmp_path / "int4"
    quantize_checkpoint(embedded, path, ZayaQuantizationConfig(**INT4))
    config = json.loads((path / "config.json").read_text())
    wrong = tmp_path / "wrong_group"
    shutil.copytree(path, wrong)
    (wrong / "config.json").write_text(json.dumps({**config, "quantization_config": {
        **config["quantization_config"], "group_size": 64}}))
    with pytest.raises(ValueError, match=r"mlp\.experts\.(gate_up|down)_proj_scale|_scale"):
        ZayaForCausalLM.from_pretrained(wrong)
    wrong_bits = tmp_path / "wrong_bits"
    shutil.copytree(path, wrong_bits)
    (wrong_bits / "config.json").write_text(json.dumps({**config, "quantization_config": {
        **config["quantization_config"], "bits": 8, "group_size": None}}))
    with pytest.raises(ValueError, match=r"\.weight|gate_up_proj|down_proj"):
        ZayaForCausalLM.from_pretrained(wrong_bits)
    # Integers stored as floats (a checkpoint written by something else) are refused by name too.
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.2.self_attn.o_proj.weight"] = tensors["model.layers.2.self_attn.o_proj.weight"].float()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.2\.self_attn\.o_proj\.weight"):
        ZayaForCausalLM.from_pretrained(path)


def test_cli_quantize_refuses_an_existing_output_and_a_source_missing_tensors(embedded, tmp_path, capsys):
    existing = tmp_path / "exists"
    existing.mkdir()
    assert cli(["quantize", embedded, str(existing), "--bits", "8"]) == 2
    assert "exists" in capsys.readouterr().err
    partial = tmp_path / "partial"
    shutil.copytree(embedded, partial)
    tensors = load_file(partial / "model.safetensors")
    del tensors["model.layers.3.mlp.experts.down_proj"]
    save_file(tensors, partial / "model.safetensors", metadata={"format": "pt"})
    assert cli(["quantize", str(partial), str(tmp_path / "out"), "--bits", "8"]) == 2
    assert "model.layers.3.mlp.experts.down_proj" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "partial"]
    assert cli(["quantize", embedded, str(tmp_path / "x"), "--bits", "8", "--group-size", "64"]) == 2
    assert "bits=8 quantizes per output channel" in capsys.readouterr().err
