"""Where a JSON (or Python literal) value that starts at text[i] ends, in text that may still be growing.
Each function returns the index just past the value, or None while the value has not ended yet. They find
boundaries only (strings and brackets); whether the value is valid is for json.loads / ast to say."""
from __future__ import annotations

import re
from typing import Optional

_STRINGS = {
    '"': re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL),
    "'": re.compile(r"'(?:[^'\\]|\\.)*'", re.DOTALL),
}
_BRACKETS = {
    '"': re.compile(r'["{}\[\]()]'),
    "\"'": re.compile(r'["\'{}\[\]()]'),
}
_SCALAR = re.compile(r"[^,\]}\s]*")
_SPACE = re.compile(r"\s*")


def skip_space(text: str, i: int) -> int:
    return _SPACE.match(text, i).end()


def string_end(text: str, i: int) -> Optional[int]:
    """text[i] is a quote: just past the matching quote (backslash escapes skipped)."""
    match = _STRINGS[text[i]].match(text, i)
    return match.end() if match else None


def bracket_end(text: str, i: int, quotes: str = '"') -> Optional[int]:
    """text[i] opens a bracket ({, [ or (): just past the bracket that closes it. Brackets inside
    strings (quoted by any of `quotes`: '"' for JSON, "\"'" for Python) do not count."""
    depth = 0
    finder = _BRACKETS[quotes]
    pos = i
    while True:
        match = finder.search(text, pos)
        if match is None:
            return None
        c, pos = match.group(), match.start()
        if c in quotes:
            end = string_end(text, pos)
            if end is None:
                return None
            pos = end
            continue
        depth += 1 if c in "{[(" else -1
        pos += 1
        if depth == 0:
            return pos


def value_end(text: str, i: int) -> Optional[int]:
    """A JSON value starts at text[i]: just past it. A number or literal ends only where something
    follows it (more digits may still come)."""
    c = text[i]
    if c in "{[":
        return bracket_end(text, i)
    if c == '"':
        return string_end(text, i)
    end = _SCALAR.match(text, i).end()
    return end if end < len(text) else None
