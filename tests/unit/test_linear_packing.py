"""bf16 linear weights repacked for oneDNN after loading: F.linear's results, to bf16 rounding.

Both accumulate in float32; oneDNN picks its blocking by shape and CPU, so a few outputs may round
the other way in the last bf16 bit."""
import pytest
import torch

from kvserve.ops import cpu_ops
from kvserve.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear

pytestmark = pytest.mark.isa  # again at each lower CPU level (Makefile)


@pytest.mark.parametrize(
    "make",
    [
        lambda: QKVParallelLinear(576, 64, 9, 3, bias=True, dtype=torch.bfloat16),
        lambda: MergedColumnParallelLinear(576, [1536, 1536], bias=False, dtype=torch.bfloat16),
        lambda: RowParallelLinear(1536, 576, bias=False, dtype=torch.bfloat16),
    ],
)
def test_packed_bf16_weights_match_f_linear(make):
    torch.manual_seed(0)
    layer = make()
    layer.weight.data.normal_()
    if layer.bias is not None:
        layer.bias.data.normal_()
    inputs = [torch.randn(m, layer.weight.shape[1]).bfloat16() for m in (1, 7, 300)]
    inputs.append(torch.randn(2, 5, layer.weight.shape[1]).bfloat16())
    expected = [torch.nn.functional.linear(x, layer.weight, layer.bias) for x in inputs]
    layer.linear_method.process_weights_after_loading(layer)
    # Repacked where oneDNN has bf16 kernels (AVX-512 and up), else F.linear runs: the same results.
    assert layer.weight.is_mkldnn == cpu_ops.onednn_bf16_preferred()
    for x, e in zip(inputs, expected):
        out = layer(x)
        assert out.shape == e.shape
        # one bf16 ulp (at most 2^-7 relative), and rarely: float32 sums in another order (how
        # oneDNN blocks them depends on the CPU and the shape), each rounded once
        torch.testing.assert_close(out.float(), e.float(), rtol=2**-7, atol=1e-2)
        assert (out != e).float().mean() < 0.05


def test_float32_weights_are_left_alone():
    layer = RowParallelLinear(64, 32, bias=False, dtype=torch.float32)
    layer.weight.data.normal_()
    layer.linear_method.process_weights_after_loading(layer)
    assert not layer.weight.is_mkldnn


def test_tied_lm_head_packs_a_copy_and_keeps_the_embedding():
    from kvserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding

    torch.manual_seed(0)
    emb = VocabParallelEmbedding(1000, 64, dtype=torch.bfloat16)
    emb.weight.data.normal_()
    head = ParallelLMHead(1000, 64, dtype=torch.bfloat16, tied_embedding=emb)
    hidden = torch.randn(3, 64).bfloat16()
    expected = head(hidden)
    head.process_weights_after_loading()
    assert torch.equal(head(hidden), expected)
    assert not emb.weight.is_mkldnn and torch.equal(emb(torch.tensor([5])), emb.weight[5:6])


@pytest.mark.parametrize("rows", [1, 3, 64, 300, 600])
def test_decode_sized_batches_use_the_decode_copy(rows, monkeypatch):
    torch.manual_seed(0)
    layer = MergedColumnParallelLinear(576, [1536, 1536], bias=False, dtype=torch.bfloat16)
    layer.weight.data.normal_()
    x = torch.randn(rows, 576).bfloat16()
    expected = torch.nn.functional.linear(x.float(), layer.weight.float())
    layer.linear_method.process_weights_after_loading(layer, keep_decode_copy=True)
    assert layer.weight.is_mkldnn == cpu_ops.onednn_bf16_preferred()
    max_rows = cpu_ops.decode_matmul_max_rows(576, 3072)
    assert (layer.decode_weight is None) == (max_rows == 0)
    results = []
    decode_matmul = cpu_ops.decode_matmul
    monkeypatch.setattr(cpu_ops, "decode_matmul", lambda *a, **kw: results.append(decode_matmul(*a, **kw)) or results[-1])
    out = layer(x)
    assert sum(r is not None for r in results) == (1 if rows <= max_rows else 0)
    # float32 accumulation in another order, then one rounding to bf16: within one bf16 ulp
    torch.testing.assert_close(out.float(), expected, rtol=2**-7, atol=1e-2)


def test_small_lm_head_batches_match_the_packed_matmul():
    from kvserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding

    torch.manual_seed(0)
    emb = VocabParallelEmbedding(1024, 64, dtype=torch.bfloat16)
    emb.weight.data.normal_()
    head = ParallelLMHead(1024, 64, dtype=torch.bfloat16, tied_embedding=emb)
    head.process_weights_after_loading(keep_decode_copy=True)
    assert (head._decode is None) == (cpu_ops.decode_matmul_max_rows(64, 1024) == 0)
    hidden = torch.randn(2, 64).bfloat16()
    expected = torch.nn.functional.linear(hidden.float(), emb.weight.float())
    logits = head(hidden)
    if head._decode is None:  # oneDNN's bf16 matmul: one rounding to bf16
        assert logits.dtype == torch.bfloat16
        torch.testing.assert_close(logits.float(), expected, rtol=2**-7, atol=1e-2)
    else:  # the decode kernel's float32 sums, unrounded: a near tie in bf16 stays ordered
        assert logits.dtype == torch.float32
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_float32_gemm_is_float32_linear_rounded_once():
    """The large-batch bf16 matmul where the CPU has no bf16 dot product: bit for bit F.linear in
    float32 on the same values, rounded once (or kept float32)."""
    from kvserve.layers.linear import float32_gemm

    torch.manual_seed(0)
    w, bias = torch.randn(96, 64).bfloat16(), torch.randn(96).bfloat16()
    for shape in ((300, 64), (2, 7, 64), (1, 64)):
        x = torch.randn(shape).bfloat16()
        exact = torch.nn.functional.linear(x.float(), w.float())
        assert torch.equal(float32_gemm(x, w, None), exact.bfloat16())
        assert torch.equal(float32_gemm(x, w, None, torch.float32), exact)
        with_bias = torch.nn.functional.linear(x.float(), w.float(), bias.float())
        assert torch.equal(float32_gemm(x, w, bias), with_bias.bfloat16())
