"""The embedded default model's task, tokenizer, training recipe and evaluation.

* `task`: multi-step integer arithmetic with `<think>` working and `\\boxed{}` answers, held-out split by hash;
* `data`: the byte-level BPE tokenizer with a chat template, and solve / aggregation training examples;
* `recipe`: the model config and the Trainer run that produced `zaya_hf/default_model/`;
* `evaluation`: greedy accuracy, and single rollout against Markovian RSA (what `zaya-hf demo` prints).
"""

# Markovian RSA settings of `zaya-hf demo` and of `zaya-hf rsa` on the embedded model: its solutions are a few
# dozen tokens, so β and τ shrink from ZAYA1-8B's 16K / 4K while T and C keep the recommended values.
DEMO_RSA_SETTINGS = {"rounds": 2, "population": 16, "subset_size": 4, "rollout_tokens": 96, "tail_tokens": 48}
DEMO_PROBLEMS = 48
