// The vector layer: every kernel is written once against these types and functions, and the
// library is compiled once per CPU level (ops/cpu_build.py), each build taking its implementation
// from one header:
//   vec_avx512.hpp  AVX-512 F/BW/VL/DQ (+ AVX512_BF16's dot product and rounding where compiled in)
//   vec_avx2.hpp    AVX2 + FMA + F16C: a 16-lane vector is two 256-bit halves
//   vec_neon.hpp    aarch64 NEON: four 128-bit quarters
//   vec_scalar.hpp  plain C++ arrays: any other target (and the definition the others must equal)
// Only AMX tile code (amx.cpp) is written per ISA by hand.
//
// What each implementation provides (namespace kv::vec):
//   F32x16                      16 float32 lanes
//   zero() set1(f) load(p) store(p, v)    p: const float* or const bf16* (bf16 <-> float32 in
//                               registers; stores round to nearest even, NaN stays NaN)
//   add sub mul div fma(a, b, c) = a * b + c (fused)  max min floor
//   round_bf16(v)               each lane rounded through bf16 (as store then load)
//   pow2(n)                     2^n for integral n in [-126, 127]
//   Mask lt(a, b) eq(a, b) unord(a, b)   masks are 16-bit lane sets (bit i = lane i) on every ISA
//   select(m, a, b)             lane i: m bit i ? a : b
//   reduce_add(v) reduce_max(v) the canonical tree: lanes (i, i + 8), then (i, i + 4), (i, i + 2),
//                               (0, 1); the same sums in the same order on every ISA
//   reduce_add16(v[16])         lane j = reduce_add(v[j]), the same tree
//   Pairs load_pairs(p)         32 bf16 at p as 16 pairs (p[2i], p[2i + 1])
//   Pairs bcast_pair(p)         the pair (p[0], p[1]) in every lane; p: bf16 where kNativePairs (the
//                               ISA's dot product takes bf16 pairs), else float32 (converted ahead)
//   dot_pairs(acc, a, b)        lane i: acc + a.odd * b.odd, then + a.even * b.even (each product of
//                               two bf16 is exact in float32, so this is AVX512_BF16's vdpbf16ps up to
//                               its flushing of denormals)
//   stream(p, v)                a float32 store that bypasses the caches where the ISA has one
//   load_i8(p)                  16 int8 at p as float32 (exact)
//   load_bits(p, shift, mask)   16 bytes at p: lane i = (p[i] >> shift) & mask as float32 (exact;
//                               shift 0..7): nibbles and bit fields of GGUF blocks (quant.cpp)
//   lut16(t, p, shift)          16 bytes at p: lane i = lane (p[i] >> shift) & 15 of t (a table)
//   load_f16(p)                 16 float16 (bits) at p as float32: exact, lane i = f16f(p[i]) (NaN
//                               quieted)
//   load_f16x2(p, stride, n, a, b)  lane i < n: a = the float16 at p + i * stride (bytes), b = the
//                               one after it, as load_f16 converts them; lanes past n 0 (GGUF blocks'
//                               scales: one gather where the ISA has it)
//   kIsa                        the level's name; kMatmulMr / kMatmulNr: the decode matmul's register
//                               tile (rows x 16-column blocks) for this ISA's register file;
//                               kMatmulMaxRows: the rows up to which it beats the library matmul;
//                               kQuantMr / kQuantNr: the GGUF block matmul's register tile (x rows
//                               x weight rows), kQuantMaxRows its measured crossover (quant.cpp);
//                               kLut16Fast: lut16 beats converting and scaling nibbles
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace kv {

typedef uint16_t bf16;

inline float bf2f(bf16 x) {
  uint32_t u = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline bf16 f2bf(float f) {  // round to nearest even, as torch does; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t nan = (u & 0x7fffffffu) > 0x7f800000u;
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<bf16>(nan ? ((u >> 16) | 0x40u) : rounded);
}

// float16 bits -> float32, exactly (numpy's astype; NaNs quieted, as F16C and NEON do).
inline float f16f(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  uint32_t u;
  if (e == 0x1f) {
    u = sign | 0x7f800000u | (m << 13) | (m ? 0x400000u : 0u);
  } else if (e != 0) {
    u = sign | ((e + 112) << 23) | (m << 13);
  } else {  // zero or subnormal: m * 2^-24, exact
    const float f = static_cast<float>(m) * 5.9604644775390625e-8f;
    std::memcpy(&u, &f, 4);
    u |= sign;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

namespace vec {
typedef uint32_t Mask;  // bit i: lane i
constexpr Mask kAll = 0xffffu;
inline Mask first_lanes(int64_t n) { return n >= 16 ? kAll : n <= 0 ? 0u : (1u << n) - 1u; }
}  // namespace vec

}  // namespace kv

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#include "vec_avx512.hpp"
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include "vec_avx2.hpp"
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include "vec_neon.hpp"
#else
#include "vec_scalar.hpp"
#endif

namespace kv::vec {

// Lanes 0..n-1 from p, the rest 0 (tails: n < 16).
template <typename T>
inline F32x16 load_n(const T* p, int64_t n) {
  if (n >= 16) return load(p);
  alignas(64) T t[16] = {};
  std::memcpy(t, p, std::max<int64_t>(n, 0) * sizeof(T));
  return load(t);
}

template <typename T>
inline void store_n(T* p, F32x16 v, int64_t n) {
  if (n >= 16) return store(p, v);
  alignas(64) T t[16];
  store(t, v);
  std::memcpy(p, t, std::max<int64_t>(n, 0) * sizeof(T));
}

// What bcast_pair reads: bf16 where the ISA's dot product takes bf16 pairs, else float32.
using PairScalar = std::conditional_t<kNativePairs, bf16, float>;

inline F32x16 maskz(Mask m, F32x16 v) { return select(m, v, zero()); }

// v rounded through the storage type T (identity for float32).
template <typename T>
inline F32x16 round_to(F32x16 v);
template <>
inline F32x16 round_to<float>(F32x16 v) { return v; }
template <>
inline F32x16 round_to<bf16>(F32x16 v) { return round_bf16(v); }

// e^x for x clamped to [-87.34, 100]: Cephes-style range reduction and a degree-6 polynomial
// (~1 ulp), 2^n applied in two steps so that each is a normal float (overflow gives inf).
inline F32x16 exp_in_range(F32x16 x) {
  const F32x16 n = floor(fma(x, set1(1.44269504088896341f), set1(0.5f)));
  const F32x16 r = fma(n, set1(2.12194440e-4f), fma(n, set1(-0.693359375f), x));
  F32x16 p = set1(1.9875691500e-4f);
  p = fma(p, r, set1(1.3981999507e-3f));
  p = fma(p, r, set1(8.3334519073e-3f));
  p = fma(p, r, set1(4.1665795894e-2f));
  p = fma(p, r, set1(1.6666665459e-1f));
  p = fma(p, r, set1(5.0000001201e-1f));
  const F32x16 y = add(fma(mul(p, r), r, r), set1(1.0f));
  const F32x16 half = floor(mul(n, set1(0.5f)));  // n = half + (n - half), both in [-63, 73]
  return mul(mul(y, pow2(half)), pow2(sub(n, half)));
}

// e^x: 0 below -87.34 (expf gives denormals there), inf on overflow, NaN for NaN.
inline F32x16 exp(F32x16 x0) {
  const F32x16 lo = set1(-87.33654f);
  const F32x16 v = exp_in_range(min(max(x0, lo), set1(100.0f)));
  return select(lt(x0, lo), zero(), select(unord(x0, x0), x0, v));
}

// e^x for x <= 0 (scores less their running max). Below -87.34 (-inf included) it returns
// e^-87.34 (~1.2e-38), not 0: callers mask those lanes.
inline F32x16 exp_nonpos(F32x16 x0) { return exp_in_range(max(x0, set1(-87.33654f))); }

}  // namespace kv::vec
