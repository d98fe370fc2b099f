// The vector layer on aarch64 NEON: a 16-lane vector is four 128-bit quarters. Included by
// vec.hpp only. (BFDOT is not used: it does not round as vdpbf16ps does.)
#pragma once

#include <arm_neon.h>

namespace kv::vec {

constexpr const char* kIsa = "neon";
// 32 q registers: 2 rows x 1 block = 8 accumulators + 8 for the weight pairs + 8 for x.
constexpr int64_t kMatmulMaxRows = 16;  // decode matmul's crossover (not measured on Arm yet)
constexpr int64_t kMatmulMr = 2, kMatmulNr = 1;
constexpr int64_t kQuantMr = 2, kQuantNr = 2, kQuantMaxRows = 16;  // GGUF block matmul (not measured on Arm)
constexpr bool kLut16Fast = false;  // (four TBLs per vector)

struct F32x16 {
  float32x4_t q[4];
};

#define KV_NEON_MAP(expr) {{expr(0), expr(1), expr(2), expr(3)}}

inline F32x16 set1(float f) {
  const float32x4_t v = vdupq_n_f32(f);
  return {{v, v, v, v}};
}
inline F32x16 zero() { return set1(0.0f); }
inline F32x16 load(const float* p) {
#define KV_Q(i) vld1q_f32(p + 4 * (i))
  return KV_NEON_MAP(KV_Q);
#undef KV_Q
}
inline F32x16 load(const bf16* p) {
#define KV_Q(i) vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p + 4 * (i)), 16))
  return KV_NEON_MAP(KV_Q);
#undef KV_Q
}

inline uint32x4_t bf16_bits32(float32x4_t v) {  // round to nearest even (as f2bf), low 16 bits
  const uint32x4_t u = vreinterpretq_u32_f32(v);
  const uint32x4_t lsb = vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1));
  const uint32x4_t r = vshrq_n_u32(vaddq_u32(vaddq_u32(u, vdupq_n_u32(0x7fff)), lsb), 16);
  const uint32x4_t quiet = vorrq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(0x40));
  const uint32x4_t is_num = vceqq_f32(v, v);
  return vbslq_u32(is_num, r, quiet);
}

inline void store(float* p, F32x16 a) {
  for (int i = 0; i < 4; ++i) vst1q_f32(p + 4 * i, a.q[i]);
}
inline void store(bf16* p, F32x16 a) {
  for (int i = 0; i < 4; ++i) vst1_u16(p + 4 * i, vmovn_u32(bf16_bits32(a.q[i])));
}
inline void stream(float* p, F32x16 a) { store(p, a); }
inline void stream_fence() {}

inline F32x16 round_bf16(F32x16 a) {
#define KV_Q(i) vreinterpretq_f32_u32(vshlq_n_u32(bf16_bits32(a.q[i]), 16))
  return KV_NEON_MAP(KV_Q);
#undef KV_Q
}

inline F32x16 load_i8(const int8_t* p) {
  const int8x16_t b = vld1q_s8(p);
  const int16x8_t lo = vmovl_s8(vget_low_s8(b)), hi = vmovl_s8(vget_high_s8(b));
  return {{vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))), vcvtq_f32_s32(vmovl_s16(vget_high_s16(lo))),
           vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))), vcvtq_f32_s32(vmovl_s16(vget_high_s16(hi)))}};
}
inline F32x16 load_bits(const uint8_t* p, int shift, int mask) {
  const uint8x16_t b = vandq_u8(vshlq_u8(vld1q_u8(p), vdupq_n_s8(static_cast<int8_t>(-shift))),
                                vdupq_n_u8(static_cast<uint8_t>(mask)));
  const uint16x8_t lo = vmovl_u8(vget_low_u8(b)), hi = vmovl_u8(vget_high_u8(b));
  return {{vcvtq_f32_u32(vmovl_u16(vget_low_u16(lo))), vcvtq_f32_u32(vmovl_u16(vget_high_u16(lo))),
           vcvtq_f32_u32(vmovl_u16(vget_low_u16(hi))), vcvtq_f32_u32(vmovl_u16(vget_high_u16(hi)))}};
}
// TBL over t's 64 bytes: lane i's four bytes at 4 * index + 0..3.
inline F32x16 lut16(F32x16 t, const uint8_t* p, int shift) {
  const uint8x16x4_t bytes = {{vreinterpretq_u8_f32(t.q[0]), vreinterpretq_u8_f32(t.q[1]), vreinterpretq_u8_f32(t.q[2]),
                               vreinterpretq_u8_f32(t.q[3])}};
  const uint8x16_t nibbles = vandq_u8(vshlq_u8(vld1q_u8(p), vdupq_n_s8(static_cast<int8_t>(-shift))), vdupq_n_u8(15));
  const uint8x16_t idx4 = vshlq_n_u8(nibbles, 2);
  const uint8x16_t within = {0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3};
  F32x16 r;
  for (int i = 0; i < 4; ++i) {
    const uint8x16_t spread = vaddq_u8(vdupq_n_u8(static_cast<uint8_t>(4 * i)),
                                       uint8x16_t{0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3});
    r.q[i] = vreinterpretq_f32_u8(vqtbl4q_u8(bytes, vaddq_u8(vqtbl1q_u8(idx4, spread), within)));
  }
  return r;
}
inline F32x16 load_f16(const uint16_t* p) {
#define KV_Q(i) vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p + 4 * (i))))
  return KV_NEON_MAP(KV_Q);
#undef KV_Q
}
inline void load_f16x2(const uint8_t* p, int64_t stride, int n, F32x16& a, F32x16& b) {
  uint16_t h[2][16] = {};
  for (int i = 0; i < n; ++i) std::memcpy(&h[0][i], p + i * stride, 2), std::memcpy(&h[1][i], p + i * stride + 2, 2);
  a = load_f16(h[0]), b = load_f16(h[1]);
}

#define KV_NEON_BINARY(name, op)                    \
  inline F32x16 name(F32x16 a, F32x16 b) {          \
    F32x16 r;                                       \
    for (int i = 0; i < 4; ++i) r.q[i] = op(a.q[i], b.q[i]); \
    return r;                                       \
  }
KV_NEON_BINARY(add, vaddq_f32)
KV_NEON_BINARY(sub, vsubq_f32)
KV_NEON_BINARY(mul, vmulq_f32)
KV_NEON_BINARY(div, vdivq_f32)
KV_NEON_BINARY(max, vmaxq_f32)
KV_NEON_BINARY(min, vminq_f32)
#undef KV_NEON_BINARY
inline F32x16 fma(F32x16 a, F32x16 b, F32x16 c) {
  F32x16 r;
  for (int i = 0; i < 4; ++i) r.q[i] = vfmaq_f32(c.q[i], a.q[i], b.q[i]);
  return r;
}
inline F32x16 floor(F32x16 a) {
  F32x16 r;
  for (int i = 0; i < 4; ++i) r.q[i] = vrndmq_f32(a.q[i]);
  return r;
}
inline F32x16 pow2(F32x16 n) {
  F32x16 r;
  for (int i = 0; i < 4; ++i)
    r.q[i] = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n.q[i]), vdupq_n_s32(127)), 23));
  return r;
}

inline Mask bits_of(uint32x4_t m, int shift) {
  const uint32x4_t weights = {1u, 2u, 4u, 8u};
  return vaddvq_u32(vandq_u32(m, weights)) << shift;
}
inline Mask lt(F32x16 a, F32x16 b) {
  Mask m = 0;
  for (int i = 0; i < 4; ++i) m |= bits_of(vcltq_f32(a.q[i], b.q[i]), 4 * i);
  return m;
}
inline Mask eq(F32x16 a, F32x16 b) {
  Mask m = 0;
  for (int i = 0; i < 4; ++i) m |= bits_of(vceqq_f32(a.q[i], b.q[i]), 4 * i);
  return m;
}
inline Mask unord(F32x16 a, F32x16 b) {
  Mask m = 0;
  for (int i = 0; i < 4; ++i)
    m |= bits_of(vmvnq_u32(vandq_u32(vceqq_f32(a.q[i], a.q[i]), vceqq_f32(b.q[i], b.q[i]))), 4 * i);
  return m;
}
inline F32x16 select(Mask m, F32x16 a, F32x16 b) {
  const uint32x4_t bit = {1u, 2u, 4u, 8u};
  F32x16 r;
  for (int i = 0; i < 4; ++i) {
    const uint32x4_t lanes = vtstq_u32(vdupq_n_u32(m >> (4 * i)), bit);
    r.q[i] = vbslq_f32(lanes, a.q[i], b.q[i]);
  }
  return r;
}

inline float reduce_add(F32x16 a) {  // (i, i + 8), (i, i + 4), (i, i + 2), (0, 1)
  const float32x4_t t2 = vaddq_f32(vaddq_f32(a.q[0], a.q[2]), vaddq_f32(a.q[1], a.q[3]));
  const float32x2_t t3 = vadd_f32(vget_low_f32(t2), vget_high_f32(t2));
  return vget_lane_f32(t3, 0) + vget_lane_f32(t3, 1);
}
inline float reduce_max(F32x16 a) {
  const float32x4_t t2 = vmaxq_f32(vmaxq_f32(a.q[0], a.q[2]), vmaxq_f32(a.q[1], a.q[3]));
  const float32x2_t t3 = vmax_f32(vget_low_f32(t2), vget_high_f32(t2));
  return std::max(vget_lane_f32(t3, 0), vget_lane_f32(t3, 1));
}
inline F32x16 reduce_add16(const F32x16* v) {
  alignas(64) float t[16];
  for (int j = 0; j < 16; ++j) t[j] = reduce_add(v[j]);
  return load(t);
}

struct Pairs {  // converted once at load: even = p[2i], odd = p[2i + 1] as float32
  F32x16 even, odd;
};
inline Pairs load_pairs(const bf16* p) {
  Pairs r;
  for (int i = 0; i < 4; ++i) {
    const uint32x4_t u = vld1q_u32(reinterpret_cast<const uint32_t*>(p + 8 * i));
    r.even.q[i] = vreinterpretq_f32_u32(vshlq_n_u32(u, 16));
    r.odd.q[i] = vreinterpretq_f32_u32(vandq_u32(u, vdupq_n_u32(0xffff0000u)));
  }
  return r;
}
constexpr bool kNativePairs = false;  // x pairs are broadcast from float32 (converted once per matmul)
inline Pairs bcast_pair(const float* p) { return {set1(p[0]), set1(p[1])}; }
inline F32x16 dot_pairs(F32x16 acc, Pairs a, Pairs b) { return fma(a.even, b.even, fma(a.odd, b.odd, acc)); }

#undef KV_NEON_MAP

}  // namespace kv::vec
