"""The one explicit channel through which per-step batch metadata reaches attention layers.

The model runner sets it around each forward; model files never see it, only `layers.attention`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

from kvserve.attention.metadata import AttentionMetadata

_current: Optional[AttentionMetadata] = None


@contextmanager
def set_forward_context(meta: AttentionMetadata) -> Iterator[None]:
    global _current
    prev, _current = _current, meta
    try:
        yield
    finally:
        _current = prev


def get_attention_metadata() -> AttentionMetadata:
    if _current is None:
        raise RuntimeError("attention called outside set_forward_context(); only the model runner runs the model")
    return _current
