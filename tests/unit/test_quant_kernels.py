"""The GGUF block kernels (ops/csrc/quant.cpp) against gguf-py, their reference.

dequantize must equal gguf-py's dequantize bit for bit; the matmul, which decodes each weight the
same way in registers and sums in float32, must equal F.linear with the dequantized weight up to
float32 summation order, and the same row must give the same bits whatever else is in the batch."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf.constants import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from kvserve.ops import cpu_build, quant_ops

pytestmark = pytest.mark.isa  # again at each lower CPU level (Makefile)

TYPES = [T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]
HALF_OFFSETS = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q8_0: [0], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}


def random_blocks(qtype: T, n: int, k: int, seed: int) -> np.ndarray:
    """Valid blocks [n, row_bytes]: every byte random, float16 scales finite (normals and subnormals
    of both signs, zeros). Quantized data from gguf-py where it quantizes this type, else random."""
    rng = np.random.default_rng(seed)
    block, size = quant_ops.block_shape(qtype)
    b = rng.integers(0, 256, size=(n, k // block, size), dtype=np.uint8)
    for at in HALF_OFFSETS[qtype]:
        h = (rng.standard_normal((n, k // block)) * 10.0 ** rng.integers(-7, 2, size=(n, k // block)))
        h[rng.random(h.shape) < 0.05] = 0.0
        b[..., at:at + 2] = h.astype(np.float16).view(np.uint8).reshape(n, k // block, 2)
    return b.reshape(n, -1)


def quantized_blocks(qtype: T, n: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    try:
        return gguf_quantize((rng.standard_normal((n, k)) * 0.05).astype(np.float32), qtype)
    except NotImplementedError:  # gguf-py quantizes no K-quant type
        return random_blocks(qtype, n, k, seed)


def shapes(qtype: T):
    block = quant_ops.block_shape(qtype)[0]
    return [(n, k) for n in (3, 17, 40) for k in (block, 3 * block)]


def test_library_loads():
    assert cpu_build.load() is not None, "g++ must be installed: the Makefile's tests need the CPU kernels"


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_equals_gguf_bit_for_bit(qtype):
    for seed, (n, k) in enumerate(shapes(qtype)):
        for blocks in (quantized_blocks(qtype, n, k, seed), random_blocks(qtype, n, k, seed)):
            expected = gguf_dequantize(blocks, qtype)
            got = quant_ops.dequantize(torch.from_numpy(blocks), qtype, k)
            assert got.dtype == torch.float32 and got.shape == (n, k)
            assert np.array_equal(got.numpy().view(np.uint32), expected.view(np.uint32)), (qtype.name, n, k)
            ref = quant_ops.reference_dequantize(torch.from_numpy(blocks), qtype, k)
            assert torch.equal(ref, torch.from_numpy(expected))


def test_dequantize_writes_into_out():
    blocks = torch.from_numpy(quantized_blocks(T.Q4_1, 5, 64, 0))
    out = torch.full((5, 64), float("nan"))
    assert quant_ops.dequantize(blocks, T.Q4_1, 64, out=out) is out
    assert torch.equal(out, quant_ops.reference_dequantize(blocks, T.Q4_1, 64))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matmul_matches_linear_on_the_dequantized_weight(qtype):
    torch.manual_seed(0)
    for seed, (n, k) in enumerate(shapes(qtype)):
        blocks = torch.from_numpy(quantized_blocks(qtype, n, k, seed))
        w = quant_ops.reference_dequantize(blocks, qtype, k)
        for m in (1, 2, 5, 33, 64, 100):
            for x_dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(m, k).to(x_dtype)
                expected = F.linear(x.float(), w)
                # float32 sums of k products in some order: a few ulp of the sum of magnitudes
                bound = 1e-5 * F.linear(x.float().abs(), w.abs()) + 1e-30
                y = quant_ops.matmul(x, blocks, qtype, k, torch.float32)
                assert y.dtype == torch.float32 and y.shape == (m, n)
                assert ((y - expected).abs() <= bound).all(), (qtype.name, n, k, m, x_dtype)
                y16 = quant_ops.matmul(x, blocks, qtype, k, torch.bfloat16)
                assert y16.dtype == torch.bfloat16 and torch.equal(y16, y.bfloat16())  # rounded once
                assert quant_ops.matmul(x, blocks, qtype, k).dtype == x_dtype


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matmul_multiplies_gguf_values_exactly(qtype):
    """x = rows of the identity: each output is one weight times 1 plus zeros, so the matmul must
    give gguf-py's dequantized values bit for bit (decoded in registers and through its buffer)."""
    block = quant_ops.block_shape(qtype)[0]
    n, k = 17, 3 * block
    blocks = torch.from_numpy(random_blocks(qtype, n, k, 7))
    w = torch.from_numpy(gguf_dequantize(blocks.numpy(), qtype))
    eye = torch.eye(k)
    for rows in (slice(0, 1), slice(k - 2, k), slice(5, 8), slice(9, 13), slice(0, k)):
        y = quant_ops.matmul(eye[rows].contiguous(), blocks, qtype, k, torch.float32)
        assert torch.equal(y, w[:, rows].t()), (qtype.name, rows)


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q6_K], ids=lambda t: t.name)
def test_matmul_rows_do_not_depend_on_the_batch(qtype):
    """Small batches decode in registers, larger ones through a buffer: the same sums in the same order."""
    block = quant_ops.block_shape(qtype)[0]
    n, k = 37, 2 * block
    blocks = torch.from_numpy(random_blocks(qtype, n, k, 1))
    x = torch.randn(100, k)
    full = quant_ops.matmul(x, blocks, qtype, k, torch.float32)
    for rows in (slice(0, 1), slice(5, 7), slice(10, 13), slice(20, 24), slice(50, 55), slice(0, 64)):
        assert torch.equal(quant_ops.matmul(x[rows].contiguous(), blocks, qtype, k, torch.float32), full[rows])


def test_max_rows_where_the_kernel_applies():
    for qtype in TYPES:
        block = quant_ops.block_shape(qtype)[0]
        assert quant_ops.matmul_max_rows(qtype, 3 * block, 40) > 0
        assert quant_ops.matmul_max_rows(qtype, 3 * block + 16, 40) == 0  # not whole blocks
    assert quant_ops.matmul_max_rows(T.Q5_0, 64, 40) == 0  # a type without a kernel
    for n, k in ((960, 576), (576, 576), (3072, 576), (576, 1536)):  # the default model's linears
        assert quant_ops.matmul_max_rows(T.Q4_1, k, n) > 0
    assert quant_ops.matmul_max_rows(T.Q8_0, 576, 49152) > 0  # its LM head


def test_inputs_the_kernels_do_not_take_return_none(monkeypatch):
    blocks = torch.from_numpy(quantized_blocks(T.Q8_0, 8, 64, 0))
    x = torch.randn(3, 64)
    assert quant_ops.matmul(x, blocks, T.Q8_0, 64) is not None
    assert quant_ops.matmul(x.half(), blocks, T.Q8_0, 64) is None  # x dtype
    assert quant_ops.matmul(x, blocks, T.Q8_0, 64, torch.float16) is None  # out dtype
    assert quant_ops.matmul(torch.randn(64, 3).t(), blocks, T.Q8_0, 64) is None  # not contiguous
    assert quant_ops.matmul(x[:, :32].contiguous(), blocks, T.Q8_0, 32) is None  # row bytes != k's
    assert quant_ops.matmul(x.to("meta"), blocks, T.Q8_0, 64) is None  # not a CPU tensor
    assert quant_ops.matmul(x, blocks.to("meta"), T.Q8_0, 64) is None
    assert quant_ops.matmul(x, blocks.view(torch.int8), T.Q8_0, 64) is None  # blocks dtype
    assert quant_ops.matmul(x, blocks, T.Q5_0, 64) is None  # no kernel for the type
    assert quant_ops.matmul(x[:0], blocks, T.Q8_0, 64) is None  # no rows
    assert quant_ops.dequantize(blocks, T.Q5_0, 64) is None
    assert quant_ops.dequantize(blocks[:, :17], T.Q8_0, 64) is None
    monkeypatch.setattr(cpu_build, "load", lambda: None)  # no library (no compiler, or KVSERVE_CPU_ISA=none)
    assert quant_ops.matmul(x, blocks, T.Q8_0, 64) is None
    assert quant_ops.dequantize(blocks, T.Q8_0, 64) is None
    assert quant_ops.matmul_max_rows(T.Q8_0, 64, 8) == 0
    assert quant_ops.block_shape(T.Q8_0) == (32, 34) and quant_ops.GGUF_KERNEL_TYPES == {2, 3, 8, 12, 13, 14}
