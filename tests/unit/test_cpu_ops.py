"""The CPU kernels (ops/csrc/cpu_kernels.cpp) against their torch-native references.

bfloat16 results must be bit-identical where the kernel rounds at the same points as the
reference (rotary, SiLU-and-mul); RMSNorm sums squares in another order, so it may differ by one
bf16 ulp in rare elements."""
import pytest
import torch
import torch.nn.functional as F

from kvserve.layers.activation import SiluAndMul
from kvserve.layers.norm import RMSNorm
from kvserve.layers.rotary import RotaryEmbedding
from kvserve.ops import cpu_build, cpu_ops

pytestmark = pytest.mark.isa  # again at each lower CPU level (Makefile)

DTYPES = [torch.float32, torch.bfloat16]


def test_library_builds_and_loads():
    assert cpu_build.load() is not None, "g++ must be installed: the Makefile's tests need the CPU kernels"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(dtype, with_residual):
    torch.manual_seed(0)
    x, res = torch.randn(37, 576).to(dtype), torch.randn(37, 576) * 30  # residual stream: float32
    norm = RMSNorm(576, 1e-5, dtype=dtype)
    norm.weight.data.normal_()
    if with_residual:
        expected_res = x.float() + res  # added in float32, never rounded to bf16
        expected = norm._norm(expected_res)
        fused_res = res.clone()
        out = cpu_ops.rms_norm(x, norm.weight, 1e-5, fused_res)
        assert torch.equal(fused_res, expected_res)
        if dtype == torch.bfloat16:
            assert not torch.equal(fused_res, fused_res.bfloat16().float())
    else:
        expected, out = norm._norm(x), cpu_ops.rms_norm(x, norm.weight, 1e-5)
    assert out.dtype == dtype
    ulp = 2**-7 if dtype == torch.bfloat16 else 1e-6  # float32: summation order, a few ulp
    torch.testing.assert_close(out, expected, atol=0, rtol=ulp)
    if dtype == torch.bfloat16:
        assert (out != expected).float().mean() < 1e-3


def test_rms_norm_reference_takes_a_float32_residual_in_any_model_dtype(monkeypatch):
    """Without the kernel (other devices), the torch path keeps the residual stream in float32 too."""
    monkeypatch.setattr(cpu_ops, "rms_norm", lambda *a, **k: None)
    torch.manual_seed(1)
    x, res = torch.randn(5, 64).bfloat16(), torch.randn(5, 64)
    norm = RMSNorm(64, 1e-6, dtype=torch.bfloat16)
    norm.weight.data.normal_()
    out, new_res = norm(x, res)
    assert new_res.dtype == torch.float32 and torch.equal(new_res, x.float() + res)
    expected = norm.weight * (new_res * torch.rsqrt(new_res.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_reference(dtype):
    torch.manual_seed(0)
    x = (torch.randn(19, 2 * 1536) * 4).to(dtype)
    x[0, :8] = torch.tensor([0.0, -0.0, 100.0, -100.0, 88.0, -88.0, 1e-30, -1e-30]).to(dtype)
    x[0, 1536 + 6 : 1536 + 8] = torch.tensor([1e-9, 3e-9]).to(dtype)  # products below float's normal range
    x[0, 8:14] = torch.tensor([-88.5, 88.5, -88.25, -89.0, 89.0, -87.5]).to(dtype)  # exp(-gate) near overflow
    gate, up = x.chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    out = cpu_ops.silu_and_mul(x)
    if dtype == torch.bfloat16:
        assert torch.equal(out, expected)
        assert expected[0, 6] != 0 and expected[0, 6].abs() < torch.finfo(torch.float32).tiny  # kept, not flushed
    else:
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=2e-6)
    assert torch.equal(SiluAndMul()(x), out)  # the layer takes the kernel


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_in_place_on_strided_qkv_matches_reference(dtype):
    torch.manual_seed(0)
    rope = RotaryEmbedding(64, 4096, 10000.0)
    rope.init_cache()
    qkv = torch.randn(23, (9 + 2 * 3) * 64).to(dtype)
    cos_sin = rope.cos_sin(torch.randint(0, 4096, (23,)))
    q, k, _ = qkv.split([9 * 64, 3 * 64, 3 * 64], dim=-1)
    cos, sin = cos_sin.chunk(2, dim=-1)
    expected_q, expected_k = rope._rotate(q, cos, sin), rope._rotate(k, cos, sin)
    v_before = qkv[:, 12 * 64 :].clone()
    assert cpu_ops.rotary_(q, k, cos_sin, 64)
    if dtype == torch.bfloat16:
        assert torch.equal(q, expected_q) and torch.equal(k, expected_k)
    else:
        torch.testing.assert_close(q, expected_q, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(k, expected_k, atol=1e-6, rtol=1e-6)
    assert torch.equal(qkv[:, 12 * 64 :], v_before)  # v untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_argmax_rows_matches_torch_including_ties_and_strided_rows(dtype):
    torch.manual_seed(0)
    padded = torch.randn(7, 5000).to(dtype)
    padded[0, 10] = padded[0, 3000] = padded[0, 4999] = 50.0  # ties across chunks: first wins
    padded[1, :] = -3.0  # all equal
    padded[2, 4998] = 1e4  # max in the last chunk
    logits = padded[:, :4999]  # a vocab slice: strided rows
    out = cpu_ops.argmax_rows(logits)
    assert out.tolist() == logits.argmax(dim=-1).tolist()
    assert out[0] == 10 and out[1] == 0 and out[2] == 4998


@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_rows_matches_the_inverse_cdf_reference(dtype):
    from kvserve.worker.sampler import inverse_cdf_sample

    torch.manual_seed(0)
    rows, vocab = 96, 4999  # vocab not a multiple of 16: the kernel's tail block
    padded = (torch.randn(rows, vocab + 1) * 3).to(dtype)
    padded[5, :] = float("-inf")
    padded[5, [7, 4000, 4998]] = torch.tensor([0.0, 1.0, 2.0]).to(dtype)  # only three drawable tokens
    padded[6, 100] = 1e4  # one token holds all the weight
    logits = padded[:, :vocab]  # strided rows
    inv_t = torch.rand(rows) * 2 + 0.1
    inv_t[::7] = 0.0  # greedy rows
    for seed in range(5):
        u = torch.rand(rows, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        u[0], u[1] = 0.0, 1.0 - 2**-53  # the ends of [0, 1)
        out = cpu_ops.sample_rows(logits, inv_t, u)
        assert out.tolist() == inverse_cdf_sample(logits, inv_t, u).tolist()
        assert out[5].item() in (7, 4000, 4998) and out[6].item() == 100
        assert out[::7].tolist() == logits[::7].argmax(dim=-1).tolist()


def test_sample_rows_draws_the_softmax_distribution():
    n, inv_t = 40000, 1 / 0.7
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, float("-inf"), -1.0, 2.0] * 3).repeat(n, 1)  # 21 columns: a tail
    out = cpu_ops.sample_rows(logits, torch.full((n,), inv_t), torch.rand(n, dtype=torch.float64))
    counts = torch.bincount(out, minlength=21).double()
    expected = torch.softmax(logits[0].double() * inv_t, dim=-1) * n
    assert counts[expected == 0].sum() == 0  # -inf is never drawn
    keep = expected > 0
    chi2 = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
    assert chi2 < 45.3  # chi-square, 17 degrees of freedom, p = 0.001


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_cache_matches_index_copy_from_strided_qkv_rows(dtype):
    from kvserve.attention.torch_ref import write_kv_cache

    torch.manual_seed(0)
    t, hq, hkv, d, num_blocks, bs = 37, 6, 2, 64, 12, 16
    qkv = torch.randn(t, (hq + 2 * hkv) * d).to(dtype)
    _, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    k, v = k.view(t, hkv, d), v.view(t, hkv, d)  # strided rows, as the attention layer passes them
    slots = torch.randperm(num_blocks * bs)[:t]
    expected = torch.full((2, num_blocks, bs, hkv, d), float("nan"), dtype=dtype)
    cache = expected.clone()
    write_kv_cache(k, v, expected, slots)
    assert cpu_ops.write_kv_cache(k, v, cache, slots)
    assert torch.equal(cache.isnan(), expected.isnan())
    assert torch.equal(cache.nan_to_num(), expected.nan_to_num())


def test_decode_matmul_matches_reference_on_both_kernels():
    torch.manual_seed(0)
    w = (torch.randn(80, 96) * 0.1).bfloat16()  # 5 column blocks (an odd one), 3 k steps of 32
    wv = cpu_ops.decode_weight(w)
    max_rows = cpu_ops.decode_matmul_max_rows(96, 80)
    if max_rows == 0:  # kernels off (KVSERVE_CPU_ISA=none): no decode copy, the layers keep their matmul
        assert wv is None
        return
    assert wv.shape == (5, 48, 16, 2)
    assert torch.equal(wv[3, 7, 11], w[16 * 3 + 11, 14:16])  # block b, pair p, column j
    for allow_amx in (True, False):
        limit = cpu_ops.decode_matmul_max_rows(96, 80, allow_amx)
        for m in sorted({1, 2, 3, 4, 5, 16, 17, 33, 64, limit, limit + 1}):
            x = torch.randn(m, 96).bfloat16()
            got = cpu_ops.decode_matmul(x, wv, allow_amx)
            if m > limit:
                assert got is None
                got = cpu_ops.decode_matmul(x, wv, allow_amx, any_rows=True)  # the LM head takes any rows
            # float accumulation in its own order, then one rounding to bf16: within one bf16 ulp
            torch.testing.assert_close(got.float(), x.float() @ w.float().T, rtol=2**-7, atol=1e-2)
            # out_dtype=float32: the same sums before that rounding (float32 summation order only)
            sums = cpu_ops.decode_matmul(x, wv, allow_amx, out_dtype=torch.float32, any_rows=m > limit)
            assert sums.dtype == torch.float32 and torch.equal(sums.bfloat16(), got)
            torch.testing.assert_close(sums, x.float() @ w.float().T, rtol=1e-5, atol=1e-5)


def test_decode_matmul_float32_output_past_the_caches():
    """An output over 8 MB (the LM head's logits) is written with streaming stores: same sums."""
    torch.manual_seed(0)
    w = (torch.randn(32768, 64) * 0.1).bfloat16()
    wv = cpu_ops.decode_weight(w)
    limit = cpu_ops.decode_matmul_max_rows(64, 32768)
    if limit == 0:
        assert wv is None
        return
    rows = 80  # 80 x 32,768 floats = 10.5 MB (the LM head's any_rows: past the decode limit too)
    x = torch.randn(rows, 64).bfloat16()
    expected = x.float() @ w.float().T
    flat = torch.full((rows * 32768 + 1,), float("nan"))
    aligned, misaligned = flat[: rows * 32768].view(rows, 32768), flat[1:].view(rows, 32768)  # 4 bytes off
    for out in (None, aligned, misaligned):  # misaligned: normal stores
        sums = cpu_ops.decode_matmul(x, wv, out_dtype=torch.float32, out=out, any_rows=True)
        assert out is None or sums.data_ptr() == out.data_ptr()
        torch.testing.assert_close(sums, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(sums.bfloat16(), cpu_ops.decode_matmul(x, wv, any_rows=True))


def _has_amx() -> bool:
    """The amx level, and the OS granted the tiles: the AMX attention kernels apply."""
    return cpu_ops.amx_in_use()


@pytest.mark.parametrize(
    "hq,hkv,d,rows,first,blocks",
    [(9, 3, 64, 37, 5, 3), (9, 3, 64, 256, 2, 64), (4, 2, 128, 16, 0, 5)],
    ids=["48-keys-partial-tile", "1024-keys", "head128-80-keys"],
)
def test_prefix_attention_matches_sdpa_with_log_sum_exp(hq, hkv, d, rows, first, blocks):
    """Every row over all keys of a run of cache blocks, read in place: output and log-sum-exp."""
    torch.manual_seed(0)
    bs = 16
    cache = torch.randn(2, first + blocks + 2, bs, hkv, d).bfloat16()
    qkv = torch.randn(rows, (hq + 2 * hkv) * d).bfloat16()
    q = qkv[:, : hq * d].unflatten(-1, (hq, d))  # strided rows, as the model hands them over
    out = torch.full((rows, hq, d), float("nan"), dtype=torch.bfloat16)
    lse = torch.full((rows, hq), float("nan"))
    applied = cpu_ops.prefix_attention(q, cache, first, blocks, out, lse, d**-0.5)
    assert applied == _has_amx()  # elsewhere the backend runs SDPA, as before
    if not applied:
        return
    k, v = (cache[i, first : first + blocks].reshape(-1, hkv, d).float() for i in (0, 1))  # [n, Hkv, D]
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.repeat_interleave(hq // hkv, dim=1)) * d**-0.5
    expected = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.repeat_interleave(hq // hkv, dim=1))
    # P rounded to bf16 for the PV multiply (as SDPA's bf16 path), then one rounding of the output
    torch.testing.assert_close(out.float(), expected, atol=1.6e-2, rtol=1.6e-2)
    assert (out.float() - expected).abs().mean() < 1e-3
    torch.testing.assert_close(lse, scores.logsumexp(-1).transpose(0, 1), atol=1e-4, rtol=1e-5)
    assert not cpu_ops.prefix_attention(q, cache, 1, cache.shape[1], out, lse, d**-0.5)  # past the cache


@pytest.mark.parametrize(
    "hq,hkv,d,starts,lens",
    [
        (9, 3, 64, [0, 1, 16, 32, 49, 80, 112, 145], [1, 15, 16, 17, 31, 32, 33, 100]),
        (4, 4, 128, [0, 310], [300, 7]),  # head size 128, rows 300-309 in no prompt
    ],
)
def test_prefill_attention_matches_causal_sdpa(hq, hkv, d, starts, lens):
    torch.manual_seed(0)
    t = starts[-1] + lens[-1]
    qkv = torch.randn(t, (hq + 2 * hkv) * d).bfloat16()
    # strided rows of one qkv tensor, as the model hands them over
    q, k, v = (x.unflatten(-1, (-1, d)) for x in qkv.split([hq * d, hkv * d, hkv * d], dim=-1))
    out = torch.full((t, hq, d), float("nan"), dtype=torch.bfloat16)
    applied = cpu_ops.prefill_attention(q, k, v, out, torch.tensor(starts), torch.tensor(lens), d**-0.5)
    assert applied == _has_amx()  # elsewhere the backend runs SDPA, as before
    if not applied:
        return
    covered = torch.zeros(t, dtype=torch.bool)
    for s, n in zip(starts, lens):
        covered[s : s + n] = True
        qp, kp, vp = (x[s : s + n].float().transpose(0, 1)[None] for x in (q, k, v))
        expected = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=d**-0.5, enable_gqa=True)
        got = out[s : s + n].float().transpose(0, 1)[None]
        # P rounded to bf16 for the PV multiply (as SDPA's bf16 path), then one rounding of the output
        torch.testing.assert_close(got, expected, atol=1.6e-2, rtol=1.6e-2)
        assert (got - expected).abs().mean() < 1e-3
    assert out[~covered].isnan().all()  # rows in no prompt are not written
