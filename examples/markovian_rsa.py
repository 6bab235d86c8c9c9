"""Markovian RSA on a question: with the embedded model, a local model folder, an OpenAI-compatible server, or
an offline demo.

    python examples/markovian_rsa.py                 # the embedded model on a held-out problem of its task (offline)
    python examples/markovian_rsa.py --model PATH [--question TEXT] [--reference ANSWER] [options]
    python examples/markovian_rsa.py --endpoint http://127.0.0.1:8000 --tokenizer PATH [--served-model NAME] ...
    python examples/markovian_rsa.py --demo          # a tiny random ZAYA built in process: shows the mechanics only

Defaults are the ZAYA1-8B recommended deployment (T=2, N=16, C=4, β=16K, τ=4K); the embedded model uses
`zaya-hf demo`'s settings (its solutions are a few dozen tokens), `--demo` shrinks them further.
The package downloads nothing: `--model` is a local folder (e.g. a snapshot of Zyphra/ZAYA1-8B).
"""

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import zaya_hf  # noqa: F401  (registers the ZAYA classes)
from zaya_hf.generation_zaya import MarkovianRSAConfig, run_markovian_rsa

DEFAULT_QUESTION = (
    "Find the number of ordered pairs of positive integers (a, b) with a + b = 10. "
    "Let's think step by step and output the final answer within \\boxed{}."
)


def demo_model_and_tokenizer():
    """A tiny random ZAYA over a toy word-level vocabulary: it writes noise, but runs every step of the method."""
    from zaya_hf import ZayaConfig, ZayaForCausalLM
    from zaya_hf.generation_zaya import AGGREGATION_HEADER, CLOSING_INSTRUCTION, REFINEMENT_HEADER
    from zaya_hf.testing import toy_chat_tokenizer

    words = [DEFAULT_QUESTION, AGGREGATION_HEADER, REFINEMENT_HEADER, CLOSING_INSTRUCTION,
             "[[ Problem ]]: Candidate solutions (may contain mistakes) ---- Solution", " ".join(map(str, range(20)))]
    tokenizer = toy_chat_tokenizer(words)
    torch.manual_seed(0)
    config = ZayaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, num_experts=4, moe_intermediate_size=32,
                        router_hidden_size=16, layer_types=["hybrid", "hybrid_sliding"], sliding_window=16,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return ZayaForCausalLM(config).eval(), tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="local model folder (weights, config, tokenizer); default: the embedded model")
    source.add_argument("--endpoint", help="base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000")
    source.add_argument("--demo", action="store_true", help="a tiny random model built in process (offline)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: --model; required with --endpoint)")
    parser.add_argument("--served-model", help="model name on the server (default: the first it lists)")
    parser.add_argument("--max-concurrency", type=int, default=16, help="requests in flight at once (--endpoint)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument("--reference", help="the correct answer: prints mean accuracy, majority and pass@N")
    parser.add_argument("--rounds", type=int, help="T")
    parser.add_argument("--population", type=int, help="N")
    parser.add_argument("--subset-size", type=int, help="C")
    parser.add_argument("--rollout-tokens", type=int, help="β")
    parser.add_argument("--tail-tokens", type=int, help="τ")
    parser.add_argument("--final-tokens", type=int)
    parser.add_argument("--final-population", type=int)
    parser.add_argument("--selection", default="majority", choices=["majority", "aggregate"])
    parser.add_argument("--tail-unit", default="tokens", choices=["tokens", "words"])
    parser.add_argument("--answer-tail", action="store_true", help="pass answers instead of reasoning tails")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for flag, folder in (("--model", args.model), ("--tokenizer", args.tokenizer)):
        if folder is not None and not Path(folder).is_dir():
            parser.error(f"{flag} {folder}: no such folder (this example loads local folders only)")

    if not (args.model or args.endpoint or args.demo):
        from zaya_hf import default_model_path
        from zaya_hf.tiny_reasoner import DEMO_RSA_SETTINGS
        from zaya_hf.tiny_reasoner.task import held_out_problems

        settings = DEMO_RSA_SETTINGS
        if args.question == DEFAULT_QUESTION:
            problem = held_out_problems(1)[0]
            args.question, args.reference = problem.question, args.reference or str(problem.answer)
        args.model, args.dtype = default_model_path(), "float32"
        print(f"the embedded model on {args.question!r}")
    else:
        settings = vars(MarkovianRSAConfig())  # ZAYA1-8B's recommended deployment
    for name in ("rounds", "population", "subset_size", "rollout_tokens", "tail_tokens"):
        if getattr(args, name) is None:
            setattr(args, name, settings[name])

    if args.demo:
        print("--demo: a tiny random ZAYA; its text is noise. Use --model or --endpoint for real answers.")
        model, tokenizer = demo_model_and_tokenizer()
        args.rounds, args.population, args.subset_size = min(args.rounds, 2), min(args.population, 4), 2
        args.rollout_tokens, args.tail_tokens = min(args.rollout_tokens, 24), min(args.tail_tokens, 8)
    elif args.model:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
        model = model.to(args.device).eval()
    else:
        if not args.tokenizer:
            parser.error("--endpoint needs --tokenizer (prompts are rendered and tokenized on this side)")
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)

    config = MarkovianRSAConfig(
        rounds=args.rounds, population=args.population, subset_size=args.subset_size,
        rollout_tokens=args.rollout_tokens, tail_tokens=args.tail_tokens, final_tokens=args.final_tokens,
        final_population=args.final_population, selection=args.selection, tail_unit=args.tail_unit,
        answer_tail=args.answer_tail, sampling={"temperature": args.temperature, "top_p": args.top_p},
        seed=args.seed,
    )
    print(f"T={config.rounds} N={config.population} C={config.subset_size} β={config.rollout_tokens} "
          f"τ={config.tail_tokens}: at most {config.max_generated_tokens:,} decode tokens")
    if args.endpoint:
        from zaya_hf.serving import OpenAICompletionsEngine

        engine = OpenAICompletionsEngine(
            args.endpoint, model=args.served_model, max_concurrency=args.max_concurrency, tokenizer=tokenizer
        )
        result = run_markovian_rsa(engine, args.question, tokenizer, config)
        print(f"server usage: {engine.usage}")
    else:
        with torch.no_grad():
            result = model.generate_markovian_rsa(args.question, tokenizer, **vars(config))

    for record in result.rounds:
        cache = f", peak cache {record.peak_cache_bytes / 2**20:.1f} MiB" if record.peak_cache_bytes else ""
        print(f"round {record.index}: {len(record.completions)} rollouts, prompts ≤ {max(record.prompt_lengths)} "
              f"tokens, {record.generated_tokens:,} generated{cache}")
    print(f"generated tokens: {result.generated_tokens:,}")
    print("final answers:", json.dumps(result.final_answers))
    print("answer:", result.answer)
    if args.reference is not None:
        print(f"mean accuracy {result.mean_accuracy(args.reference):.3f}, "
              f"majority correct {result.majority_correct(args.reference)}, pass@N {result.pass_at_n(args.reference)}")


if __name__ == "__main__":
    main()
