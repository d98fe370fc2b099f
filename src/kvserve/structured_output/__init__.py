"""Structured output: constraints (StructuredOutputsParams) compiled to grammars with xgrammar, a
matcher per request, and the per-step token bitmask the runner applies to the logits."""
from kvserve.structured_output.manager import GrammarState, StructuredOutputManager

__all__ = ["GrammarState", "StructuredOutputManager"]
