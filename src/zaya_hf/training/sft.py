"""Supervised fine-tuning of ZAYA with TRL's `SFTTrainer`: a chat template that marks the assistant's tokens, and
chat-formatted data from the tiny-reasoner task that ships with the package.

TRL computes an assistant-only loss from the `{% generation %}` blocks of the chat template. ZAYA1's Gemma-style
template (and the embedded model's, `zaya_hf.default_model_path()`) has none, and TRL cannot patch it, so
`ZAYA_TRAINING_CHAT_TEMPLATE` is the same template with the markers: it renders the same text, and the assistant's
content with its `<end_of_turn>` (the EOS, so that the model learns to stop) is what gets the loss.
"""

import itertools
import random

from ..generation_zaya import aggregation_messages
from ..tiny_reasoner.data import ExampleBuilder
from ..tiny_reasoner.task import iter_problems

ZAYA_TRAINING_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<start_of_turn>model\n' }}{% generation %}{{ message['content'] + '<end_of_turn>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] + '<end_of_turn>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def tiny_reasoner_chats(num_examples: int, seed: int, aggregation_fraction: float = 0.5, tokenizer=None) -> list[dict]:
    """`{"messages": [user, assistant]}` rows of the tiny-reasoner task: solve an arithmetic problem, or (a fraction
    `aggregation_fraction`, which needs `tokenizer` to cut the candidates' tails) aggregate candidate solutions as
    in Markovian RSA. Conversational rows, the format TRL's `SFTTrainer` takes with `assistant_only_loss=True`."""
    if aggregation_fraction and tokenizer is None:
        raise ValueError("Aggregation examples cut their candidates by tokens: pass the tokenizer.")
    rng = random.Random(seed)
    builder = ExampleBuilder(tokenizer) if aggregation_fraction else None
    rows = []
    for problem in itertools.islice(iter_problems(seed, "train"), num_examples):
        if builder is not None and rng.random() < aggregation_fraction:
            messages = aggregation_messages(None, problem.question, builder.candidate_tails(problem, rng))
        else:
            messages = [{"role": "user", "content": problem.question}]
        rows.append({"messages": [*messages, {"role": "assistant", "content": problem.solution()}]})
    return rows


__all__ = ["ZAYA_TRAINING_CHAT_TEMPLATE", "tiny_reasoner_chats"]
