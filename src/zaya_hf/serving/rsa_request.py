"""What a Markovian RSA chat request asks for: Zyphra's proxy fields and semantics, plus this server's own.

Zyphra's proxy (`examples/markovian_rsa/rsa_proxy_server.py` in Zyphra's vLLM fork) runs Markovian RSA for a
`/v1/chat/completions` body that carries any of its fields, under these names (and its aliases), with these
defaults, which this server keeps so that existing clients only change the base URL:

| field | default | meaning here |
|---|---|---|
| `rsa_t` | 8 | T, aggregation rounds after round 0 (0: a plain request, as Zyphra's proxy answers it) |
| `rsa_n` | the body's `n`, else 32 | N, the population |
| `rsa_k` | 4 | C, candidates each aggregation prompt reads |
| `short_resp_len` | 32768 | β, the token budget of rounds 0..T-1 |
| `rsa_tail_window`, `tail_window_len` | true, 4096 | τ, the tail carried to the next round, in whitespace words |
| `max_tokens` / `max_completion_tokens` | 61440 | the final round's budget |
| `rsa_final_n` | 1 | final aggregations (<= 0: N; at most N), returned as the choices |
| `final_temperature`, `final_top_p`, `final_top_k` | 0.6, 0.95, 40 | the final round's sampling (null: the rollouts') |
| `use_pacore` | false | pass answers instead of reasoning tails where a candidate has one |
| `return_rsa_metadata`, `return_aggregation_prompt` | true, false | what the response adds |
| `rsa_max_concurrency` | 0 | this request's own cap on upstream calls (0: only the server's) |
| `rsa_debug` | false | log each round |

Zyphra's summarising variant (`rsa_summarize`, `summary_prompt`) is not implemented and refused with a 400.
This server adds `rsa_selection` ("aggregate": Zyphra's, the final aggregations are the answer; "majority": a final
population of `rsa_final_n` (default N) whose majority answer is returned), `rsa_token_budget` (the most decode
tokens the request may spend, checked against its worst case before anything runs) and `rsa_return_completions`
(every round's texts in the metadata).
"""

from dataclasses import dataclass, field

from ..generation_zaya import MarkovianRSAConfig, question_messages, question_text

ZYPHRA_DEFAULTS = {"rsa_t": 8, "rsa_n": 32, "rsa_k": 4, "short_resp_len": 32768, "tail_window_len": 4096,
                   "max_tokens": 61440, "rsa_final_n": 1}
FINAL_SAMPLING_DEFAULTS = {"final_temperature": 0.6, "final_top_p": 0.95, "final_top_k": 40}
# Zyphra's field names and the aliases its proxy accepts for them.
ZYPHRA_ALIASES = {
    "rsa_t": ("rsa_t",),
    "rsa_k": ("rsa_k",),
    "rsa_n": ("rsa_n",),
    "rsa_summarize": ("rsa_summarize", "summarize"),
    "rsa_tail_window": ("rsa_tail_window", "rsa_use_tail_window"),
    "tail_window_len": ("tail_window_len", "rsa_tail_window_len"),
    "short_resp_len": ("short_resp_len", "rsa_short_resp_len"),
    "use_pacore": ("use_pacore", "rsa_use_pacore"),
    "rsa_final_n": ("rsa_final_n", "final_aggregation_prompts"),
    "final_temperature": ("final_temperature", "rsa_final_temperature"),
    "final_top_p": ("final_top_p", "rsa_final_top_p"),
    "final_top_k": ("final_top_k", "rsa_final_top_k"),
    "summary_prompt": ("summary_prompt", "rsa_summary_prompt"),
    "return_aggregation_prompt": ("return_aggregation_prompt", "rsa_return_aggregation_prompt"),
    "return_rsa_metadata": ("return_rsa_metadata", "rsa_return_metadata"),
    "rsa_max_concurrency": ("rsa_max_concurrency",),
    "rsa_debug": ("rsa_debug",),
}
OWN_FIELDS = ("rsa_selection", "rsa_token_budget", "rsa_return_completions")
RSA_FIELD_NAMES = frozenset(name for aliases in ZYPHRA_ALIASES.values() for name in aliases) | frozenset(OWN_FIELDS)
# The chat-completions fields an RSA request may carry besides the RSA ones (each one is used).
CHAT_FIELDS = frozenset({"model", "messages", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed",
                         "max_tokens", "max_completion_tokens", "n", "stream", "stream_options", "user"})
SELECTIONS = ("aggregate", "majority")


class RequestError(Exception):
    """A request this server refuses, answered as OpenAI does: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 error_type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.error_type = message, param, status, error_type

    def payload(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": None}}


@dataclass
class RSARequest:
    """A parsed Markovian RSA request: the algorithm's config and what the response should hold."""

    config: MarkovianRSAConfig
    messages: list[dict]
    selection: str
    stream: bool = False
    include_usage: bool = False
    max_concurrency: int | None = None
    return_metadata: bool = True
    return_aggregation_prompt: bool = False
    return_completions: bool = False
    debug: bool = False
    zyphra: dict = field(default_factory=dict)  # Zyphra's fields as resolved, echoed in rsa_metadata


def is_rsa_request(body: dict) -> bool:
    """Zyphra's rule: a body with any RSA field runs the method; any other passes through."""
    return any(name in body for name in RSA_FIELD_NAMES)


def strip_rsa_fields(body: dict) -> dict:
    """The body without its RSA fields (what an `rsa_t: 0` request forwards, as Zyphra's proxy does)."""
    return {key: value for key, value in body.items() if key not in RSA_FIELD_NAMES}


def parse_rsa_request(body: dict, max_request_tokens: int | None = None) -> RSARequest | None:
    """The RSA request in `body`, or None when `rsa_t` is 0 (a plain request). Raises `RequestError` naming the
    field for anything invalid, unsupported or over the token budget."""
    fields = _Fields(body)
    unknown = sorted(set(body) - CHAT_FIELDS - RSA_FIELD_NAMES)
    if unknown:
        raise RequestError(f"{unknown[0]!r} is not supported in Markovian RSA requests (supported besides the RSA "
                           f"fields: {', '.join(sorted(CHAT_FIELDS))}).", param=unknown[0])
    for name in ("rsa_summarize", "summary_prompt"):
        if fields.flag(name, False) if name == "rsa_summarize" else fields.present(name):
            raise RequestError(f"{fields.name(name)}: summarised candidates are not supported by this server; "
                               "candidates are passed as tail windows (rsa_tail_window).", param=fields.name(name))
    rounds = fields.integer("rsa_t", ZYPHRA_DEFAULTS["rsa_t"], minimum=0)
    if rounds == 0:
        return None
    population = fields.integer("rsa_n", fields.integer("n", ZYPHRA_DEFAULTS["rsa_n"], minimum=1), minimum=1)
    subset_size = fields.integer("rsa_k", ZYPHRA_DEFAULTS["rsa_k"], minimum=1)
    if subset_size > population:
        raise RequestError(f"rsa_k ({subset_size}) cannot exceed rsa_n ({population}): each aggregation prompt reads "
                           "rsa_k distinct candidates of the previous round.", param="rsa_k")
    rollout_tokens = fields.integer("short_resp_len", ZYPHRA_DEFAULTS["short_resp_len"], minimum=1)
    tail_window = fields.flag("rsa_tail_window", True)
    # Without a tail window the whole reasoning is passed: a rollout of at most β tokens has at most β words.
    tail_words = fields.integer("tail_window_len", ZYPHRA_DEFAULTS["tail_window_len"], minimum=1)
    selection = fields.choice("rsa_selection", "aggregate", SELECTIONS)
    final_n = fields.integer("rsa_final_n", ZYPHRA_DEFAULTS["rsa_final_n"] if selection == "aggregate" else 0)
    final_n = population if final_n <= 0 else min(final_n, population)
    final_tokens = fields.integer("max_completion_tokens", fields.integer("max_tokens", ZYPHRA_DEFAULTS["max_tokens"],
                                                                          minimum=1), minimum=1)
    temperature, top_p = fields.number("temperature", 1.0, minimum=0.0), fields.number("top_p", 1.0, minimum=0.0)
    top_k, min_p = fields.integer("top_k", None), fields.number("min_p", None, minimum=0.0)
    repetition_penalty = fields.number("repetition_penalty", None, minimum=0.0)
    sampling = _sampling(temperature, top_p, top_k, min_p, repetition_penalty)
    # The final round: Zyphra's final sampling for aggregations; a majority vote samples like the rollouts unless
    # told otherwise. A null final_* field means "as the rollouts".
    final_defaults = FINAL_SAMPLING_DEFAULTS if selection == "aggregate" else {}
    final = {name: fields.number(name, final_defaults.get(name), minimum=0.0) for name in ("final_temperature",
                                                                                       "final_top_p")}
    final_top_k = fields.integer("final_top_k", final_defaults.get("final_top_k"))
    final_sampling = _sampling(
        temperature if final["final_temperature"] is None else final["final_temperature"],
        top_p if final["final_top_p"] is None else final["final_top_p"],
        top_k if final_top_k is None else final_top_k, min_p, repetition_penalty,
    )
    seed = fields.integer("seed", None)
    use_pacore = fields.flag("use_pacore", False)
    try:
        config = MarkovianRSAConfig(
            rounds=rounds, population=population, subset_size=subset_size, rollout_tokens=rollout_tokens,
            tail_tokens=tail_words if tail_window else rollout_tokens, tail_unit="words", answer_tail=use_pacore,
            final_tokens=final_tokens, final_population=final_n,
            selection="aggregate" if selection == "aggregate" and final_n == 1 else "majority",
            sampling=sampling, final_sampling=final_sampling, seed=seed,
        )
    except ValueError as error:
        raise RequestError(str(error)) from None

    budget = fields.integer("rsa_token_budget", None, minimum=1)
    limits = [limit for limit in (budget, max_request_tokens) if limit is not None]
    if limits and config.max_generated_tokens > min(limits):
        source = "rsa_token_budget" if budget is not None and budget == min(limits) else "the server's budget"
        raise RequestError(
            f"this request may generate up to {config.max_generated_tokens:,} decode tokens (rsa_n × rsa_t × "
            f"short_resp_len + rsa_final_n × max_tokens), over {source} of {min(limits):,}: lower rsa_t, rsa_n, "
            "short_resp_len or max_tokens.", param="rsa_token_budget" if budget is not None else "max_tokens",
        )
    messages = _messages(body.get("messages"))
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise RequestError("stream_options must be an object.", param="stream_options")
    per_request_cap = fields.integer("rsa_max_concurrency", 0, minimum=0)
    return RSARequest(
        config=config, messages=messages, selection=selection, stream=fields.flag("stream", False),
        include_usage=bool(stream_options.get("include_usage")), max_concurrency=per_request_cap or None,
        return_metadata=fields.flag("return_rsa_metadata", True),
        return_aggregation_prompt=fields.flag("return_aggregation_prompt", False),
        return_completions=fields.flag("rsa_return_completions", False), debug=fields.flag("rsa_debug", False),
        zyphra={"rsa_iterations": rounds, "rsa_k": subset_size, "rsa_n": population, "rsa_summarize": False,
                "rsa_tail_window": tail_window, "tail_window_len": tail_words, "short_resp_len": rollout_tokens,
                "use_pacore": use_pacore, "rsa_final_n": final_n, "max_tokens": final_tokens,
                "rsa_max_concurrency": per_request_cap, "rsa_debug": fields.flag("rsa_debug", False)},
    )


def _sampling(temperature, top_p, top_k, min_p, repetition_penalty) -> dict:
    """A Markovian RSA sampling dict: temperature 0 is greedy, as in OpenAI's API."""
    sampling = {"do_sample": False} if temperature == 0 else {"temperature": temperature, "top_p": top_p}
    if temperature != 0:
        sampling.update({k: v for k, v in (("top_k", top_k), ("min_p", min_p)) if v is not None})
    if repetition_penalty is not None:
        sampling["repetition_penalty"] = repetition_penalty
    return sampling


def _messages(messages) -> list[dict]:
    """The chat as given (round 0 samples all of it), with text-part contents joined into strings; aggregation
    prompts quote its first user message."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of chat messages.", param="messages")
    chat = []
    for message in messages:
        if not isinstance(message, dict) or "role" not in message:
            raise RequestError("every message needs a role and a content.", param="messages")
        content = message.get("content")
        if isinstance(content, list):  # OpenAI content parts: only text ones can be aggregated
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise RequestError("only text content parts are supported.", param="messages")
            content = "\n".join(str(p.get("text", "")) for p in content)
        chat.append({**message, "content": content})
    try:
        question_text(question_messages(chat))
    except (ValueError, StopIteration) as error:
        raise RequestError(f"messages: {error}", param="messages") from None
    return chat


class _Fields:
    """Typed reads of a request body by canonical name, any of Zyphra's aliases accepted; errors name the field."""

    def __init__(self, body: dict):
        self.body = body

    def name(self, key: str) -> str:
        return next((alias for alias in ZYPHRA_ALIASES.get(key, (key,)) if alias in self.body), key)

    def present(self, key: str) -> bool:
        return self.name(key) in self.body

    def value(self, key: str):
        return self.body.get(self.name(key))

    def integer(self, key: str, default, minimum: int | None = None):
        value = self.value(key)
        if value is None:
            return default
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise RequestError(f"{self.name(key)} must be an integer, got {value!r}.", param=self.name(key))
        if minimum is not None and value < minimum:
            raise RequestError(f"{self.name(key)} must be >= {minimum}, got {value}.", param=self.name(key))
        return value

    def number(self, key: str, default, minimum: float | None = None):
        value = self.value(key)
        if value is None:
            return default
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise RequestError(f"{self.name(key)} must be a number, got {value!r}.", param=self.name(key))
        if minimum is not None and value < minimum:
            raise RequestError(f"{self.name(key)} must be >= {minimum}, got {value}.", param=self.name(key))
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        """A boolean, also as the strings Zyphra's proxy accepts ("true", "1", "yes", "on", ...)."""
        value = self.value(key)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in {"1", "true", "yes", "y", "on"}:
            return True
        if text in {"0", "false", "no", "n", "off"}:
            return False
        raise RequestError(f"{self.name(key)} must be a boolean, got {value!r}.", param=self.name(key))

    def choice(self, key: str, default: str, choices) -> str:
        value = self.value(key)
        if value is None:
            return default
        if value not in choices:
            raise RequestError(f"{self.name(key)} must be one of {', '.join(choices)}, got {value!r}.",
                               param=self.name(key))
        return value


__all__ = ["RSARequest", "RequestError", "ZYPHRA_DEFAULTS", "is_rsa_request", "parse_rsa_request",
           "strip_rsa_fields"]
