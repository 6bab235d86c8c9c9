"""Where a real-size bf16 decode step's time goes: one implementation loaded from the checkpoint that
`bench_real_size.py` wrote, one decode step per batch size under `torch.profiler`, the top operators by self time.

    python benchmarks/profile_real_size.py --checkpoint /tmp/zaya1-8b-random-L8 [--implementation zaya_hf|transformers]
"""

import argparse
import os
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--implementation", choices=["zaya_hf", "transformers"], default="zaya_hf")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 16])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--rows", type=int, default=12, help="operators shown per table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.implementation == "zaya_hf":
        from zaya_hf import ZayaForCausalLM
    else:
        from transformers.models.zaya.modeling_zaya import ZayaForCausalLM
    model = ZayaForCausalLM.from_pretrained(args.checkpoint, dtype=torch.bfloat16).eval()
    print(f"{args.implementation}, {args.checkpoint}, {args.threads} threads, load average {os.getloadavg()[0]:.2f}")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for batch in args.batch_sizes:
            prompt = torch.randint(1, model.config.vocab_size, (batch, args.prompt_tokens), generator=generator)
            out = model(prompt, use_cache=True, logits_to_keep=1)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            out = model(token, past_key_values=cache, use_cache=True)  # warm-up step
            token = out.logits[:, -1:].argmax(-1)
            with torch.profiler.profile() as profile:
                start = time.perf_counter()
                model(token, past_key_values=cache, use_cache=True)
                seconds = time.perf_counter() - start
            print(f"\nbatch {batch}: decode step {seconds:.3f} s (under the profiler), load average "
                  f"{os.getloadavg()[0]:.2f}")
            print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
