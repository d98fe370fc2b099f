"""SamplingParams: vLLM's field names and defaults, validated on construction."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Optional, Union

_SAMPLING_EPS = 1e-5


class RequestOutputKind(IntEnum):
    CUMULATIVE = 0  # every output holds everything generated so far
    DELTA = 1  # each output holds only what is new since the last one
    FINAL_ONLY = 2  # one output, when the request finishes


# The constraints of StructuredOutputsParams; a request sets exactly one.
STRUCTURED_OUTPUT_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class StructuredOutputsParams:
    """Constrain the output to a JSON schema, a regex, one of a list of strings, an EBNF/GBNF grammar,
    any JSON object, or a structural tag (vLLM's names). `json` is a schema as a dict, a JSON string, or a
    pydantic model class (its model_json_schema()); it is kept as a dict or a string. `structural_tag` is
    xgrammar's structural tag as JSON text (or a dict, kept as text): free text until a trigger, then
    each tagged part follows its schema; vLLM's form {"structures": [{"begin", "schema", "end"}],
    "triggers": [...]} or xgrammar's {"type": "structural_tag", "format": {...}}. Validated on construction."""

    json: Optional[Union[str, dict[str, Any]]] = None
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None
    structural_tag: Optional[str] = None
    disable_any_whitespace: bool = False  # JSON: no whitespace beyond the one separator form
    disable_additional_properties: bool = False  # JSON: every object's additionalProperties is false

    def __post_init__(self) -> None:
        if isinstance(self.json, type) and hasattr(self.json, "model_json_schema"):
            self.json = self.json.model_json_schema()
        if self.choice is not None:
            self.choice = list(self.choice)
        if isinstance(self.structural_tag, dict):
            self.structural_tag = json.dumps(self.structural_tag)
        set_kinds = [k for k in STRUCTURED_OUTPUT_KINDS if getattr(self, k) not in (None, False)]
        if len(set_kinds) != 1:
            got = ", ".join(set_kinds) if set_kinds else "none"
            raise ValueError(
                f"structured_outputs must set exactly one of {', '.join(STRUCTURED_OUTPUT_KINDS)}; got {got}."
            )
        if isinstance(self.json, str):
            try:
                json.loads(self.json)
            except ValueError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
        elif self.json is not None and not isinstance(self.json, dict):
            kind = type(self.json).__name__
            raise ValueError(f"structured_outputs.json must be a JSON schema (dict or string), not {kind}.")
        if self.structural_tag is not None:
            try:
                tag = json.loads(self.structural_tag)
            except ValueError as e:
                raise ValueError(f"structured_outputs.structural_tag is not valid JSON: {e}") from None
            if not isinstance(tag, dict) or not ("structures" in tag or "format" in tag):
                raise ValueError(
                    "structured_outputs.structural_tag must be an object with `structures` and `triggers` "
                    '(vLLM\'s form) or xgrammar\'s {"type": "structural_tag", "format": {...}}.'
                )
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError("structured_outputs.choice must be a list of non-empty strings.")

    @property
    def kind(self) -> str:
        """Which constraint is set: one of STRUCTURED_OUTPUT_KINDS."""
        return next(k for k in STRUCTURED_OUTPUT_KINDS if getattr(self, k) not in (None, False))

    def key(self) -> tuple:
        """Identifies the compiled grammar: equal keys compile to the same grammar."""
        spec = getattr(self, self.kind)
        if isinstance(spec, dict):
            spec = json.dumps(spec, sort_keys=True)
        elif isinstance(spec, list):
            spec = tuple(spec)
        return (self.kind, spec, self.disable_any_whitespace, self.disable_additional_properties)


@dataclass
class SamplingParams:
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    max_tokens: Optional[int] = 16  # None: up to max_model_len
    min_tokens: int = 0
    logprobs: Optional[int] = None  # number of top logprobs per generated token (sampled one always included)
    prompt_logprobs: Optional[int] = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: Optional[dict[int, float]] = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: Optional[StructuredOutputsParams] = None
    # The prompt's last k tokens only (-1: the last max_model_len); None keeps it whole.
    truncate_prompt_tokens: Optional[int] = None
    allowed_token_ids: Optional[list[int]] = None  # sample only among these
    # Never generate these words: a word's last token is banned where its other tokens were just generated.
    bad_words: Optional[list[str]] = None
    extra_args: Optional[dict[str, Any]] = None  # vLLM's hook for custom processors; carried, unused here
    # Filled by the engine from the tokenizer / generation_config, not by users.
    all_stop_token_ids: set[int] = field(default_factory=set, repr=False)
    bad_words_token_ids: list[list[int]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias is not None:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = [int(t) for t in self.allowed_token_ids]
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        self._verify()
        self.all_stop_token_ids = set(self.stop_token_ids)

    def _verify(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(msg)

        if self.n < 1:
            fail(f"n must be at least 1, got {self.n}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            fail(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            fail(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if self.repetition_penalty <= 0.0:
            fail(f"repetition_penalty must be greater than zero, got {self.repetition_penalty}.")
        if self.temperature < 0.0:
            fail(f"temperature must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            fail(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            fail(f"top_k must be -1 or 0 (disable) or at least 1, got {self.top_k}.")
        if not 0.0 <= self.min_p <= 1.0:
            fail(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            fail(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.min_tokens < 0:
            fail(f"min_tokens must be greater than or equal to 0, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail(f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}.")
        if self.logprobs is not None and self.logprobs < 0:
            fail(f"logprobs must be non-negative, got {self.logprobs}.")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            fail(f"prompt_logprobs must be non-negative, got {self.prompt_logprobs}.")
        if any(not s for s in self.stop):
            fail("stop cannot contain an empty string.")
        k = self.truncate_prompt_tokens
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not (k == -1 or k >= 1)):
            fail(f"truncate_prompt_tokens must be -1 (max_model_len) or at least 1, got {k!r}.")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            fail("allowed_token_ids must not be empty: leave it out to allow every token.")
        if self.bad_words is not None and any(not isinstance(w, str) or not w.strip() for w in self.bad_words):
            fail(f"bad_words must be non-blank strings, got {self.bad_words!r}.")

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax (temperature 0 or top_k 1)."""
        return self.temperature < _SAMPLING_EPS or self.top_k == 1

    def truncated_prompt(self, token_ids: list[int], max_model_len: int) -> list[int]:
        """The prompt as truncate_prompt_tokens leaves it: its last k tokens (k = -1: max_model_len)."""
        k = self.truncate_prompt_tokens
        if k is None:
            return token_ids
        k = max_model_len if k == -1 else k
        return token_ids[-k:]

    def clone(self) -> "SamplingParams":
        return copy.deepcopy(self)
