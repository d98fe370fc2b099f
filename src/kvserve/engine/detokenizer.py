"""Incremental detokenization of one sequence, with stop strings.

Each step decodes only a short window of ids: the text of ids[prefix_offset:] minus the text of
ids[prefix_offset:read_offset] is what the new ids add (the scheme of vLLM and TGI). Decoding a window
instead of single tokens keeps what depends on neighbours right: a multi-byte UTF-8 character split
over several byte-level tokens, or the space a sentencepiece "▁" token turns into.
"""
from __future__ import annotations

from typing import Optional, Sequence

from kvserve.engine.tokenizer import Tokenizer

# How many prompt ids precede the first output id in the decode window.
_PROMPT_CONTEXT = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Owns the text of one sequence's output.

    Invariants:
    - The text of ids[prefix_offset:read_offset] has been accounted for (it is prompt text or already
      in output_text); read_offset only moves past ids whose text was complete (no trailing U+FFFD).
    - After a stop string matched, output_text ends at it (or right after it with
      include_stop_str_in_output) and update() must not be called again.
    - Characters handed out by get_next_output_text(delta=True) are never taken back.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        min_tokens: int = 0,
    ) -> None:
        """`spaces_between_special_tokens` is accepted for vLLM's signature: the byte-level and sentencepiece
        decoders used here never put spaces around special tokens, so (as for vLLM's fast tokenizers)
        it changes nothing. Stop strings are only looked for once more than `min_tokens` ids are out."""
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = tuple(stop)
        self._include_stop = include_stop_str_in_output
        self._min_tokens = min_tokens
        # The tail of the prompt, then every output id.
        self._ids = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._num_prompt_ids = len(self._ids)
        self._prefix_offset = 0
        self._read_offset = self._num_prompt_ids
        self.output_text = ""
        # While not finished, streaming holds back this many trailing characters: they may be the
        # start of a stop string that the next tokens complete.
        self._stop_holdback = max(map(len, self._stop)) - 1 if self._stop and not self._include_stop else 0
        self._num_chars_returned = 0

    @property
    def output_token_ids(self) -> list[int]:
        return self._ids[self._num_prompt_ids :]

    def update(self, new_token_ids: Sequence[int]) -> Optional[str]:
        """Append `new_token_ids`, extend output_text, and return the stop string found (None if none).

        Stop strings are looked for only in the new text plus the len(stop) - 1 characters before
        it, so a step costs O(new text + longest stop), not O(output length).
        """
        text_length_before = len(self.output_text)
        for token_id in new_token_ids:
            self._ids.append(token_id)
            self.output_text += self._decode_next()
        if not self._stop or len(self._ids) - self._num_prompt_ids <= self._min_tokens:
            return None
        return self._find_stop(text_length_before)

    def _decode_next(self) -> str:
        """The text the ids past read_offset add, or "" while it may still be incomplete."""
        window = self._ids[self._prefix_offset :]
        prefix_text = self._decode(window[: self._read_offset - self._prefix_offset])
        text = self._decode(window)
        # A trailing U+FFFD is an unfinished multi-byte character: wait for the bytes that follow.
        if len(text) <= len(prefix_text) or text.endswith(_REPLACEMENT_CHAR):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return text[len(prefix_text) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _find_stop(self, text_length_before: int) -> Optional[str]:
        """Find the earliest stop string that ends in the new text; truncate output_text there."""
        text = self.output_text
        best: Optional[tuple[int, str]] = None
        for stop in self._stop:
            index = text.find(stop, max(0, text_length_before - len(stop) + 1))
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return None
        index, stop = best
        self.output_text = text[: index + len(stop) if self._include_stop else index]
        return stop

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """The output text to report now: all of it, or (delta) only what was not returned before.

        Until finished, the last few characters that could begin a stop string are held back.
        """
        end = len(self.output_text) if finished else max(0, len(self.output_text) - self._stop_holdback)
        if not delta:
            return self.output_text[:end]
        start = self._num_chars_returned
        if end <= start:
            return ""
        self._num_chars_returned = end
        return self.output_text[start:end]
