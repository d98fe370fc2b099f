// The vector layer in plain C++: 16 floats in an array. Builds on any target; it is also the
// definition the ISA headers must equal (the self-test in selftest.cpp compares them with it).
// Included by vec.hpp only.
#pragma once

namespace kv::vec {

constexpr const char* kIsa = "scalar";
constexpr int64_t kMatmulMaxRows = 4;  // decode matmul's crossover (not measured)
constexpr int64_t kMatmulMr = 2, kMatmulNr = 1;
constexpr int64_t kQuantMr = 2, kQuantNr = 2, kQuantMaxRows = 4;  // GGUF block matmul (not measured)
constexpr bool kLut16Fast = false;

struct F32x16 {
  float f[16];
};

#define KV_LANES(expr)                        \
  F32x16 r;                                   \
  for (int i = 0; i < 16; ++i) r.f[i] = expr; \
  return r

inline F32x16 set1(float x) { KV_LANES(x); }
inline F32x16 zero() { return set1(0.0f); }
inline F32x16 load(const float* p) { KV_LANES(p[i]); }
inline F32x16 load(const bf16* p) { KV_LANES(bf2f(p[i])); }
inline void store(float* p, F32x16 a) { std::memcpy(p, a.f, sizeof(a.f)); }
inline void store(bf16* p, F32x16 a) {
  for (int i = 0; i < 16; ++i) p[i] = f2bf(a.f[i]);
}
inline void stream(float* p, F32x16 a) { store(p, a); }
inline void stream_fence() {}
inline F32x16 round_bf16(F32x16 a) { KV_LANES(bf2f(f2bf(a.f[i]))); }
inline F32x16 load_i8(const int8_t* p) { KV_LANES(static_cast<float>(p[i])); }
inline F32x16 load_bits(const uint8_t* p, int shift, int mask) { KV_LANES(static_cast<float>((p[i] >> shift) & mask)); }
inline F32x16 lut16(F32x16 t, const uint8_t* p, int shift) { KV_LANES(t.f[(p[i] >> shift) & 15]); }
inline F32x16 load_f16(const uint16_t* p) { KV_LANES(f16f(p[i])); }
inline void load_f16x2(const uint8_t* p, int64_t stride, int n, F32x16& a, F32x16& b) {
  uint16_t h[2][16] = {};
  for (int i = 0; i < n; ++i) std::memcpy(&h[0][i], p + i * stride, 2), std::memcpy(&h[1][i], p + i * stride + 2, 2);
  a = load_f16(h[0]), b = load_f16(h[1]);
}

inline F32x16 add(F32x16 a, F32x16 b) { KV_LANES(a.f[i] + b.f[i]); }
inline F32x16 sub(F32x16 a, F32x16 b) { KV_LANES(a.f[i] - b.f[i]); }
inline F32x16 mul(F32x16 a, F32x16 b) { KV_LANES(a.f[i] * b.f[i]); }
inline F32x16 div(F32x16 a, F32x16 b) { KV_LANES(a.f[i] / b.f[i]); }
inline F32x16 fma(F32x16 a, F32x16 b, F32x16 c) { KV_LANES(std::fma(a.f[i], b.f[i], c.f[i])); }
// As the SIMD instructions: the second operand when either is NaN.
inline F32x16 max(F32x16 a, F32x16 b) { KV_LANES(a.f[i] > b.f[i] ? a.f[i] : b.f[i]); }
inline F32x16 min(F32x16 a, F32x16 b) { KV_LANES(a.f[i] < b.f[i] ? a.f[i] : b.f[i]); }
inline F32x16 floor(F32x16 a) { KV_LANES(std::floor(a.f[i])); }
inline F32x16 pow2(F32x16 n) {
  F32x16 r;
  for (int i = 0; i < 16; ++i) {
    const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n.f[i]) + 127) << 23;
    std::memcpy(&r.f[i], &bits, 4);
  }
  return r;
}
#undef KV_LANES

inline Mask lt(F32x16 a, F32x16 b) {
  Mask m = 0;
  for (int i = 0; i < 16; ++i) m |= static_cast<Mask>(a.f[i] < b.f[i]) << i;
  return m;
}
inline Mask eq(F32x16 a, F32x16 b) {
  Mask m = 0;
  for (int i = 0; i < 16; ++i) m |= static_cast<Mask>(a.f[i] == b.f[i]) << i;
  return m;
}
inline Mask unord(F32x16 a, F32x16 b) {
  Mask m = 0;
  for (int i = 0; i < 16; ++i) m |= static_cast<Mask>(std::isnan(a.f[i]) || std::isnan(b.f[i])) << i;
  return m;
}
inline F32x16 select(Mask m, F32x16 a, F32x16 b) {
  F32x16 r;
  for (int i = 0; i < 16; ++i) r.f[i] = (m >> i) & 1u ? a.f[i] : b.f[i];
  return r;
}

inline float reduce_add(F32x16 a) {  // (i, i + 8), (i, i + 4), (i, i + 2), (0, 1)
  for (int w = 8; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) a.f[i] = a.f[i] + a.f[i + w];
  return a.f[0];
}
inline float reduce_max(F32x16 a) {
  for (int w = 8; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) a.f[i] = a.f[i] > a.f[i + w] ? a.f[i] : a.f[i + w];
  return a.f[0];
}
inline F32x16 reduce_add16(const F32x16* v) {
  F32x16 r;
  for (int j = 0; j < 16; ++j) r.f[j] = reduce_add(v[j]);
  return r;
}

struct Pairs {
  F32x16 even, odd;
};
inline Pairs load_pairs(const bf16* p) {
  Pairs r;
  for (int i = 0; i < 16; ++i) {
    r.even.f[i] = bf2f(p[2 * i]);
    r.odd.f[i] = bf2f(p[2 * i + 1]);
  }
  return r;
}
constexpr bool kNativePairs = false;  // x pairs are broadcast from float32 (converted once per matmul)
inline Pairs bcast_pair(const float* p) { return {set1(p[0]), set1(p[1])}; }
inline F32x16 dot_pairs(F32x16 acc, Pairs a, Pairs b) { return fma(a.even, b.even, fma(a.odd, b.odd, acc)); }

}  // namespace kv::vec
