// GGUF block types as quant.cpp decodes them, over the vector layer. Each type turns chunk c
// (32 consecutive values, c < kBlock / 32) of one block into two vectors of float32 with the
// arithmetic of gguf-py's dequantize_blocks (gguf/quants.py), operation for operation: scales
// float16 -> float32, integers exact in float32, then its multiplies and adds, each rounded on its
// own (mul, add, sub). Every product there is exact (a float16's 11 significant bits times
// integers: at most 23 bits), so only the final add or subtract rounds; a fused multiply-add
// rounds that same sum the same way, which the matmul's decode<true> uses (mul_add). The values
// are gguf-py's bit for bit either way (tests/unit/test_quant_kernels.py checks both).
// Layouts (ggml's block_q*, little-endian; f16 = float16 bits):
//   Q4_0 (2)  18 B: d f16, qs[16]: value j = d * ((qs[j] & 15) - 8), j + 16: (qs[j] >> 4)
//   Q4_1 (3)  20 B: d, m f16, qs[16]: (d * q) + m, q the nibbles as in Q4_0
//   Q8_0 (8)  34 B: d f16, qs[32] int8: qs[j] * d
//   Q4_K (12) 144 B: d, dmin f16, scales[12] (8 pairs of 6-bit scale, min), qs[128]: sub-block j
//             (32 values) = (d * sc_j) * q - (dmin * m_j), q the low (j even) or high (j odd)
//             nibbles of qs[32 (j / 2) ..]
//   Q5_K (13) 176 B: d, dmin, scales[12], qh[32], qs[128]: as Q4_K with q += 16 * bit j of qh[l]
//   Q6_K (14) 210 B: ql[128], qh[64], scales[16] int8, d f16: value e = 128 h + 32 s + l (h < 2,
//             s < 4, l < 32) = (d * scales[e / 16]) * (q - 32), q = nibble s / 2 of
//             ql[64 h + 32 (s % 2) + l] | bits 2s, 2s + 1 of qh[32 h + l] << 4
// and kvserve's own, for AWQ / GPTQ int4 (asymmetric, group 128; not a GGML type):
//   Q4_Z (100) 68 B: d f16, z uint8, pad, qs[64]: chunk c (32 values) = d * (q - z), q the nibbles
//             of qs[16 c ..] as in Q4_0 (q - z an integer in [-16, 15]: every value exact)
#pragma once

#include "vec.hpp"

namespace kv::quant {
using namespace kv::vec;

// Each type: kType, kBlock values in kBytes bytes, kChunks = kBlock / 32 chunks per block, kGroup
// blocks (16 chunks) whose scale factors are converted together:
//   scales(b, n, s)           the float32 scale factors of the n <= kGroup blocks at b into s[32]
//                             (vectors of float16 converted at once, not one broadcast per block)
//   decode(b, c, s, g, w0, w1) chunk c of the block at b, chunk g of its group (s from scales);
//                             decode<true>: the matmul's, with fma where that is the same (mul_add)
// 4-bit types decode, where lut16 is fast (kLut16Fast), through a table of the block's (or
// sub-block's) 16 values, each computed as gguf-py computes it, looked up by nibble: one multiply
// and add per block, not per value (the same values: AVX-512 M=1 5.5 vs 7.5 cycles per block).

// d * q + m: gguf-py's multiply then add, or (kFma, the matmul) one fma. The same value wherever d * q
// is exact, as it is in every use here (a float16 times integers: at most 23 significant bits), so
// fma rounds the one sum as the add does (and a zero's sign is the add's): 7-9% faster at M = 1.
template <bool kFma>
inline F32x16 mul_add(F32x16 d, F32x16 q, F32x16 m) {
  if constexpr (kFma) return fma(d, q, m);
  else return add(mul(d, q), m);
}
// d * q - m, likewise: fma(d, q, -m) is the same sum.
template <bool kFma>
inline F32x16 mul_sub(F32x16 d, F32x16 q, F32x16 m) {
  if constexpr (kFma) return fma(d, q, mul(m, set1(-1.0f)));
  else return sub(mul(d, q), m);
}

inline F32x16 iota16(float from) {  // from, from + 1, ..., from + 15
  alignas(64) static const float v[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  return add(load(v), set1(from));
}

// The leading float16 d of n blocks of kBytes bytes (Q4_0, Q8_0): s[i] = d of block i.
template <int kBytes>
inline void scale_d(const uint8_t* b, int n, float* s) {
  F32x16 d, unused;
  load_f16x2(b, kBytes, n, d, unused);
  store(s, d);
}

struct Q4_0 {
  static constexpr int kType = 2, kBlock = 32, kBytes = 18, kChunks = 1, kGroup = 16;
  static void scales(const uint8_t* b, int n, float* s) { scale_d<kBytes>(b, n, s); }
  template <bool kFma = false>
  static void decode(const uint8_t* b, int, const float* s, int g, F32x16& w0, F32x16& w1) {
    const F32x16 d = set1(s[g]);
    if constexpr (kLut16Fast) {
      const F32x16 t = mul(d, iota16(-8.0f));  // t[q] = d * (q - 8)
      w0 = lut16(t, b + 2, 0);
      w1 = lut16(t, b + 2, 4);
    } else {
      w0 = mul(d, sub(load_bits(b + 2, 0, 15), set1(8.0f)));
      w1 = mul(d, sub(load_bits(b + 2, 4, 15), set1(8.0f)));
    }
  }
};

struct Q4_1 {
  static constexpr int kType = 3, kBlock = 32, kBytes = 20, kChunks = 1, kGroup = 16;
  static void scales(const uint8_t* b, int n, float* s) {
    F32x16 d, m;
    load_f16x2(b, kBytes, n, d, m);
    store(s, d);
    store(s + 16, m);
  }
  template <bool kFma = false>
  static void decode(const uint8_t* b, int, const float* s, int g, F32x16& w0, F32x16& w1) {
    const F32x16 d = set1(s[g]), m = set1(s[16 + g]);
    if constexpr (kLut16Fast) {
      const F32x16 t = mul_add<kFma>(d, iota16(0.0f), m);  // t[q] = (d * q) + m
      w0 = lut16(t, b + 4, 0);
      w1 = lut16(t, b + 4, 4);
    } else {
      w0 = mul_add<kFma>(d, load_bits(b + 4, 0, 15), m);
      w1 = mul_add<kFma>(d, load_bits(b + 4, 4, 15), m);
    }
  }
};

struct Q8_0 {
  static constexpr int kType = 8, kBlock = 32, kBytes = 34, kChunks = 1, kGroup = 16;
  static void scales(const uint8_t* b, int n, float* s) { scale_d<kBytes>(b, n, s); }
  template <bool kFma = false>
  static void decode(const uint8_t* b, int, const float* s, int g, F32x16& w0, F32x16& w1) {
    const F32x16 d = set1(s[g]);
    w0 = mul(load_i8(reinterpret_cast<const int8_t*>(b + 2)), d);
    w1 = mul(load_i8(reinterpret_cast<const int8_t*>(b + 18)), d);
  }
};

// Sub-block j's 6-bit scale and min from Q4_K / Q5_K's 12 scale bytes (gguf-py's get_scale_min).
inline void scale_min_k4(const uint8_t* s, int j, uint8_t& sc, uint8_t& mn) {
  if (j < 4) {
    sc = s[j] & 63;
    mn = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 15) | ((s[j - 4] >> 2) & 0x30);
    mn = (s[j + 4] >> 4) | ((s[j] >> 2) & 0x30);
  }
}

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return f16f(h);
}

// Q4_K / Q5_K: s[g] = d * sc, s[16 + g] = dmin * m of sub-block (chunk) g.
template <int kBytes>
inline void scales_k4(const uint8_t* b, int n, float* s) {
  alignas(16) uint8_t sc[16] = {}, mn[16] = {};
  alignas(64) float d[16] = {}, dmin[16] = {};
  for (int i = 0; i < n; ++i) {
    const float di = half_at(b + i * kBytes), dmi = half_at(b + i * kBytes + 2);
    for (int j = 0; j < 8; ++j) {
      scale_min_k4(b + i * kBytes + 4, j, sc[8 * i + j], mn[8 * i + j]);
      d[8 * i + j] = di, dmin[8 * i + j] = dmi;
    }
  }
  store(s, mul(load(d), load_bits(sc, 0, 255)));
  store(s + 16, mul(load(dmin), load_bits(mn, 0, 255)));
}

struct Q4_K {
  static constexpr int kType = 12, kBlock = 256, kBytes = 144, kChunks = 8, kGroup = 2;
  static void scales(const uint8_t* b, int n, float* s) { scales_k4<kBytes>(b, n, s); }
  template <bool kFma = false>
  static void decode(const uint8_t* b, int c, const float* s, int g, F32x16& w0, F32x16& w1) {
    const F32x16 d = set1(s[g]), dm = set1(s[16 + g]);
    const uint8_t* q = b + 16 + 32 * (c / 2);
    if constexpr (kLut16Fast) {
      const F32x16 t = mul_sub<kFma>(d, iota16(0.0f), dm);  // t[q] = (d * sc) * q - dmin * m
      w0 = lut16(t, q, 4 * (c % 2));
      w1 = lut16(t, q + 16, 4 * (c % 2));
    } else {
      w0 = mul_sub<kFma>(d, load_bits(q, 4 * (c % 2), 15), dm);
      w1 = mul_sub<kFma>(d, load_bits(q + 16, 4 * (c % 2), 15), dm);
    }
  }
};

struct Q5_K {
  static constexpr int kType = 13, kBlock = 256, kBytes = 176, kChunks = 8, kGroup = 2;
  static void scales(const uint8_t* b, int n, float* s) { scales_k4<kBytes>(b, n, s); }
  template <bool kFma = false>
  static void decode(const uint8_t* b, int c, const float* s, int g, F32x16& w0, F32x16& w1) {
    const F32x16 d = set1(s[g]), dm = set1(s[16 + g]), sixteen = set1(16.0f);
    const uint8_t *qh = b + 16, *ql = b + 48 + 32 * (c / 2);
    const F32x16 q0 = add(load_bits(ql, 4 * (c % 2), 15), mul(load_bits(qh, c, 1), sixteen));  // ql | qh << 4
    const F32x16 q1 = add(load_bits(ql + 16, 4 * (c % 2), 15), mul(load_bits(qh + 16, c, 1), sixteen));
    w0 = mul_sub<kFma>(d, q0, dm);
    w1 = mul_sub<kFma>(d, q1, dm);
  }
};

// s[16 i + j] = d * scales[j] of block i: chunk g = 8 i + c takes s[2 g], s[2 g + 1].
struct Q6_K {
  static constexpr int kType = 14, kBlock = 256, kBytes = 210, kChunks = 8, kGroup = 2;
  static void scales(const uint8_t* b, int n, float* s) {
    for (int i = 0; i < n; ++i) {
      const uint8_t* blk = b + i * kBytes;
      store(s + 16 * i, mul(set1(half_at(blk + 208)), load_i8(reinterpret_cast<const int8_t*>(blk + 192))));
    }
  }
  template <bool kFma = false>
  static void decode(const uint8_t* b, int c, const float* s, int g, F32x16& w0, F32x16& w1) {
    const int h = c / 4, r = c % 4;
    const uint8_t *ql = b + 64 * h + 32 * (r % 2), *qh = b + 128 + 32 * h;
    const F32x16 sixteen = set1(16.0f), bias = set1(32.0f);
    const F32x16 q0 = sub(add(load_bits(ql, 4 * (r / 2), 15), mul(load_bits(qh, 2 * r, 3), sixteen)), bias);
    const F32x16 q1 = sub(add(load_bits(ql + 16, 4 * (r / 2), 15), mul(load_bits(qh + 16, 2 * r, 3), sixteen)), bias);
    w0 = mul(set1(s[2 * g]), q0);
    w1 = mul(set1(s[2 * g + 1]), q1);
  }
};

// s[4 i + c] = d, s[16 + 4 i + c] = z of block i, for each of its four chunks c.
struct Q4_Z {
  static constexpr int kType = 100, kBlock = 128, kBytes = 68, kChunks = 4, kGroup = 4;
  static void scales(const uint8_t* b, int n, float* s) {
    alignas(64) float d[16] = {}, z[16] = {};
    for (int i = 0; i < n; ++i)
      for (int c = 0; c < 4; ++c) d[4 * i + c] = half_at(b + i * kBytes), z[4 * i + c] = b[i * kBytes + 2];
    store(s, load(d));
    store(s + 16, load(z));
  }
  template <bool = false>
  static void decode(const uint8_t* b, int c, const float* s, int g, F32x16& w0, F32x16& w1) {
    const F32x16 d = set1(s[g]), z = set1(s[16 + g]);
    const uint8_t* q = b + 4 + 16 * c;
    if constexpr (kLut16Fast) {
      const F32x16 t = mul(d, sub(iota16(0.0f), z));  // t[q] = d * (q - z), exact
      w0 = lut16(t, q, 0);
      w1 = lut16(t, q, 4);
    } else {
      w0 = mul(d, sub(load_bits(q, 0, 15), z));
      w1 = mul(d, sub(load_bits(q, 4, 15), z));
    }
  }
};

// f(Format{}) for the format of GGML type `type`; false (nothing called) for other types.
template <typename Fn>
inline bool with_format(int type, Fn&& f) {
  switch (type) {
    case Q4_0::kType: f(Q4_0{}); return true;
    case Q4_1::kType: f(Q4_1{}); return true;
    case Q8_0::kType: f(Q8_0{}); return true;
    case Q4_K::kType: f(Q4_K{}); return true;
    case Q5_K::kType: f(Q5_K{}); return true;
    case Q6_K::kType: f(Q6_K{}); return true;
    case Q4_Z::kType: f(Q4_Z{}); return true;
    default: return false;
  }
}

}  // namespace kv::quant
