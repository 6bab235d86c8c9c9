"""bf16 weights prepacked for oneDNN (zaya_hf.ops.prepacked): the same numbers as the plain model, and every use they
cannot serve refused by name."""

import copy

import pytest
import torch
from conftest import left_padded_batch, make_pair, tiny_config
from torch import nn

from zaya_hf.modeling_zaya import ZayaExperts
from zaya_hf.ops import prepack_for_cpu_inference
from zaya_hf.ops import prepacked
from zaya_hf.ops.cpu import NATIVE_BF16_MATMUL
from zaya_hf.ops.prepacked import PrepackedLinear, PrepackedWeightsError

needs_native_bf16 = pytest.mark.skipif(
    not NATIVE_BF16_MATMUL, reason="prepacking is offered only where the CPU has native bf16 kernels (AVX512-BF16, AMX)"
)


@pytest.fixture(scope="module")
def plain_and_prepacked():
    plain = make_pair(tiny_config(), seed=5, dtype=torch.bfloat16)[0]
    if not NATIVE_BF16_MATMUL:
        pytest.skip("prepacking is offered only where the CPU has native bf16 kernels (AVX512-BF16, AMX)")
    return plain, prepack_for_cpu_inference(copy.deepcopy(plain))


@needs_native_bf16
@torch.no_grad()
def test_prepacked_model_gives_the_plain_bf16_models_logits_and_tokens(plain_and_prepacked):
    plain, packed = plain_and_prepacked
    linears = [m for m in packed.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is PrepackedLinear and m.weight is None and m.prepacked_weight.is_mkldnn for m in linears)
    experts = [m for m in packed.modules() if isinstance(m, ZayaExperts)]
    assert all(m.gate_up_proj is None and m.down_proj is None for m in experts)
    assert packed.config._experts_implementation == "zaya_prepacked"
    ids, mask, _ = left_padded_batch()
    assert torch.equal(packed(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    for rows in (ids[:1, -4:], ids):  # one sequence (one token per expert call), and a padded batch
        attention = torch.ones_like(rows) if rows.shape[0] == 1 else mask
        assert torch.equal(packed.generate(rows, attention_mask=attention, **kwargs),
                           plain.generate(rows, attention_mask=attention, **kwargs))


@needs_native_bf16
def test_prepacked_model_refuses_saving_training_compiling_and_other_inputs(plain_and_prepacked, tmp_path):
    packed = plain_and_prepacked[1]
    with pytest.raises(PrepackedWeightsError, match="cannot be saved"):
        packed.state_dict()
    with pytest.raises(PrepackedWeightsError, match="cannot be saved"):
        packed.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert packed(torch.tensor([[5, 6]])).logits.shape == (1, 2, 101)  # outside no_grad: nothing requires grad
    head = packed.lm_head
    with pytest.raises(PrepackedWeightsError, match="trained"):
        head(torch.randn(1, 64, dtype=torch.bfloat16, requires_grad=True))
    with pytest.raises(PrepackedWeightsError, match="float32"):
        head(torch.randn(1, 64))
    with pytest.raises(Exception, match="compiled"):
        torch.compile(head, fullgraph=True)(torch.randn(1, 64, dtype=torch.bfloat16))


def test_prepack_refuses_what_it_cannot_help_and_changes_nothing(monkeypatch):
    fp32 = make_pair(tiny_config(), seed=5)[0]
    before = {name: tensor.clone() for name, tensor in fp32.state_dict().items()}
    monkeypatch.setattr(prepacked, "NATIVE_BF16_MATMUL", True)
    with pytest.raises(ValueError, match=r"takes bf16 weights on the CPU; model\.layers\.0\.\S+ is torch\.float32 on cpu"):
        prepack_for_cpu_inference(fp32)
    after = fp32.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[name], before[name]) for name in before)
    monkeypatch.setattr(prepacked, "NATIVE_BF16_MATMUL", False)
    with pytest.raises(ValueError, match="native bf16 kernels"):
        prepack_for_cpu_inference(fp32.to(torch.bfloat16))
    assert all(m.weight is not None for m in fp32.modules() if isinstance(m, nn.Linear))
