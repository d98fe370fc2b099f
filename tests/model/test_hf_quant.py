"""Quantized linears from Hugging Face folders (model/hf_quant.py): AWQ and GPTQ checkpoints built here
in their own packed layouts, and int8 / int4 quantization at load. Each is served and compared with a
dense float32 checkpoint of the weights dequantized by hand: the same greedy tokens, logprobs within 1e-3."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

from conftest import build_tiny_llama
from kvserve import LLM, SamplingParams
from kvserve.model.config_loader import load_model_config
from kvserve.ops import quant_ops, quant_pack

pytestmark = pytest.mark.isa  # again at each lower CPU level (Makefile)

_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's pack: nibble i of an int32 holds column AWQ_ORDER[i]


@pytest.fixture(scope="module")
def tiny128(tmp_path_factory) -> Path:
    """The tiny Llama with hidden size 128, so that every linear's input is whole groups of 128."""
    return Path(build_tiny_llama(tmp_path_factory.mktemp("tiny128"), hidden=128, heads=4, kv_heads=2))


def _int32(values: torch.Tensor) -> torch.Tensor:
    """int64 holding 32-bit patterns -> int32 with the same bits."""
    return torch.where(values >= 2**31, values - 2**32, values).to(torch.int32)


def _pack_awq(q: torch.Tensor) -> torch.Tensor:
    """q [R, C] in [0, 15] -> int32 [R, C / 8] in AutoAWQ's order."""
    q = q.long().view(q.shape[0], -1, 8)
    return _int32(sum(q[..., AWQ_ORDER[i]] << (4 * i) for i in range(8)))


def _pack_sequential(q: torch.Tensor, dim: int) -> torch.Tensor:
    """q in [0, 15] -> int32 with 8 consecutive values along `dim` per int32 (value j at bits 4 j)."""
    q = q.long().movedim(dim, -1)
    q = q.reshape(*q.shape[:-1], -1, 8)
    return _int32(sum(q[..., j] << (4 * j) for j in range(8))).movedim(-1, dim)


def _asymmetric(w: torch.Tensor, group: int):
    """w [N, K] -> q [N, K], zero [N, K / group] (integers in [0, 15]), scale float16 [N, K / group]."""
    n, k = w.shape
    g = w.view(n, k // group, group)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    scale = ((hi - lo) / 15).clamp(min=1e-4).half()
    zero = torch.round(-lo / scale.float()).clamp(0, 15)
    q = (torch.round(g / scale.float().unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(0, 15)
    return q.reshape(n, k).long(), zero.long(), scale


def _by_hand(q, zero, scale, group):
    """What dequantizing the checkpoint in float32 gives: (q - zero) * scale, [N, K]."""
    return (q.float() - zero.float().repeat_interleave(group, 1)) * scale.float().repeat_interleave(group, 1)


def _write(folder: Path, src: Path, tensors: dict, quantization_config=None) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, folder / name)
    config = json.loads((src / "config.json").read_text())
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config))
    safetensors.torch.save_file(tensors, str(folder / "model.safetensors"))
    return str(folder)


def _int4_checkpoint(src: Path, out: Path, method: str, group: int, shuffle_g_idx: bool = False) -> tuple[str, str]:
    """(AWQ or GPTQ folder, dense float32 folder of its weights dequantized by hand)."""
    tensors = safetensors.torch.load_file(str(src / "model.safetensors"))
    packed, dense = {}, {}
    for name, w in tensors.items():
        module = name[: -len(".weight")]
        if module.rsplit(".", 1)[-1] not in _LINEARS:
            packed[name] = dense[name] = w
            continue
        k = w.shape[1]
        q, zero, scale = _asymmetric(w, group if group > 0 else k)
        dense[name] = _by_hand(q, zero, scale, group if group > 0 else k)
        if method == "awq":  # [K, N / 8], [G, N / 8], [G, N]
            packed.update({f"{module}.qweight": _pack_awq(q.t()), f"{module}.qzeros": _pack_awq(zero.t()),
                           f"{module}.scales": scale.t().contiguous()})  # fmt: skip
        else:  # GPTQ v1: [K / 8, N], zero - 1 in [G, N / 8], [G, N], g_idx [K]
            g_idx = torch.arange(k, dtype=torch.int32) // (group if group > 0 else k)
            if shuffle_g_idx:
                g_idx = g_idx.flip(0)
            packed.update({f"{module}.qweight": _pack_sequential(q.t(), 0),
                           f"{module}.qzeros": _pack_sequential((zero.t() - 1) & 15, 1),
                           f"{module}.scales": scale.t().contiguous(), f"{module}.g_idx": g_idx})  # fmt: skip
    config = {"quant_method": method, "bits": 4, "group_size": group}
    config.update({"zero_point": True, "version": "gemm"} if method == "awq" else {"desc_act": shuffle_g_idx, "sym": False})
    packed = {name: t.contiguous() for name, t in packed.items()}
    return _write(out / method, src, packed, config), _write(out / f"{method}-dense", src, dense)


def _dense_of_quantized(src: Path, out: Path, quantize, qtype: int) -> str:
    """A float32 folder whose linears are `quantize`'s blocks dequantized (the reference dequantize)."""
    tensors = safetensors.torch.load_file(str(src / "model.safetensors"))
    for name, w in tensors.items():
        if name.rsplit(".", 2)[-2] in _LINEARS:
            tensors[name] = quant_ops.reference_dequantize(quantize(w), qtype, w.shape[1])
    return _write(out, src, tensors)


_PROMPTS = [{"prompt_token_ids": torch.randint(3, 3000, (n,), generator=torch.Generator().manual_seed(n)).tolist()}
            for n in (1, 9, 40, 130)]  # fmt: skip


def _run(path: str, **kwargs):
    llm = LLM(path, dtype="float32", kv_cache_memory_bytes=64 << 20, **kwargs)
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=1, ignore_eos=True)
    return llm, [o.outputs[0] for o in llm.generate(_PROMPTS, params, use_tqdm=False)]


def _assert_same(runs, dense_runs, tol=1e-3):
    for got, want in zip(runs, dense_runs):
        assert got.token_ids == want.token_ids
        for a, b, token in zip(got.logprobs, want.logprobs, got.token_ids):
            assert abs(a[token].logprob - b[token].logprob) < tol


def _linears(llm):
    layer = llm.llm_engine.runner.model.model.layers[0]
    return layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj


@pytest.mark.parametrize("method,group", [("awq", 128), ("gptq", 128), ("gptq", -1)])
def test_int4_checkpoint_served_as_its_dequantized_weights(tiny128, tmp_path, method, group):
    quantized, dense = _int4_checkpoint(tiny128, tmp_path, method, group)
    llm, runs = _run(quantized)
    assert llm.llm_engine.config.model.quantization == method
    for linear in _linears(llm):  # kept as int4 blocks, no float copy
        assert linear.linear_method.qtype == quant_ops.Q4_Z and linear.weight.dtype == torch.uint8
        assert getattr(linear, "decode_weight", None) is None
    _assert_same(runs, _run(dense)[1])


@pytest.mark.parametrize("quantization,qtype,quantize", [
    ("int8", quant_pack.Q8_0, quant_pack.quantize_q8_0), ("int4", quant_pack.Q4_0, quant_pack.quantize_q4_0)])  # fmt: skip
def test_quantized_at_load_serves_its_dequantized_weights(tiny128, tmp_path, quantization, qtype, quantize):
    llm, runs = _run(str(tiny128), quantization=quantization)
    assert llm.llm_engine.config.model.quantization == quantization
    for linear in _linears(llm):
        assert linear.linear_method.qtype == qtype and linear.weight.dtype == torch.uint8
    _assert_same(runs, _run(_dense_of_quantized(tiny128, tmp_path, quantize, qtype))[1])


def test_quantization_errors_name_what_to_do(tiny128, tmp_path):
    with pytest.raises(ValueError, match="no awq quantization_config"):
        load_model_config(str(tiny128), quantization="awq")
    awq, _ = _int4_checkpoint(tiny128, tmp_path, "awq", 128)
    with pytest.raises(ValueError, match="awq checkpoint"):
        load_model_config(awq, quantization="int8")
    wide = Path(build_tiny_llama(tmp_path / "tiny256", hidden=256, heads=4, kv_heads=2))  # two groups per row
    gptq, _ = _int4_checkpoint(wide, tmp_path / "act-order", "gptq", 128, shuffle_g_idx=True)
    with pytest.raises(ValueError, match="desc_act"):
        LLM(gptq, dtype="float32", kv_cache_memory_bytes=64 << 20)
