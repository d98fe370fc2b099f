"""The request fields that constrain the output, merged into one StructuredOutputsParams: OpenAI's
`response_format` (json_object, json_schema; vLLM's structural_tag), vLLM's `structured_outputs`
object (what clients send in `extra_body`) and vLLM's older `guided_json` / `guided_regex` /
`guided_choice` / `guided_grammar`. A request sets at most one constraint; several (or a structured_outputs object with none) are a 400
naming the fields."""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from kvserve.sampling_params import STRUCTURED_OUTPUT_KINDS, StructuredOutputsParams

JsonSchema = Union[dict[str, Any], str]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class JsonSchemaFormat(_Strict):
    name: str = Field(..., description="The schema's name (OpenAI requires one).")
    description: Optional[str] = None
    json_schema: Optional[dict[str, Any]] = Field(None, alias="schema", description="The JSON schema.")
    strict: Optional[bool] = Field(None, description="Accepted; the schema is always followed exactly.")


class StructuralTagStructure(_Strict):
    begin: str
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    end: str


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: Optional[JsonSchemaFormat] = None
    # vLLM's structural_tag response format: free text until a trigger, then each structure's schema.
    structures: Optional[list[StructuralTagStructure]] = None
    triggers: Optional[list[str]] = None
    format: Optional[dict[str, Any]] = Field(None, description="xgrammar's structural tag format instead.")


class StructuredOutputsRequest(_Strict):
    """vLLM's structured_outputs: exactly one of json, regex, choice, grammar, json_object."""

    json_: Optional[JsonSchema] = Field(None, alias="json", description="A JSON schema (object or string).")
    regex: Optional[str] = None
    choice: Optional[list[str]] = Field(None, description="The output is exactly one of these strings.")
    grammar: Optional[str] = Field(None, description="An EBNF (GBNF) grammar; its start rule is `root`.")
    json_object: Optional[bool] = Field(None, description="Any JSON object.")
    structural_tag: Optional[Union[str, dict[str, Any]]] = Field(None, description="xgrammar's structural tag.")
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False

    def constraints(self) -> dict[str, Any]:
        values = {"json": self.json_, "regex": self.regex, "choice": self.choice, "grammar": self.grammar,
                  "json_object": self.json_object, "structural_tag": self.structural_tag}  # fmt: skip
        return {k: v for k, v in values.items() if v not in (None, False)}


_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
# Every request field that constrains the output (SamplingRequest has them all).
CONSTRAINT_FIELDS = ("response_format", "structured_outputs", *_GUIDED)


def structured_outputs_params(
    response_format: Optional[ResponseFormat],
    structured_outputs: Optional[StructuredOutputsRequest],
    guided: dict[str, Any],
) -> Optional[StructuredOutputsParams]:
    """The one constraint these fields set (guided: guided_* name -> value), or None. Raises ValueError
    (a 400) naming the fields when several are set, or when structured_outputs sets none."""
    found: list[tuple[str, str, Any]] = []  # (request field, kind, value)
    options: dict[str, bool] = {}
    if structured_outputs is not None:
        set_kinds = structured_outputs.constraints()
        if not set_kinds:
            raise ValueError(
                f"structured_outputs must set exactly one of {', '.join(STRUCTURED_OUTPUT_KINDS)}; it sets none."
            )
        found += [(f"structured_outputs.{kind}", kind, value) for kind, value in set_kinds.items()]
        options = {
            "disable_any_whitespace": structured_outputs.disable_any_whitespace,
            "disable_additional_properties": structured_outputs.disable_additional_properties,
        }
    found += [(name, _GUIDED[name], value) for name, value in guided.items() if value is not None]
    if response_format is not None and response_format.type == "json_object":
        found.append(("response_format", "json_object", True))
    elif response_format is not None and response_format.type == "json_schema":
        if response_format.json_schema is None or response_format.json_schema.json_schema is None:
            raise ValueError("response_format of type json_schema needs json_schema.schema.")
        found.append(("response_format", "json", response_format.json_schema.json_schema))
    elif response_format is not None and response_format.type == "structural_tag":
        found.append(("response_format", "structural_tag", _structural_tag(response_format)))
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(name for name, _, _ in found)
        raise ValueError(f"structured_outputs: give one output constraint; this request sets {len(found)}: {names}.")
    _, kind, value = found[0]
    return StructuredOutputsParams(**{kind: value}, **options)


def _structural_tag(response_format: ResponseFormat) -> dict[str, Any]:
    """vLLM's response_format of type structural_tag as the tag StructuredOutputsParams takes."""
    if response_format.format is not None:
        return {"type": "structural_tag", "format": response_format.format}
    if not response_format.structures:
        raise ValueError("response_format of type structural_tag needs structures (and triggers) or format.")
    structures = [s.model_dump(by_alias=True) for s in response_format.structures]
    return {"structures": structures, "triggers": response_format.triggers or []}
