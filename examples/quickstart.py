"""Quick start, offline: build a small random ZAYA, save it, reload it through the Auto classes, generate with a
fanned-out shared prefix, and check it against transformers' own ZAYA implementation on the same weights.

    python examples/quickstart.py [--out DIR]
"""

import argparse
import tempfile

import torch
from transformers import AutoModelForCausalLM
from transformers.models.zaya.modeling_zaya import ZayaForCausalLM as TransformersZaya

import zaya_hf
from zaya_hf import ZayaCache, ZayaConfig, ZayaForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder to save the model in (default: a temporary folder)")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="zaya-quickstart-")

    torch.manual_seed(0)
    config = ZayaConfig(
        vocab_size=512, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, num_experts=8, moe_intermediate_size=128, router_hidden_size=32,
        layer_types=["hybrid", "hybrid_sliding"] * 2, sliding_window=16, eos_token_id=2,
    )
    ZayaForCausalLM(config).save_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    print(f"loaded {type(model).__module__}.{type(model).__name__} from {out}")

    prompt = torch.randint(3, config.vocab_size, (1, 12))
    with torch.no_grad():
        greedy = model.generate(prompt, max_new_tokens=16, do_sample=False)
        print("greedy tokens:", greedy[0, 12:].tolist())

        # Shared-prefix fan-out: prefill once, then continue 4 samples from the same cache.
        cache = ZayaCache(config)
        model(prompt[:, :-1], cache=cache, use_cache=True)
        cache.batch_repeat_interleave(4)
        torch.manual_seed(1)
        samples = model.generate(prompt.repeat(4, 1), cache=cache, max_new_tokens=8, do_sample=True)
        for row in samples[:, 12:].tolist():
            print("sample:", row)

        reference = TransformersZaya.from_pretrained(out).eval()
        diff = (model(prompt).logits - reference(prompt).logits).abs().max().item()
        print(f"max |logits - transformers' ZAYA logits| = {diff:.2e}")
        same = torch.equal(greedy, reference.generate(prompt, max_new_tokens=16, do_sample=False))
        print("greedy tokens identical to transformers' ZAYA:", same)


if __name__ == "__main__":
    main()
