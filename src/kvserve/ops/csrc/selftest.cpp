// Which level this build is, and the vector layer against its definition (vec.hpp): each op on
// awkward inputs (ties, NaN, infinities, denormals, tails), compared bit for bit with plain scalar
// code. tests/unit/test_cpu_isa.py runs it at every level the CPU can execute.
#include <cstdio>

#include "kernels.hpp"

namespace {
using namespace kv;
using namespace kv::vec;

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

bool same(float a, float b) { return bits(a) == bits(b) || (std::isnan(a) && std::isnan(b)); }

float scalar_exp(float x0) {  // exp_in_range / exp of vec.hpp, one lane
  const float x = std::min(std::max(x0, -87.33654f), 100.0f);
  const float n = std::floor(std::fma(x, 1.44269504088896341f, 0.5f));
  const float r = std::fma(n, 2.12194440e-4f, std::fma(n, -0.693359375f, x));
  float p = 1.9875691500e-4f;
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = std::fma(p, r, c);
  const float y = std::fma(p * r, r, r) + 1.0f;
  const float half = std::floor(n * 0.5f);
  auto pow2 = [](float e) {
    const uint32_t u = static_cast<uint32_t>(static_cast<int32_t>(e) + 127) << 23;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  };
  return std::isnan(x0) ? x0 : x0 < -87.33654f ? 0.0f : y * pow2(half) * pow2(n - half);
}

float scalar_reduce(const float* v) {  // lanes (i, i + 8), (i, i + 4), (i, i + 2), (0, 1)
  float t[16];
  std::memcpy(t, v, sizeof(t));
  for (int w = 8; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) t[i] = t[i] + t[i + w];
  return t[0];
}

struct Checker {
  int failures = 0;
  char* msg;
  int64_t cap;
  void check(bool ok, const char* what, int lane, float got, float want) {
    if (ok) return;
    if (failures++ == 0 && cap > 0)
      std::snprintf(msg, cap, "%s: %s lane %d: got %.9g (0x%08x), want %.9g (0x%08x)", kIsa, what, lane, got, bits(got),
                    want, bits(want));
  }
};

uint64_t rng = 0x9e3779b97f4a7c15ull;
float random_float(float scale) {
  rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
  return (static_cast<float>(rng >> 40) / static_cast<float>(1 << 24) * 2.0f - 1.0f) * scale;
}

// The GGUF block ops (quant.cpp): bytes and nibbles to float32, 16-entry tables, every float16.
void check_block_ops(Checker& c) {
  alignas(64) uint8_t bytes[16];
  alignas(64) float t[16], o[16];
  for (int round = 0; round < 64; ++round) {
    for (int i = 0; i < 16; ++i) {
      bytes[i] = static_cast<uint8_t>(random_float(128.0f) + 128.0f);  // [0, 256)
      t[i] = random_float(100.0f);
    }
    if (round == 0)
      for (int i = 0; i < 16; ++i) bytes[i] = static_cast<uint8_t>(i == 0 ? 0 : i == 1 ? 255 : i == 2 ? 128 : 127);
    store(o, load_i8(reinterpret_cast<const int8_t*>(bytes)));
    for (int i = 0; i < 16; ++i) {
      const float want = static_cast<int8_t>(bytes[i]);
      c.check(o[i] == want, "load_i8", i, o[i], want);
    }
    for (int shift = 0; shift < 8; ++shift) {
      for (int mask : {1, 3, 15, 63, 255}) {
        store(o, load_bits(bytes, shift, mask));
        for (int i = 0; i < 16; ++i) {
          const float want = static_cast<float>((bytes[i] >> shift) & mask);
          c.check(o[i] == want, "load_bits", i, o[i], want);
        }
      }
      store(o, lut16(load(t), bytes, shift));
      for (int i = 0; i < 16; ++i) {
        const float want = t[(bytes[i] >> shift) & 15];
        c.check(same(o[i], want), "lut16", i, o[i], want);
      }
    }
  }
  alignas(64) uint16_t h[16];
  for (uint32_t h0 = 0; h0 < 65536; h0 += 16) {
    for (int i = 0; i < 16; ++i) h[i] = static_cast<uint16_t>(h0 + i);
    store(o, load_f16(h));
    for (int i = 0; i < 16; ++i) c.check(same(o[i], f16f(h[i])), "load_f16", i, o[i], f16f(h[i]));
  }
}

}  // namespace

KV_API const char* kv_isa() { return kIsa; }

// Returns the number of mismatches; the first is described in msg (cap bytes).
KV_API int kv_vec_selftest(char* msg, int64_t cap) {
  Checker c{0, msg, cap};
  alignas(64) float a[16], b[16], o[16];
  alignas(64) bf16 h[32], ho[16];
  const float specials[] = {0.0f, -0.0f, 1.0f, -1.5f, INFINITY, -INFINITY, NAN, 1e-40f, -3e-39f, 3.4e38f,
                            1.00390625f, 1.01171875f, -2.99e-38f, 88.7f, -87.4f, -100.0f};  // ties for bf16 rounding
  for (int round = 0; round < 200; ++round) {
    for (int i = 0; i < 16; ++i) {
      a[i] = round == 0 ? specials[i] : random_float(round % 3 == 0 ? 100.0f : 4.0f);
      b[i] = random_float(8.0f);
    }
    const F32x16 va = load(a), vb = load(b);
    store(o, fma(va, vb, load(b)));
    for (int i = 0; i < 16; ++i) c.check(same(o[i], std::fma(a[i], b[i], b[i])), "fma", i, o[i], std::fma(a[i], b[i], b[i]));
    store(o, div(va, vb));
    for (int i = 0; i < 16; ++i) c.check(same(o[i], a[i] / b[i]), "div", i, o[i], a[i] / b[i]);
    store(ho, va);  // float32 -> bf16, round to nearest even, NaN quiet
    for (int i = 0; i < 16; ++i) c.check(ho[i] == f2bf(a[i]), "store bf16", i, bf2f(ho[i]), bf2f(f2bf(a[i])));
    store(o, round_bf16(va));
    for (int i = 0; i < 16; ++i) c.check(same(o[i], bf2f(f2bf(a[i]))), "round_bf16", i, o[i], bf2f(f2bf(a[i])));
    store(o, load(ho));
    for (int i = 0; i < 16; ++i) c.check(same(o[i], bf2f(ho[i])), "load bf16", i, o[i], bf2f(ho[i]));
    store(o, exp(va));
    for (int i = 0; i < 16; ++i) c.check(same(o[i], scalar_exp(a[i])), "exp", i, o[i], scalar_exp(a[i]));
    if (round > 0) {  // (sums over specials hold NaN)
      const float want = scalar_reduce(a), got = reduce_add(va);
      c.check(same(got, want), "reduce_add", 0, got, want);
      float m = a[0];
      for (int i = 1; i < 16; ++i) m = std::max(m, a[i]);
      c.check(same(reduce_max(va), m), "reduce_max", 0, reduce_max(va), m);
    }
    F32x16 many[16];
    float rows[16][16];
    for (int j = 0; j < 16; ++j) {
      for (int i = 0; i < 16; ++i) rows[j][i] = random_float(1000.0f) * (i == j ? 1e4f : 1.0f);
      many[j] = load(rows[j]);
    }
    store(o, reduce_add16(many));
    for (int j = 0; j < 16; ++j) c.check(same(o[j], scalar_reduce(rows[j])), "reduce_add16", j, o[j], scalar_reduce(rows[j]));
    const Mask lt_m = lt(va, vb), eq_m = eq(va, va), un_m = unord(va, vb);
    store(o, select(lt_m, va, vb));
    for (int i = 0; i < 16; ++i) {
      const bool is_lt = a[i] < b[i];
      c.check(((lt_m >> i) & 1u) == is_lt, "lt", i, a[i], b[i]);
      c.check(((eq_m >> i) & 1u) == (a[i] == a[i]), "eq", i, a[i], a[i]);
      c.check(((un_m >> i) & 1u) == (std::isnan(a[i]) || std::isnan(b[i])), "unord", i, a[i], b[i]);
      c.check(same(o[i], is_lt ? a[i] : b[i]), "select", i, o[i], is_lt ? a[i] : b[i]);
    }
    for (int i = 0; i < 32; ++i) h[i] = f2bf(random_float(3.0f));
    float xf[2] = {bf2f(h[5]), bf2f(h[6])};
    const bf16 xh[2] = {h[5], h[6]};
    const Pairs xp = bcast_pair(kNativePairs ? reinterpret_cast<const PairScalar*>(xh)
                                             : reinterpret_cast<const PairScalar*>(xf));
    store(o, dot_pairs(load(b), xp, load_pairs(h)));  // vdpbf16ps's order: odd product, then even
    for (int i = 0; i < 16; ++i) {
      const float want = std::fma(xf[0], bf2f(h[2 * i]), std::fma(xf[1], bf2f(h[2 * i + 1]), b[i]));
      // vdpbf16ps (kNativePairs) is held to its documented order only within rounding: its
      // denormal flushing aside, CPUs are not all documented to round each step as written
      const bool ok = kNativePairs ? std::fabs(o[i] - want) <= 1e-6f * (1.0f + std::fabs(want)) : same(o[i], want);
      c.check(ok, "dot_pairs", i, o[i], want);
    }
    const int n = round % 17;
    std::memset(o, 0x7f, sizeof(o));
    store_n(o, load_n(a, n), n);
    for (int i = 0; i < 16; ++i) c.check(i < n ? same(o[i], a[i]) : bits(o[i]) == 0x7f7f7f7fu, "load_n/store_n", i, o[i], a[i]);
  }
  check_block_ops(c);
  return c.failures;
}
