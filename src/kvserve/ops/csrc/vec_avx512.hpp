// The vector layer on AVX-512 (F/BW/VL/DQ), with AVX512_BF16's dot product and rounding where
// the build has them (the avx512_bf16 and amx levels). Included by vec.hpp only.
#pragma once

#include <immintrin.h>

namespace kv::vec {

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
constexpr const char* kIsa = "amx";
#elif defined(__AVX512BF16__)
constexpr const char* kIsa = "avx512_bf16";
#else
constexpr const char* kIsa = "avx512";
#endif
#ifdef __AVX512BF16__
constexpr int64_t kMatmulMaxRows = 4;  // the decode matmul's measured crossover with oneDNN (matmul.cpp)
#else
// The crossover with float32_gemm (layers/linear.py), default model's linears x 30 layers: 16 rows
// 22.3 vs 61.7 ms, 48 rows 62.4 vs 103, 64 rows 81.1 vs 110.
constexpr int64_t kMatmulMaxRows = 64;
#endif
constexpr int64_t kMatmulMr = 4, kMatmulNr = 4;  // 16 accumulators + 4 weight vectors of 32
// GGUF block matmul (quant.cpp): 4 x 4 outputs = 16 accumulators + 8 decoded weight vectors. Its
// crossover with dequantizing + MKL's GEMM, measured on the default model (30 layers x qkv, o,
// gate_up, down in Q4_1): 64 rows 83 vs 101 ms, 80 rows 124 vs 105; its LM head in Q8_0 (49,152 x
// 576): 64 rows 29.1 vs 32.5 ms, 96 rows 43.7 vs 37.0.
constexpr int64_t kQuantMr = 4, kQuantNr = 4, kQuantMaxRows = 64;
constexpr bool kLut16Fast = true;  // lut16 is one vpermps

struct F32x16 {
  __m512 v;
};

inline F32x16 zero() { return {_mm512_setzero_ps()}; }
inline F32x16 set1(float f) { return {_mm512_set1_ps(f)}; }
inline F32x16 load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline F32x16 load(const bf16* p) {
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16))};
}

inline __m256i to_bf16_bits(__m512 v) {  // round to nearest even; NaN stays NaN (as f2bf)
#ifdef __AVX512BF16__
  // vcvtneps2bf16 rounds and quiets NaNs as f2bf does but flushes denormals to zero: vectors
  // holding one (practically never) take the integer path below, which keeps them.
  if (__builtin_expect(_mm512_fpclass_ps_mask(v, 0x20) == 0, 1)) return (__m256i)_mm512_cvtneps_pbh(v);
#endif
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
}

inline void store(float* p, F32x16 a) { _mm512_storeu_ps(p, a.v); }
inline void store(bf16* p, F32x16 a) { _mm256_storeu_si256((__m256i*)p, to_bf16_bits(a.v)); }
inline void stream(float* p, F32x16 a) { _mm512_stream_ps(p, a.v); }  // p 64-byte aligned
inline void stream_fence() { _mm_sfence(); }

inline F32x16 round_bf16(F32x16 a) {
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16_bits(a.v)), 16))};
}

inline F32x16 load_i8(const int8_t* p) {
  return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)))};
}
inline F32x16 load_bits(const uint8_t* p, int shift, int mask) {
  const __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
  return {_mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srl_epi32(u, _mm_cvtsi32_si128(shift)), _mm512_set1_epi32(mask)))};
}
// vpermps reads the low 4 bits of each index: the & 15 is free.
inline F32x16 lut16(F32x16 t, const uint8_t* p, int shift) {
  __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
  if (shift != 0) u = _mm512_srl_epi32(u, _mm_cvtsi32_si128(shift));
  return {_mm512_permutexvar_ps(u, t.v)};
}
inline F32x16 load_f16(const uint16_t* p) { return {_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p))}; }
inline void load_f16x2(const uint8_t* p, int64_t stride, int n, F32x16& a, F32x16& b) {
  const __m512i at = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                        _mm512_set1_epi32(static_cast<int>(stride)));
  const __mmask16 lanes = static_cast<__mmask16>(first_lanes(n));
  const __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), lanes, at, p, 1);
  a = {_mm512_cvtph_ps(_mm512_cvtepi32_epi16(v))};
  b = {_mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(v, 16)))};
}

inline F32x16 add(F32x16 a, F32x16 b) { return {_mm512_add_ps(a.v, b.v)}; }
inline F32x16 sub(F32x16 a, F32x16 b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline F32x16 mul(F32x16 a, F32x16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline F32x16 div(F32x16 a, F32x16 b) { return {_mm512_div_ps(a.v, b.v)}; }
inline F32x16 fma(F32x16 a, F32x16 b, F32x16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline F32x16 max(F32x16 a, F32x16 b) { return {_mm512_max_ps(a.v, b.v)}; }
inline F32x16 min(F32x16 a, F32x16 b) { return {_mm512_min_ps(a.v, b.v)}; }
inline F32x16 floor(F32x16 a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC)}; }
inline F32x16 pow2(F32x16 n) {
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n.v), _mm512_set1_epi32(127)), 23))};
}

inline Mask lt(F32x16 a, F32x16 b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ); }
inline Mask eq(F32x16 a, F32x16 b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_EQ_OQ); }
inline Mask unord(F32x16 a, F32x16 b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_UNORD_Q); }
inline F32x16 select(Mask m, F32x16 a, F32x16 b) { return {_mm512_mask_mov_ps(b.v, static_cast<__mmask16>(m), a.v)}; }

inline float reduce_add(F32x16 a) {  // (i, i + 8), (i, i + 4), (i, i + 2), (0, 1)
  const __m256 t1 = _mm256_add_ps(_mm512_castps512_ps256(a.v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a.v), 1)));
  const __m128 t2 = _mm_add_ps(_mm256_castps256_ps128(t1), _mm256_extractf128_ps(t1, 1));
  const __m128 t3 = _mm_add_ps(t2, _mm_movehl_ps(t2, t2));
  return _mm_cvtss_f32(_mm_add_ss(t3, _mm_movehdup_ps(t3)));
}
inline float reduce_max(F32x16 a) {
  const __m256 t1 = _mm256_max_ps(_mm512_castps512_ps256(a.v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a.v), 1)));
  const __m128 t2 = _mm_max_ps(_mm256_castps256_ps128(t1), _mm256_extractf128_ps(t1, 1));
  const __m128 t3 = _mm_max_ps(t2, _mm_movehl_ps(t2, t2));
  return _mm_cvtss_f32(_mm_max_ss(t3, _mm_movehdup_ps(t3)));
}

// Lane j = reduce_add(v[j]): the same tree, four rounds of shuffles and adds over all 16 vectors.
inline F32x16 reduce_add16(const F32x16* v) {
  __m512 s1[8], s2[4], s3[2];
  for (int k = 0; k < 8; ++k)  // (i, i + 8): v[2k] in 128-bit chunks 0-1, v[2k + 1] in 2-3
    s1[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * k].v, v[2 * k + 1].v, 0x44),
                          _mm512_shuffle_f32x4(v[2 * k].v, v[2 * k + 1].v, 0xEE));
  for (int k = 0; k < 4; ++k)  // (i, i + 4): chunk c holds v[4k + c]
    s2[k] = _mm512_add_ps(_mm512_shuffle_f32x4(s1[2 * k], s1[2 * k + 1], 0x88),
                          _mm512_shuffle_f32x4(s1[2 * k], s1[2 * k + 1], 0xDD));
  for (int k = 0; k < 2; ++k)  // (i, i + 2), within chunks
    s3[k] = _mm512_add_ps(_mm512_shuffle_ps(s2[2 * k], s2[2 * k + 1], 0x44), _mm512_shuffle_ps(s2[2 * k], s2[2 * k + 1], 0xEE));
  // (0, 1): lane 4c + r then holds v[4r + c]
  const __m512 s4 = _mm512_add_ps(_mm512_shuffle_ps(s3[0], s3[1], 0x88), _mm512_shuffle_ps(s3[0], s3[1], 0xDD));
  const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return {_mm512_permutexvar_ps(idx, s4)};
}

#ifdef __AVX512BF16__
constexpr bool kNativePairs = true;  // x pairs are broadcast from bf16 as they are
struct Pairs {  // the raw pairs: vdpbf16ps converts them itself
  __m512i v;
};
inline Pairs load_pairs(const bf16* p) { return {_mm512_loadu_si512(p)}; }
inline Pairs bcast_pair(const bf16* p) {
  int32_t pair;
  std::memcpy(&pair, p, sizeof(pair));
  return {_mm512_set1_epi32(pair)};
}
inline F32x16 dot_pairs(F32x16 acc, Pairs a, Pairs b) { return {_mm512_dpbf16_ps(acc.v, (__m512bh)a.v, (__m512bh)b.v)}; }
#else
struct Pairs {  // converted once at load: even = p[2i], odd = p[2i + 1] as float32
  F32x16 even, odd;
};
inline Pairs load_pairs(const bf16* p) {
  const __m512i u = _mm512_loadu_si512(p);
  return {{_mm512_castsi512_ps(_mm512_slli_epi32(u, 16))},
          {_mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32(static_cast<int>(0xffff0000u))))}};
}
constexpr bool kNativePairs = false;  // x pairs are broadcast from float32 (converted once per matmul)
inline Pairs bcast_pair(const float* p) { return {set1(p[0]), set1(p[1])}; }
inline F32x16 dot_pairs(F32x16 acc, Pairs a, Pairs b) { return fma(a.even, b.even, fma(a.odd, b.odd, acc)); }
#endif

}  // namespace kv::vec
