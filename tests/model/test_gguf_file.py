"""model/gguf_file.py against gguf-py's GGUFReader: the same metadata values and tensor tables."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import quantize

from kvserve.model.config_loader import default_model_path
from kvserve.model.gguf_file import GGUFFile


def assert_same_as_gguf_py(path: str) -> GGUFFile:
    ours, reference = GGUFFile(path), GGUFReader(path)
    expected = {k: f.contents() for k, f in reference.fields.items() if not k.startswith("GGUF.")}  # (its header)
    assert ours.fields == expected
    assert [t.name for t in ours.tensors] == [t.name for t in reference.tensors]
    for mine, theirs in zip(ours.tensors, reference.tensors):
        assert mine.shape == tuple(theirs.shape.tolist()) and mine.tensor_type == theirs.tensor_type, mine.name
        assert mine.data.tobytes() == np.ascontiguousarray(theirs.data).tobytes(), mine.name
        assert mine.data.shape == (int(np.prod(mine.shape[1:])), theirs.n_bytes // int(np.prod(mine.shape[1:])))
    return ours


def test_default_model_reads_as_gguf_py_reads_it():
    """The default model: 36 keys (a 49,152-token vocabulary, 48,900 merges, the chat template), 272
    tensors in F32, Q4_1 and Q8_0, every byte the same."""
    ours = assert_same_as_gguf_py(str(default_model_path()))
    assert len(ours.fields["tokenizer.ggml.tokens"]) == 49152
    assert {t.tensor_type for t in ours.tensors} == {
        GGMLQuantizationType.F32, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0
    }  # fmt: skip


def test_every_value_type_and_a_custom_alignment(tmp_path):
    """A file with each scalar type, strings (non-ASCII too), arrays of numbers, strings and bools,
    alignment 64, and F32 / F16 / Q8_0 tensors of 1 to 3 dims."""
    path = str(tmp_path / "all.gguf")
    writer = GGUFWriter(path, "llama")
    writer.add_custom_alignment(64)
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -5)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -30000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000_000)
    writer.add_float32("t.f32", 0.1)
    writer.add_uint64("t.u64", 2**63 + 5)
    writer.add_int64("t.i64", -(2**62))
    writer.add_float64("t.f64", 1 / 3)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "naïve ✓ <|im_start|>")
    writer.add_array("t.ints", [1, -2, 3])
    writer.add_array("t.floats", [0.5, -1.25])
    writer.add_array("t.strs", ["a", "", "Ġthe", "日本"])
    writer.add_array("t.bools", [True, False])
    rng = np.random.default_rng(0)
    writer.add_tensor("vec", rng.standard_normal(7).astype(np.float32))
    writer.add_tensor("half", rng.standard_normal((3, 5)).astype(np.float16))
    q8 = quantize(rng.standard_normal((4, 64)).astype(np.float32), GGMLQuantizationType.Q8_0)
    writer.add_tensor("q8", q8, raw_dtype=GGMLQuantizationType.Q8_0)  # q8: uint8 [4, 2 blocks x 34 bytes]
    writer.add_tensor("cube", rng.standard_normal((2, 3, 4)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = assert_same_as_gguf_py(path)
    assert ours.fields["t.u64"] == 2**63 + 5 and ours.fields["t.strs"] == ["a", "", "Ġthe", "日本"]
    assert ours.fields["general.alignment"] == 64
    assert [t.shape for t in ours.tensors] == [(7,), (5, 3), (64, 4), (4, 3, 2)]


def test_not_a_gguf_file_and_a_truncated_one(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="is not a GGUF file"):
        GGUFFile(str(path))
    whole = Path(default_model_path()).read_bytes()
    for size in (1000, 2_000_000, len(whole) - 100):  # in the metadata, in the first tensor, in the last
        path.write_bytes(whole[:size])
        with pytest.raises(ValueError, match="a truncated or corrupt GGUF file .*; download it again"):
            GGUFFile(str(path))
