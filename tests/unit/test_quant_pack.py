"""Blocks made by ops/quant_pack.py: kvserve's Q4_Z (AWQ / GPTQ int4) through the kernels against
dequantizing by hand, and int8 / int4 quantization at load into GGML's Q8_0 / Q4_0."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvserve.ops import cpu_build, quant_ops, quant_pack

pytestmark = pytest.mark.isa  # again at each lower CPU level (Makefile)


def _random_q4_z(n: int, k: int, group: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g)
    scale = (torch.rand(n, k // group, generator=g) * 0.05 + 1e-3).half()
    zero = torch.randint(0, 16, (n, k // group), generator=g)
    by_hand = (q.float() - zero.float().repeat_interleave(group, 1)) * scale.float().repeat_interleave(group, 1)
    return quant_pack.pack_q4_z(q, scale, zero), by_hand


@pytest.mark.parametrize("n,k,group", [(7, 128, 128), (33, 384, 384), (65, 1024, 256), (5, 640, 128)])
def test_q4_z_dequantizes_exactly_to_scale_times_q_minus_zero(n, k, group):
    blocks, by_hand = _random_q4_z(n, k, group, seed=n)
    assert blocks.shape == (n, k // 128 * 68)
    assert torch.equal(quant_ops.reference_dequantize(blocks, quant_ops.Q4_Z, k), by_hand)
    if cpu_build.load() is not None:
        assert torch.equal(quant_ops.dequantize(blocks, quant_ops.Q4_Z, k), by_hand)


@pytest.mark.skipif(cpu_build.load() is None, reason="needs the CPU kernel library (KVSERVE_CPU_ISA=none)")
@pytest.mark.parametrize("m", [1, 3, 17, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q4_z_matmul_matches_linear_on_the_dequantized_weight(m, dtype):
    blocks, by_hand = _random_q4_z(37, 640, 128, seed=m)
    x = torch.randn(m, 640, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = quant_ops.matmul(x, blocks, quant_ops.Q4_Z, 640, torch.float32)
    torch.testing.assert_close(y, F.linear(x.float(), by_hand), atol=2e-5, rtol=1e-5)
    assert quant_ops.matmul_max_rows(quant_ops.Q4_Z, 640, 37) > 0


def test_int8_keeps_one_scale_per_row_and_rounds_to_nearest():
    w = torch.randn(9, 96, generator=torch.Generator().manual_seed(0))
    w[3] = 0  # an all-zero row stays zero
    blocks = quant_pack.quantize_q8_0(w)
    per_block = blocks.view(9, 3, 34)[..., :2].contiguous().view(torch.float16).view(9, 3)
    assert torch.equal(per_block, per_block[:, :1].expand(9, 3))  # the row's scale in each block
    scale = (w.abs().amax(1) / 127).half().float()
    assert torch.allclose(per_block[:, 0].float()[scale > 0], scale[scale > 0])
    back = quant_ops.reference_dequantize(blocks, quant_pack.Q8_0, 96)
    assert torch.equal(back[3], torch.zeros(96))
    assert ((back - w).abs() <= scale.unsqueeze(1) * 0.5 + 1e-6).all()


@pytest.mark.parametrize("k,group", [(256, 128), (64, 64), (96, 32)])
def test_int4_groups_of_128_or_what_divides_the_row(k, group):
    w = torch.randn(5, k, generator=torch.Generator().manual_seed(k))
    blocks = quant_pack.quantize_q4_0(w)
    assert blocks.shape == (5, k // 32 * 18)
    scales = blocks.view(5, k // 32, 18)[..., :2].contiguous().view(torch.float16).view(5, k // 32).float()
    expected = (w.view(5, k // group, group).abs().amax(-1) / 7).half().float().repeat_interleave(group // 32, 1)
    assert torch.equal(scales, expected)
    back = quant_ops.reference_dequantize(blocks, quant_pack.Q4_0, k)
    assert ((back - w).abs() <= scales.repeat_interleave(32, 1) * 0.5 + 1e-6).all()
