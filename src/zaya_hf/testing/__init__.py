"""Helpers for tests and offline demos: nothing here is needed to run a real model."""

from collections.abc import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

TOY_SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>", "<start_of_turn>")
TOY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>{{ message['role'] }}\n"
    "{{ message['content'] }}<eos>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def toy_chat_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (whitespace split) with a Gemma-like chat template, built in process.

    Ids: `<pad>`=0, `<bos>`=1, `<eos>`=2 (the end of a turn, so generation stops there), `<unk>`=3,
    `<start_of_turn>`, `<think>`, `</think>`, then the distinct whitespace-separated pieces of `words` in order of
    first appearance. Decoding joins tokens with single spaces, so decode(encode(text)) re-encodes to the same ids:
    tails cut by tokens round-trip exactly, which makes prompt-length bounds testable to the token.
    """
    vocab: dict[str, int] = {}
    for piece in (*TOY_SPECIAL_TOKENS, "<think>", "</think>", "user", "model", *" ".join(words).split()):
        vocab.setdefault(piece, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>"],
    )
    tokenizer.add_tokens(["<think>", "</think>"])  # ordinary tokens: decoding keeps them
    tokenizer.chat_template = TOY_CHAT_TEMPLATE
    return tokenizer


__all__ = ["toy_chat_tokenizer"]
