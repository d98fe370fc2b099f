// The vector layer on AVX2 + FMA + F16C: a 16-lane vector is two 256-bit halves (lanes 0-7 in
// lo, 8-15 in hi), as vLLM's AVX2 build does. Included by vec.hpp only.
#pragma once

#include <immintrin.h>

namespace kv::vec {

constexpr const char* kIsa = "avx2";
// 16 ymm registers: 4 rows x 1 block = 8 accumulators + 4 for the weight pairs + 2 for x.
// The decode matmul's crossover with float32_gemm (layers/linear.py), default model's linears x 30
// layers, AVX2 emulated on a Xeon: 16 rows 41.8 vs 75.1 ms, 48 rows 110 vs 118, 64 rows 143 vs 145.
constexpr int64_t kMatmulMaxRows = 48;
constexpr int64_t kMatmulMr = 4, kMatmulNr = 1;
// GGUF block matmul (quant.cpp): 2 x 3 outputs. Its crossover with dequantizing + MKL's GEMM (AVX2
// emulated on a Xeon: MKL_ENABLE_INSTRUCTIONS=AVX2), default model, 30 layers' linears in Q4_1: 32
// rows 70.8 vs 74.2 ms, 48 rows 97.7 vs 88.5; its LM head in Q8_0: 64 rows 33.8 vs 35.6 ms, 96
// rows 51.1 vs 46.7.
constexpr int64_t kQuantMr = 2, kQuantNr = 3, kQuantMaxRows = 32;
constexpr bool kLut16Fast = false;  // lut16: two vpermps and a blend per half; converting: 10 vs 15 cycles a block

struct F32x16 {
  __m256 lo, hi;
};

inline F32x16 zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline F32x16 set1(float f) { return {_mm256_set1_ps(f), _mm256_set1_ps(f)}; }
inline F32x16 load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline __m256 bf16x8_to_f32(const bf16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
inline F32x16 load(const bf16* p) { return {bf16x8_to_f32(p), bf16x8_to_f32(p + 8)}; }

// Eight lanes rounded to bf16 (as f2bf), left in the low 16 bits of each 32-bit lane.
inline __m256i bf16_bits32(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(quiet), nan));
}

inline void store(float* p, F32x16 a) {
  _mm256_storeu_ps(p, a.lo);
  _mm256_storeu_ps(p + 8, a.hi);
}
inline void store(bf16* p, F32x16 a) {
  // packus works within 128-bit lanes: [lo 0-3, hi 0-3, lo 4-7, hi 4-7]; permute the quads back.
  const __m256i packed = _mm256_packus_epi32(bf16_bits32(a.lo), bf16_bits32(a.hi));
  _mm256_storeu_si256((__m256i*)p, _mm256_permute4x64_epi64(packed, 0xD8));
}
inline void stream(float* p, F32x16 a) {  // p 32-byte aligned
  _mm256_stream_ps(p, a.lo);
  _mm256_stream_ps(p + 8, a.hi);
}
inline void stream_fence() { _mm_sfence(); }

inline F32x16 round_bf16(F32x16 a) {
  return {_mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits32(a.lo), 16)),
          _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits32(a.hi), 16))};
}

inline F32x16 load_i8(const int8_t* p) {
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p))),
          _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8))))};
}
inline __m256 bits8(const uint8_t* p, __m128i shift, __m256i mask) {
  const __m256i u = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
  return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srl_epi32(u, shift), mask));
}
inline F32x16 load_bits(const uint8_t* p, int shift, int mask) {
  const __m128i s = _mm_cvtsi32_si128(shift);
  const __m256i m = _mm256_set1_epi32(mask);
  return {bits8(p, s, m), bits8(p + 8, s, m)};
}
// Eight lanes of t[idx & 15]: vpermps reads the low 3 bits; bit 3, moved to the sign, picks the half.
inline __m256 lut8(F32x16 t, __m256i idx) {
  const __m256 a = _mm256_permutevar8x32_ps(t.lo, idx), b = _mm256_permutevar8x32_ps(t.hi, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}
inline F32x16 lut16(F32x16 t, const uint8_t* p, int shift) {
  const __m128i s = _mm_cvtsi32_si128(shift);
  return {lut8(t, _mm256_srl_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)), s)),
          lut8(t, _mm256_srl_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8))), s))};
}
inline F32x16 load_f16(const uint16_t* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)),
          _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + 8)))};
}
inline __m256i gather8(const uint8_t* p, int first, int64_t stride, int n) {  // dwords at p + i * stride
  const __m256i lanes = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(first));
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lanes);  // i < n
  const __m256i at = _mm256_mullo_epi32(lanes, _mm256_set1_epi32(static_cast<int>(stride)));
  return _mm256_mask_i32gather_epi32(_mm256_setzero_si256(), (const int*)p, at, mask, 1);
}
inline void load_f16x2(const uint8_t* p, int64_t stride, int n, F32x16& a, F32x16& b) {
  const __m256i lo = gather8(p, 0, stride, n), hi = gather8(p, 8, stride, n), low16 = _mm256_set1_epi32(0xffff);
  // packus works within 128-bit lanes; the halves of each 128-bit lane of the result are lo's and hi's
  const __m256i first = _mm256_packus_epi32(_mm256_and_si256(lo, low16), _mm256_and_si256(hi, low16));
  const __m256i second = _mm256_packus_epi32(_mm256_srli_epi32(lo, 16), _mm256_srli_epi32(hi, 16));
  a = {_mm256_cvtph_ps(_mm_unpacklo_epi64(_mm256_castsi256_si128(first), _mm256_extracti128_si256(first, 1))),
       _mm256_cvtph_ps(_mm_unpackhi_epi64(_mm256_castsi256_si128(first), _mm256_extracti128_si256(first, 1)))};
  b = {_mm256_cvtph_ps(_mm_unpacklo_epi64(_mm256_castsi256_si128(second), _mm256_extracti128_si256(second, 1))),
       _mm256_cvtph_ps(_mm_unpackhi_epi64(_mm256_castsi256_si128(second), _mm256_extracti128_si256(second, 1)))};
}

#define KV_AVX2_BINARY(name, op) \
  inline F32x16 name(F32x16 a, F32x16 b) { return {op(a.lo, b.lo), op(a.hi, b.hi)}; }
KV_AVX2_BINARY(add, _mm256_add_ps)
KV_AVX2_BINARY(sub, _mm256_sub_ps)
KV_AVX2_BINARY(mul, _mm256_mul_ps)
KV_AVX2_BINARY(div, _mm256_div_ps)
KV_AVX2_BINARY(max, _mm256_max_ps)
KV_AVX2_BINARY(min, _mm256_min_ps)
#undef KV_AVX2_BINARY
inline F32x16 fma(F32x16 a, F32x16 b, F32x16 c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline F32x16 floor(F32x16 a) { return {_mm256_floor_ps(a.lo), _mm256_floor_ps(a.hi)}; }
inline __m256 pow2_8(__m256 n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline F32x16 pow2(F32x16 n) { return {pow2_8(n.lo), pow2_8(n.hi)}; }

template <int kCmp>
inline Mask compare(F32x16 a, F32x16 b) {
  return static_cast<Mask>(_mm256_movemask_ps(_mm256_cmp_ps(a.lo, b.lo, kCmp)) |
                           (_mm256_movemask_ps(_mm256_cmp_ps(a.hi, b.hi, kCmp)) << 8));
}
inline Mask lt(F32x16 a, F32x16 b) { return compare<_CMP_LT_OQ>(a, b); }
inline Mask eq(F32x16 a, F32x16 b) { return compare<_CMP_EQ_OQ>(a, b); }
inline Mask unord(F32x16 a, F32x16 b) { return compare<_CMP_UNORD_Q>(a, b); }
inline __m256 lanes_of(uint32_t bits8) {  // bit i -> all-ones lane i
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits8)), bit), bit));
}
inline F32x16 select(Mask m, F32x16 a, F32x16 b) {
  if (m == kAll) return a;
  if (m == 0) return b;
  return {_mm256_blendv_ps(b.lo, a.lo, lanes_of(m & 0xffu)), _mm256_blendv_ps(b.hi, a.hi, lanes_of(m >> 8))};
}

inline float reduce8_add(__m256 t1) {  // after (i, i + 8): (i, i + 4), (i, i + 2), (0, 1)
  const __m128 t2 = _mm_add_ps(_mm256_castps256_ps128(t1), _mm256_extractf128_ps(t1, 1));
  const __m128 t3 = _mm_add_ps(t2, _mm_movehl_ps(t2, t2));
  return _mm_cvtss_f32(_mm_add_ss(t3, _mm_movehdup_ps(t3)));
}
inline float reduce_add(F32x16 a) { return reduce8_add(_mm256_add_ps(a.lo, a.hi)); }
inline float reduce_max(F32x16 a) {
  const __m256 t1 = _mm256_max_ps(a.lo, a.hi);
  const __m128 t2 = _mm_max_ps(_mm256_castps256_ps128(t1), _mm256_extractf128_ps(t1, 1));
  const __m128 t3 = _mm_max_ps(t2, _mm_movehl_ps(t2, t2));
  return _mm_cvtss_f32(_mm_max_ss(t3, _mm_movehdup_ps(t3)));
}

// Lane j = reduce_add(v[j]), the same tree: (i, i + 8) per vector, then (i, i + 4) across 128-bit
// halves, (i, i + 2) and (0, 1) within them.
inline F32x16 reduce_add16(const F32x16* v) {
  __m256 s1[16], s2[8], s3[4], s4[2];
  for (int k = 0; k < 16; ++k) s1[k] = _mm256_add_ps(v[k].lo, v[k].hi);
  for (int k = 0; k < 8; ++k)  // half 0: v[2k], half 1: v[2k + 1]
    s2[k] = _mm256_add_ps(_mm256_permute2f128_ps(s1[2 * k], s1[2 * k + 1], 0x20),
                          _mm256_permute2f128_ps(s1[2 * k], s1[2 * k + 1], 0x31));
  for (int k = 0; k < 4; ++k)  // half c: [v[4k + c] x2, v[4k + 2 + c] x2]
    s3[k] = _mm256_add_ps(_mm256_shuffle_ps(s2[2 * k], s2[2 * k + 1], 0x44), _mm256_shuffle_ps(s2[2 * k], s2[2 * k + 1], 0xEE));
  for (int k = 0; k < 2; ++k)  // half c, lane r: v[8k + 2r + c]
    s4[k] = _mm256_add_ps(_mm256_shuffle_ps(s3[2 * k], s3[2 * k + 1], 0x88), _mm256_shuffle_ps(s3[2 * k], s3[2 * k + 1], 0xDD));
  const __m256i idx = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  return {_mm256_permutevar8x32_ps(s4[0], idx), _mm256_permutevar8x32_ps(s4[1], idx)};
}

struct Pairs {  // converted once at load: even = p[2i], odd = p[2i + 1] as float32
  F32x16 even, odd;
};
inline Pairs load_pairs(const bf16* p) {
  const __m256i a = _mm256_loadu_si256((const __m256i*)p), b = _mm256_loadu_si256((const __m256i*)(p + 16));
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  return {{_mm256_castsi256_ps(_mm256_slli_epi32(a, 16)), _mm256_castsi256_ps(_mm256_slli_epi32(b, 16))},
          {_mm256_castsi256_ps(_mm256_and_si256(a, high)), _mm256_castsi256_ps(_mm256_and_si256(b, high))}};
}
constexpr bool kNativePairs = false;  // x pairs are broadcast from float32 (converted once per matmul)
inline Pairs bcast_pair(const float* p) { return {set1(p[0]), set1(p[1])}; }
inline F32x16 dot_pairs(F32x16 acc, Pairs a, Pairs b) { return fma(a.even, b.even, fma(a.odd, b.odd, acc)); }

}  // namespace kv::vec
