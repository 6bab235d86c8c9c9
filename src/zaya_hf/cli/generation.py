"""`zaya-hf generate` and `zaya-hf chat`: plain generation with the chat template, streamed to the terminal."""

import argparse
import sys

import torch

from .common import CommandError, add_model_arguments, load_model, positive_int, sampling_from


def add_sampling_arguments(parser: argparse.ArgumentParser, temperature: float) -> None:
    parser.add_argument("--max-new-tokens", type=positive_int, default=256, help="budget per reply (default 256)")
    parser.add_argument(
        "--temperature", type=float, default=temperature, help=f"0 means greedy (default {temperature})"
    )
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0: off)")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")


def add_generate_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="complete a prompt",
        description="Complete one prompt (as a user message through the chat template unless --raw).",
    )
    parser.add_argument("prompt", help="the prompt text ('-' reads it from standard input)")
    add_model_arguments(parser)
    add_sampling_arguments(parser, temperature=0.0)
    parser.add_argument("--num-return-sequences", type=positive_int, default=1, help="samples to draw (default 1)")
    parser.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat template")
    parser.set_defaults(run=run_generate)


def add_chat_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "chat", help="talk with the model in the terminal",
        description="An interactive chat. Type a message and Enter; '/reset' starts over, '/exit' or Ctrl-D quits.",
    )
    add_model_arguments(parser)
    add_sampling_arguments(parser, temperature=1.0)
    parser.add_argument("--system", default=None, help="a system prompt")
    parser.set_defaults(run=run_chat)


def encode_prompt(tokenizer, messages: list[dict] | None, raw_text: str | None = None) -> list[int]:
    if raw_text is not None:
        return tokenizer(raw_text)["input_ids"]
    from ..generation_zaya import encode_chat

    if tokenizer.chat_template is None:
        raise CommandError("this tokenizer has no chat template: use --raw to feed the prompt as is.")
    return encode_chat(tokenizer, messages)


@torch.no_grad()
def reply(model, tokenizer, prompt_ids: list[int], args, num_return_sequences: int = 1, stream: bool = True) -> list[str]:
    """Sampled (or greedy) completions of `prompt_ids`, EOS removed, special tokens kept except padding/EOS."""
    from transformers import TextStreamer

    from ..generation_zaya import LocalGenerationEngine

    if args.seed is not None:
        torch.manual_seed(args.seed)
    sampling = sampling_from(args)
    input_ids = torch.tensor([prompt_ids], device=model.device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    try:
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=args.max_new_tokens,
            num_return_sequences=num_return_sequences,
            streamer=streamer,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            **LocalGenerationEngine.generation_kwargs(sampling),
        )
    except ValueError as error:  # inputs the model refuses, e.g. a prompt past max_position_embeddings
        raise CommandError(str(error)) from None
    return [tokenizer.decode(row, skip_special_tokens=True) for row in output[:, input_ids.shape[1]:]]


def run_generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    sampling_from(args)  # bad sampling arguments fail before the model loads
    model, tokenizer = load_model(args)
    messages = None if args.raw else [{"role": "user", "content": prompt}]
    prompt_ids = encode_prompt(tokenizer, messages, prompt if args.raw else None)
    if not prompt_ids:
        raise CommandError("the prompt is empty, and --raw adds nothing to it: give some text to complete.")
    stream = args.num_return_sequences == 1 and sys.stdout.isatty()
    texts = reply(model, tokenizer, prompt_ids, args, args.num_return_sequences, stream=stream)
    if not stream:
        for i, text in enumerate(texts):
            if len(texts) > 1:
                print(f"---- sample {i + 1} ----")
            print(text)
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from ..generation_zaya import split_reasoning

    sampling_from(args)
    model, tokenizer = load_model(args)
    history = [{"role": "system", "content": args.system}] if args.system else []
    start = len(history)
    interactive = sys.stdin.isatty()
    print("Chatting with the model: '/reset' starts over, '/exit' or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            return 0
        text = line.strip()
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            del history[start:]
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        print("model> ", end="", flush=True)
        answer = reply(model, tokenizer, encode_prompt(tokenizer, history), args, stream=interactive)[0]
        if not interactive:
            print(answer)
        # Like Qwen3 / ZAYA1 chat templates: earlier turns keep the answer, not the thinking.
        reasoning, final = split_reasoning(answer)
        history.append({"role": "assistant", "content": (final if final is not None else reasoning).strip()})
