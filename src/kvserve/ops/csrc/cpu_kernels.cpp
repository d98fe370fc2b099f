// kvserve CPU kernels: fused elementwise ops and in-place paged attention.
//
// A plain C ABI over raw pointers, called through ctypes (kvserve/ops/cpu_ops.py), so the file
// builds in about two seconds with g++ alone, without torch headers. Each kernel has a torch-native
// reference that the tests compare it with (layers/*.py, attention/torch_ref.py).
//
// dtype codes: 0 = float32, 1 = bfloat16. Math is float32; results are rounded to the storage
// dtype at the same points as the torch reference (and Hugging Face), so bf16 outputs match it
// up to float summation order. Threads: OpenMP, which resolves to the libgomp torch has loaded.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#ifdef __linux__
#include <sys/syscall.h>
#include <unistd.h>
#endif

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

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

inline float ld(const float* p, int64_t i) { return p[i]; }
inline float ld(const bf16* p, int64_t i) { return bf2f(p[i]); }
inline void st(float* p, int64_t i, float v) { p[i] = v; }
inline void st(bf16* p, int64_t i, float v) { p[i] = f2bf(v); }
// Round a float32 value through the storage dtype T (identity for float32).
template <typename T> inline float rnd(float v);
template <> inline float rnd<float>(float v) { return v; }
template <> inline float rnd<bf16>(float v) { return bf2f(f2bf(v)); }

// exp for float32, Cephes-style (range reduction + degree-6 polynomial), ~1 ulp; vectorizes.
// Overflows to inf like expf (2^n applied in two steps, each a normal float); below -87.3 returns
// 0 (expf gives denormals there).
inline float exp_f32(float x0) {
  float x = x0 < -87.33654f ? -87.33654f : (x0 > 100.0f ? 100.0f : x0);  // ternaries vectorize
  float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float y = p * r * r + r + 1.0f;
  const int32_t ni = static_cast<int32_t>(n), n1 = ni >> 1, n2 = ni - n1;  // n in [-126, 145]
  float v = y * __builtin_bit_cast(float, (n1 + 127) << 23) * __builtin_bit_cast(float, (n2 + 127) << 23);
  return x0 < -87.33654f ? 0.0f : v;
}

#ifdef __AVX512F__
// 16 lanes at a time: load/store as float32 from either dtype; round through bf16 like f2bf.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline __m256i to_bf16(__m512 v) {  // round to nearest even; NaN stays NaN (as f2bf)
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
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(bf16* p, __m512 v) { _mm256_storeu_si256((__m256i*)p, to_bf16(v)); }
template <typename T> inline __m512 rnd16(__m512 v);
template <> inline __m512 rnd16<float>(__m512 v) { return v; }
template <> inline __m512 rnd16<bf16>(__m512 v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16(v)), 16));
}
// e^x on 16 lanes for x already clamped to [-87.34, 100]: exp_f32's steps, vscalefps applying 2^n
// exactly (inf on overflow).
inline __m512 exp16_in_range(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  return _mm512_scalef_ps(_mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f)), n);
}
// exp_f32 on 16 lanes: the same results (0 below -87.34, inf on overflow).
inline __m512 exp16(__m512 x0) {
  const __m512 v = exp16_in_range(_mm512_min_ps(_mm512_max_ps(x0, _mm512_set1_ps(-87.33654f)), _mm512_set1_ps(100.0f)));
  return _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(x0, _mm512_set1_ps(-87.33654f), _CMP_LT_OQ), _mm512_setzero_ps());
}
// e^x for x <= 0 (attention's scores less their running max). Below -87.34 (-inf included) it
// returns e^-87.34 (~1.2e-38), not 0: callers mask those lanes.
inline __m512 exp16_nonpos(__m512 x0) { return exp16_in_range(_mm512_max_ps(x0, _mm512_set1_ps(-87.33654f))); }
#endif

// ---- RMSNorm (with the residual add fused) -------------------------------------------------
// residual != null: residual <- x + residual (in place, float32), out <- norm(residual) * w.
// residual == null: out <- norm(x) * w. x, out: [rows, D] contiguous in T; residual: [rows, D]
// contiguous float32 whatever T is (the model's residual stream is never rounded); w: [D].
// The normalised value is rounded to T before the multiply by w, as Hugging Face's RMSNorm does.
template <typename T>
void rms_norm(const T* x, float* residual, T* out, const T* w, int64_t rows, int64_t D, float eps) {
#pragma omp parallel for schedule(static) if (rows * D > 32768)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * D;
    float* res = residual ? residual + r * D : nullptr;
    T* o = out + r * D;
#ifdef __AVX512F__
    if (D % 16 == 0) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t i = 0; i < D; i += 16) {
        __m512 h = load16(xr + i);
        if (res) {
          h = _mm512_add_ps(h, load16(res + i));
          store16(res + i, h);
        }
        acc = _mm512_fmadd_ps(h, h, acc);
      }
      const __m512 inv = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(acc) / static_cast<float>(D) + eps));
      for (int64_t i = 0; i < D; i += 16) {
        const __m512 h = res ? load16(res + i) : load16(xr + i);
        store16(o + i, _mm512_mul_ps(load16(w + i), rnd16<T>(_mm512_mul_ps(h, inv))));
      }
      continue;
    }
#endif
    float ss = 0.f;
    if (res) {
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < D; ++i) {
        float h = ld(xr, i) + res[i];
        res[i] = h;
        ss += h * h;
      }
    } else {
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < D; ++i) {
        float h = ld(xr, i);
        ss += h * h;
      }
    }
    float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) st(o, i, ld(w, i) * rnd<T>((res ? res[i] : ld(xr, i)) * inv));
  }
}

// ---- SiLU(gate) * up ----------------------------------------------------------------------
// exp over a float buffer in its own loop: the loop gcc vectorizes (fused into the bf16 loop it does not).
inline void exp_inplace(float* __restrict e, int64_t n) {
  for (int64_t i = 0; i < n; ++i) e[i] = exp_f32(e[i]);
}

// x: [rows, 2 * I] laid out [gate | up]; out: [rows, I].
template <typename T>
void silu_and_mul(const T* x, T* out, int64_t rows, int64_t I) {
  constexpr int64_t C = 256;
#pragma omp parallel for schedule(static) if (rows * I > 32768)
  for (int64_t r = 0; r < rows; ++r) {
    const T* g = x + r * 2 * I;
    const T* u = g + I;
    T* o = out + r * I;
#ifdef __AVX512F__
    if (I % 16 == 0) {
      for (int64_t i = 0; i < I; i += 16) {
        const __m512 a = load16(g + i);
        const __m512 s = rnd16<T>(_mm512_div_ps(a, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), a)))));
        store16(o + i, _mm512_mul_ps(s, load16(u + i)));
      }
      continue;
    }
#endif
    float e[C];
    for (int64_t i0 = 0; i0 < I; i0 += C) {
      const int64_t n = std::min(C, I - i0);
      for (int64_t j = 0; j < n; ++j) e[j] = -ld(g, i0 + j);
      exp_inplace(e, n);
      for (int64_t j = 0; j < n; ++j) {
        float s = rnd<T>(ld(g, i0 + j) / (1.0f + e[j]));
        st(o, i0 + j, s * ld(u, i0 + j));
      }
    }
  }
}

// ---- Rotary embedding (neox / rotate_half layout), in place ----------------------------------
// q: rows of Hq heads of D at row stride q_stride; k likewise (Hk heads, k_stride);
// cos_sin: [rows, D] float32, cos in the first half, sin in the second.
template <typename T>
void rotary(T* q, T* k, const float* cos_sin, int64_t rows, int64_t Hq, int64_t Hk, int64_t D,
            int64_t q_stride, int64_t k_stride) {
  const int64_t half = D / 2;
#pragma omp parallel for schedule(static) if (rows * (Hq + Hk) * D > 32768)
  for (int64_t t = 0; t < rows; ++t) {
    const float* c = cos_sin + t * D;
    const float* s = c + half;
#ifdef __AVX512F__
    if (half % 16 == 0 && half <= 128) {  // the same steps, 16 lanes at a time
      __m512 cv[8], sv[8];  // cos / sin rounded to T once per token, for all heads
      for (int64_t i = 0; i < half; i += 16) {
        cv[i / 16] = rnd16<T>(_mm512_loadu_ps(c + i));
        sv[i / 16] = rnd16<T>(_mm512_loadu_ps(s + i));
      }
      for (int64_t h = 0; h < Hq + Hk; ++h) {
        T* x = h < Hq ? q + t * q_stride + h * D : k + t * k_stride + (h - Hq) * D;
        for (int64_t i = 0; i < half; i += 16) {
          const __m512 x1 = load16(x + i), x2 = load16(x + i + half), cc = cv[i / 16], ss = sv[i / 16];
          store16(x + i, _mm512_sub_ps(rnd16<T>(_mm512_mul_ps(x1, cc)), rnd16<T>(_mm512_mul_ps(x2, ss))));
          store16(x + i + half, _mm512_add_ps(rnd16<T>(_mm512_mul_ps(x2, cc)), rnd16<T>(_mm512_mul_ps(x1, ss))));
        }
      }
      continue;
    }
#endif
    for (int64_t h = 0; h < Hq + Hk; ++h) {
      T* x = h < Hq ? q + t * q_stride + h * D : k + t * k_stride + (h - Hq) * D;
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        float cc = rnd<T>(c[i]), ss = rnd<T>(s[i]);  // cast to the activation dtype first, as HF
        float x1 = ld(x, i), x2 = ld(x, i + half);
        float o1 = rnd<T>(rnd<T>(x1 * cc) - rnd<T>(x2 * ss));
        float o2 = rnd<T>(rnd<T>(x2 * cc) + rnd<T>(x1 * ss));
        st(x, i, o1);
        st(x, i + half, o2);
      }
    }
  }
}

// ---- KV cache write: this step's keys and values into their slots ---------------------------
// k, v: T rows of `row` elements (Hkv * D) at row strides k_stride / v_stride (views of the fused
// qkv output); row t goes to slot slots[t] of k_cache / v_cache ([num_slots, row], contiguous).
// One pass, no contiguous copy of k or v first (index_copy_ makes one for strided sources).
// Both cores from ~43 rows on (default model): the slots are scattered, so each row's stores miss
// cache; 30 layers x 256 rows 2.7 -> 1.7 ms, 64 rows 1.0 -> 0.8 ms.
template <typename T>
void write_kv(const T* k, const T* v, int64_t k_stride, int64_t v_stride, T* k_cache, T* v_cache,
              const int64_t* slots, int64_t rows, int64_t row) {
#pragma omp parallel for schedule(static) if (rows * row > 8192)
  for (int64_t t = 0; t < rows; ++t) {
    std::memcpy(k_cache + slots[t] * row, k + t * k_stride, row * sizeof(T));
    std::memcpy(v_cache + slots[t] * row, v + t * v_stride, row * sizeof(T));
  }
}

// ---- Greedy sampling: argmax of each row ----------------------------------------------------
// Largest value of row[0..cols), vectorized on AVX-512.
template <typename T>
inline float row_max(const T* row, int64_t cols) {
  float m = -INFINITY;
  int64_t j = 0;
#ifdef __AVX512F__
  __m512 mv = _mm512_set1_ps(-INFINITY);
  for (; j + 16 <= cols; j += 16) mv = _mm512_max_ps(mv, load16(row + j));
  m = _mm512_reduce_max_ps(mv);
#endif
  for (; j < cols; ++j) {
    const float v = ld(row, j);
    m = v > m ? v : m;
  }
  return m;
}

// First index j with row[j] == m (0 when none: a row holding NaN).
template <typename T>
inline int64_t first_index_of(const T* row, int64_t cols, float m) {
  int64_t j = 0;
#ifdef __AVX512F__
  const __m512 mb = _mm512_set1_ps(m);
  for (; j + 16 <= cols; j += 16)
    if (_mm512_cmp_ps_mask(load16(row + j), mb, _CMP_EQ_OQ)) break;
#endif
  for (; j < cols; ++j)
    if (ld(row, j) == m) return j;
  return 0;
}

// x: [rows, cols] at row stride `stride`; out[r] = first index of the row's maximum (torch.argmax).
// A row holding NaN gets an unspecified index (torch returns the NaN's; logits never hold NaN
// unless the model is broken).
template <typename T>
void argmax_rows(const T* x, int64_t* out, int64_t rows, int64_t cols, int64_t stride) {
#pragma omp parallel for schedule(static) if (rows * cols > 65536)
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = x + r * stride;
    out[r] = first_index_of(row, cols, row_max(row, cols));
  }
}

// ---- Random sampling: one categorical draw per row by inverse CDF ----------------------------
// Row r samples token j with probability softmax(x[r] * inv_temp[r])[j], using one uniform u[r] in
// [0, 1): the first j whose cumulative weight exceeds u[r] * (total weight). Weights are
// e_j = exp((x_j - max) * inv_temp), so -inf logits (filtered tokens) weigh 0 and are never drawn.
// inv_temp[r] == 0 marks a greedy row: the first index of its maximum, as argmax_rows.
// The reference (worker/sampler.py: inverse_cdf_sample) sums in float64 in index order; here
// 16-wide blocks sum in float32 and blocks add up in float64, so the two can disagree only when
// the target lies within float rounding of a boundary between two tokens.
template <typename T>
void sample_rows(const T* x, int64_t* out, int64_t rows, int64_t cols, int64_t stride, const float* inv_temp,
                 const double* u) {
  constexpr int64_t W = 16;  // block width: one vector
  const int64_t nb = (cols + W - 1) / W;
#pragma omp parallel if (rows * cols > 65536)
  {
    std::vector<float> e(nb * W, 0.0f);  // this thread's row of weights (tail padding stays 0)
    std::vector<float> bsum(nb);          // and their 16-wide block sums
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const T* row = x + r * stride;
      const float m = row_max(row, cols), it = inv_temp[r];
      if (it == 0.0f || m == -INFINITY) {  // greedy (or nothing drawable: the first index, as argmax)
        out[r] = first_index_of(row, cols, m);
        continue;
      }
      double total = 0.0;
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t j0 = b * W;
#ifdef __AVX512F__
        if (j0 + W <= cols) {
          const __m512 v = exp16(_mm512_mul_ps(_mm512_sub_ps(load16(row + j0), _mm512_set1_ps(m)), _mm512_set1_ps(it)));
          _mm512_storeu_ps(e.data() + j0, v);
          bsum[b] = _mm512_reduce_add_ps(v);
          total += bsum[b];
          continue;
        }
#endif
        float s = 0.0f;
        for (int64_t j = j0; j < std::min(j0 + W, cols); ++j) {
          e[j] = exp_f32((ld(row, j) - m) * it);
          s += e[j];
        }
        bsum[b] = s;
        total += s;
      }
      const double target = u[r] * total;
      double run = 0.0;
      int64_t pick = -1;
      for (int64_t b = 0; b < nb && pick < 0; ++b) {
        if (run + bsum[b] <= target) {
          run += bsum[b];
          continue;
        }
        double within = run;  // scan the block that crosses the target
        for (int64_t j = b * W; j < std::min(b * W + W, cols); ++j) {
          within += e[j];
          if (within > target && e[j] > 0.0f) {
            pick = j;
            break;
          }
        }
        run += bsum[b];  // rounding left the target past this block: go on
      }
      if (pick < 0) {  // rounding put the target past the end: the last token with weight
        pick = cols - 1;
        while (pick > 0 && !(e[pick] > 0.0f)) --pick;
      }
      out[r] = pick;
    }
  }
}

// ---- Paged attention, reading the KV cache in place ----------------------------------------
// For each listed request b: its query rows qstart[b]..qstart[b+1] (positions seq_lens[b] - qlen ..
// seq_lens[b] - 1) attend causally to its context, held in blocks block_tables[b, :] of the cache.
// q, out: [T, Hq, D]; k_cache, v_cache: [num_blocks, bs, Hk, D]. Online softmax over blocks, so
// nothing of size context is materialised. A work item is (request, query tile, kv heads h0..h1):
// each block's [bs, h0..h1, D] keys and values serve every query row and every head sharing them
// (GQA), read straight from the cache on AVX-512 (else through float copies). The next block is
// prefetched while one is computed: in the model the cache streams from DRAM (decode step, default
// model: B=64 87 -> 78 ms, B=256 276 -> 241 ms); a non-temporal hint (to spare the weights in L3)
// measured slower (112 ms at B=64). The prefetches are spread over the block's row groups (kv
// heads): issued in one burst they fill the core's line-fill buffers and stall the compute behind
// them (30 layers x 256 requests x 320 tokens: 117-123 -> 102-107 ms; two blocks ahead, or into
// L2 only, no better).
// Cascade: with skip_blocks > 0 the blocks before it are not read; each row instead starts from
// init_out (its attention output over those blocks, [T, Hq, D]) and init_lse ([T, Hq], the
// natural-log sum of exp of its scaled scores there), i.e. the online-softmax state (lse, 1, out).
constexpr int64_t kTile = 8;  // query positions per work item

inline float dot(const float* __restrict a, const float* __restrict b, int64_t D) {
#ifdef __AVX512F__
  if (D % 16 == 0) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
    return _mm512_reduce_add_ps(acc);
  }
#endif
  float s = 0.f;
  for (int64_t d = 0; d < D; ++d) s += a[d] * b[d];
  return s;
}

#ifdef __AVX512F__
// hsum16(v)[j] = sum of the 16 lanes of v[j]: a transpose-and-add tree, 15 shuffle+add pairs for
// 16 sums instead of 16 separate horizontal reductions.
inline __m512 hsum16(const __m512* v) {
  __m512 t[8], u[4], w[2];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // lane L of u[i]: lane-L sums of v[4i .. 4i+3]
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0x44), _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0xEE));
  for (int i = 0; i < 2; ++i)
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xDD));
}
#endif

// Scores of one query row against keys 0..visible-1 of a block, unnormalised: s[j] = q . k_j.
// Generic: qf (float, pre-scaled) against kf (float copy of the block). AVX-512 with a
// compile-time D: 16 keys at a time summed by hsum16; on bf16 with AVX512_BF16 the keys are read
// straight from the cache and multiplied by the raw bf16 query (vdpbf16ps, float accumulation),
// then scaled.
template <typename T, int64_t DC>
inline void block_scores(const T* q_raw, const float* qf, const T* k_direct, int64_t slot_stride,
                         const float* kf, int64_t kf_stride, int64_t visible, int64_t D, float scale, float* s) {
#ifdef __AVX512F__
  if constexpr (DC > 0 && DC % 32 == 0) {
    __m512 parts[16];
    for (int64_t c0 = 0; c0 < visible; c0 += 16) {
      const int64_t nk = std::min<int64_t>(16, visible - c0);
      for (int64_t jj = 0; jj < 16; ++jj) {
        __m512 acc = _mm512_setzero_ps();
        if (jj < nk) {
#ifdef __AVX512BF16__
          if constexpr (std::is_same_v<T, bf16>) {
            const T* kr = k_direct + (c0 + jj) * slot_stride;
            for (int64_t d = 0; d < DC; d += 32)
              acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(q_raw + d), (__m512bh)_mm512_loadu_si512(kr + d));
          } else
#endif
          {
            const float* kr = kf + (c0 + jj) * kf_stride;
            for (int64_t d = 0; d < DC; d += 16)
              acc = _mm512_fmadd_ps(_mm512_loadu_ps(qf + d), _mm512_loadu_ps(kr + d), acc);
          }
        }
        parts[jj] = acc;
      }
      __m512 sv = hsum16(parts);
#ifdef __AVX512BF16__
      if constexpr (std::is_same_v<T, bf16>) sv = _mm512_mul_ps(sv, _mm512_set1_ps(scale));
#endif
      _mm512_mask_storeu_ps(s + c0, static_cast<__mmask16>((1u << nk) - 1u), sv);
    }
    return;
  }
#endif
  for (int64_t j = 0; j < visible; ++j) s[j] = dot(qf, kf + j * kf_stride, D);
}

// Whether block_scores reads keys straight from the cache (then kf is not filled).
template <typename T, int64_t DC>
constexpr bool kDirectKeys() {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  return std::is_same_v<T, bf16> && DC > 0 && DC % 32 == 0;
#else
  return false;
#endif
}

// Whether accumulate_pv_rows reads values straight from the cache (then vf is not filled).
template <int64_t DC>
constexpr bool kDirectValues() {
#ifdef __AVX512F__
  return DC > 0 && DC % 16 == 0;
#else
  return false;
#endif
}

// a[0..D) = a * corr + sum_j p[j] * v_j, v_j from the float copy vf + j * v_stride (the generic
// path; accumulate_pv_rows reads the cache directly where it can).
inline void accumulate_pv_float(float* a, float corr, const float* p, const float* vf, int64_t v_stride,
                                int64_t visible, int64_t D) {
  for (int64_t d = 0; d < D; ++d) a[d] *= corr;
  for (int64_t j = 0; j < visible; ++j) {
    const float pj = p[j];
    const float* __restrict vj = vf + j * v_stride;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) a[d] += pj * vj[d];
  }
}

#ifdef __AVX512F__
// One block of 16 scores for each of nr rows (nr <= 16): row g's s_g = s + g * stride holds
// s_g[0..visible) (visible <= 16). s_g <- exp(s_g - m_new) (0 past visible), m[g] <- m_new =
// max(m[g], max s_g), l[g] <- l[g] * corr[g] + sum s_g, with corr[g] = exp(m_old - m_new) (0 on the
// first block: m = -inf, clamped) computed for all rows in one vector.
inline void online_softmax16(float* s, int64_t stride, int64_t nr, int64_t visible, float* m, float* l,
                             float* corr) {
  const __mmask16 k = static_cast<__mmask16>((1u << visible) - 1u);
  alignas(64) float m_new[16], c[16];
  for (int64_t g = 0; g < nr; ++g) {
    const float bmax = _mm512_mask_reduce_max_ps(k, _mm512_maskz_loadu_ps(k, s + g * stride));
    m_new[g] = m[g] > bmax ? m[g] : bmax;
    c[g] = m[g] - m_new[g];
  }
  const __mmask16 rows = static_cast<__mmask16>((1u << nr) - 1u);
  _mm512_store_ps(c, exp16(_mm512_maskz_load_ps(rows, c)));
  for (int64_t g = 0; g < nr; ++g) {
    float* sg = s + g * stride;
    const __m512 p = _mm512_maskz_mov_ps(k, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, sg), _mm512_set1_ps(m_new[g]))));
    _mm512_storeu_ps(sg, p);
    l[g] = l[g] * c[g] + _mm512_reduce_add_ps(p);
    m[g] = m_new[g];
    corr[g] = c[g];
  }
}
#endif

// For NR rows r: a_r = a_r * corr[r] + sum_j p_r[j] * v_j. The rows read the same kv head at the
// same position (GQA's query heads of one kv head), so they share each value vector: with a
// compile-time D on AVX-512, v_j is loaded from the cache (v_direct + j * slot_stride, any dtype,
// converted in registers) once for all NR rows, accumulators in registers; else the float copy.
// Rows per call: as many as keep the accumulators in registers (4 x 4 at D = 64, 2 x 8 at D = 128).
template <int64_t DC>
constexpr int64_t kPvRows() {
  return DC > 0 && DC <= 64 ? 4 : 2;
}

template <typename T, int64_t DC, int64_t NR>
inline void accumulate_pv_rows(float* a, int64_t a_stride, const float* corr, const float* p, int64_t p_stride,
                               const T* v_direct, int64_t slot_stride, const float* vf, int64_t v_stride,
                               int64_t visible, int64_t D) {
#ifdef __AVX512F__
  if constexpr (kDirectValues<DC>()) {
    constexpr int64_t NV = DC / 16;
    __m512 av[NR][NV];
    for (int64_t r = 0; r < NR; ++r)
      for (int64_t i = 0; i < NV; ++i)
        av[r][i] = _mm512_mul_ps(_mm512_loadu_ps(a + r * a_stride + 16 * i), _mm512_set1_ps(corr[r]));
    for (int64_t j = 0; j < visible; ++j) {
      const T* vj = v_direct + j * slot_stride;
      __m512 vv[NV];
      for (int64_t i = 0; i < NV; ++i) vv[i] = load16(vj + 16 * i);
      for (int64_t r = 0; r < NR; ++r) {
        const __m512 pj = _mm512_set1_ps(p[r * p_stride + j]);
        for (int64_t i = 0; i < NV; ++i) av[r][i] = _mm512_fmadd_ps(pj, vv[i], av[r][i]);
      }
    }
    for (int64_t r = 0; r < NR; ++r)
      for (int64_t i = 0; i < NV; ++i) _mm512_storeu_ps(a + r * a_stride + 16 * i, av[r][i]);
    return;
  }
#endif
  for (int64_t r = 0; r < NR; ++r)
    accumulate_pv_float(a + r * a_stride, corr[r], p + r * p_stride, vf, v_stride, visible, D);
}

template <typename T, int64_t DC>
inline void accumulate_pv_n(int64_t nr, float* a, int64_t a_stride, const float* corr, const float* p,
                            int64_t p_stride, const T* v_direct, int64_t slot_stride, const float* vf,
                            int64_t v_stride, int64_t visible, int64_t D) {
#define KV_PV_ROWS(NR) \
  accumulate_pv_rows<T, DC, NR>(a, a_stride, corr, p, p_stride, v_direct, slot_stride, vf, v_stride, visible, D)
  switch (nr) {  // nr <= kPvRows<DC>() <= 4
    case 4: KV_PV_ROWS(4); break;
    case 3: KV_PV_ROWS(3); break;
    case 2: KV_PV_ROWS(2); break;
    default: KV_PV_ROWS(1);
  }
#undef KV_PV_ROWS
}

template <typename T, int64_t DC>
void paged_attention(const T* q, const T* k_cache, const T* v_cache, T* out, const int64_t* block_tables,
                     int64_t bt_stride, const int64_t* seq_lens, const int64_t* qstart, const int64_t* reqs,
                     int64_t n_reqs, int64_t Hq, int64_t Hk, int64_t D_, int64_t bs, float scale,
                     int64_t skip_blocks, const T* init_out, const float* init_lse) {
  const int64_t D = DC ? DC : D_;
  const int64_t G = Hq / Hk;
  // Few requests (small batches): split heads across items so that both cores work.
  const int64_t heads_per_item = n_reqs >= 8 ? Hk : 1;
  std::vector<int64_t> item_req, item_tile;
  for (int64_t i = 0; i < n_reqs; ++i) {
    int64_t b = reqs[i], qlen = qstart[b + 1] - qstart[b];
    for (int64_t t0 = 0; t0 < qlen; t0 += kTile) {
      item_req.push_back(b);
      item_tile.push_back(t0);
    }
  }
  const int64_t head_groups = Hk / heads_per_item;
  const int64_t n_items = static_cast<int64_t>(item_req.size()) * head_groups;
  const int64_t row_elems = Hk * D;  // one slot of the cache

#pragma omp parallel
  {
    const int64_t R = kTile * heads_per_item * G;  // rows of one item: (query i, q head)
    // Float copies of keys / values only where the score / PV paths read them (not on AVX-512).
    constexpr bool direct_k = kDirectKeys<T, DC>(), direct_v = kDirectValues<DC>();
    std::vector<float> qf(R * D), acc(R * D), mx(R), l(R), sc(4 * bs);  // sc: kPvRows rows of scores
    // Per item, computed once (integer division is slow in the block loop): row r's index in the
    // [T, Hq] layout, and for each group of G rows its query index and kv head offset in a slot.
    std::vector<int64_t> row_idx(R), group_query(R / G), group_kv(R / G);
    std::vector<float> kf(direct_k ? 0 : bs * row_elems), vf(direct_v ? 0 : bs * row_elems);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < n_items; ++it) {
      const int64_t b = item_req[it / head_groups], t0 = item_tile[it / head_groups];
      const int64_t h0 = (it % head_groups) * heads_per_item, nh = heads_per_item;
      const int64_t qlen = qstart[b + 1] - qstart[b], ctx = seq_lens[b];
      const int64_t nq = std::min(kTile, qlen - t0), qh = nh * G, rows = nq * qh;
      const int64_t n_groups = rows / G;  // row groups: (query, kv head) pairs
      const int64_t p0 = ctx - qlen + t0;  // position of the tile's first query
      const int64_t nkeys = p0 + nq;       // keys 0 .. last query's position
      // Row r = (query r / qh, q head h0 * G + r % qh), which reads kv head h0 + (r % qh) / G;
      // row_idx[r] is its index in the [T, Hq] layout of q, out, init_out and init_lse.
      for (int64_t r = 0; r < rows; ++r) row_idx[r] = (qstart[b] + t0 + r / qh) * Hq + h0 * G + r % qh;
      for (int64_t r0 = 0; r0 < rows; r0 += G) {
        group_query[r0 / G] = r0 / qh;
        group_kv[r0 / G] = ((r0 % qh) / G) * D;
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = row_idx[r];
        if constexpr (!direct_k)  // the direct path multiplies the raw query and scales the score
          for (int64_t d = 0; d < D; ++d) qf[r * D + d] = ld(q + row * D, d) * scale;
        if (init_out) {  // continue from attention over blocks < skip_blocks: state (lse, 1, out)
          for (int64_t d = 0; d < D; ++d) acc[r * D + d] = ld(init_out + row * D, d);
          mx[r] = init_lse[row];
          l[r] = 1.f;
        } else {
          std::fill(acc.begin() + r * D, acc.begin() + (r + 1) * D, 0.f);
          mx[r] = -INFINITY;
          l[r] = 0.f;
        }
      }
      const int64_t* table = block_tables + b * bt_stride;
      const int64_t span = nh * D;  // contiguous elements of one slot this item reads
      for (int64_t blk = skip_blocks; blk * bs < nkeys; ++blk) {
        const int64_t n = std::min(bs, nkeys - blk * bs);
        const int64_t base = table[blk] * bs * row_elems + h0 * D;
        const bool has_next = (blk + 1) * bs < nkeys;
        const int64_t next = has_next ? table[blk + 1] * bs * row_elems + h0 * D : 0;
        for (int64_t j = 0; j < n; ++j) {  // kf, vf: [n, nh, D] float
          if constexpr (!direct_k)
            for (int64_t e = 0; e < span; ++e) kf[j * span + e] = ld(k_cache + base + j * row_elems, e);
          if constexpr (!direct_v)
            for (int64_t e = 0; e < span; ++e) vf[j * span + e] = ld(v_cache + base + j * row_elems, e);
        }
        // Rows r0 .. r0 + G - 1 are the G query heads of one kv head at one query position:
        // same visible keys, same values; they go through the PV update kPvRows at a time.
        for (int64_t r0 = 0; r0 < rows; r0 += G) {
          if (has_next) {  // prefetch the next block's keys and values, a share per row group
            const int64_t gi = r0 / G;
            for (int64_t j = gi * bs / n_groups; j < (gi + 1) * bs / n_groups; ++j)
              for (int64_t e = 0; e < span; e += 64 / static_cast<int64_t>(sizeof(T))) {
                __builtin_prefetch(k_cache + next + j * row_elems + e);
                __builtin_prefetch(v_cache + next + j * row_elems + e);
              }
          }
          const int64_t visible = std::min(n, p0 + group_query[r0 / G] - blk * bs + 1);  // causal: keys <= position
          if (visible <= 0) continue;
          const int64_t kv = group_kv[r0 / G];  // this kv head inside a slot of kf / vf
          const float* kf_row = direct_k ? nullptr : kf.data() + kv;  // the float copies are empty when direct
          const float* vf_row = direct_v ? nullptr : vf.data() + kv;
          for (int64_t c0 = 0; c0 < G; c0 += kPvRows<DC>()) {
            const int64_t nr = std::min(kPvRows<DC>(), G - c0);
            float corr[4];
            for (int64_t g = 0; g < nr; ++g)
              block_scores<T, DC>(q + row_idx[r0 + c0 + g] * D, qf.data() + (r0 + c0 + g) * D, k_cache + base + kv,
                                  row_elems, kf_row, span, visible, D, scale, sc.data() + g * bs);
#ifdef __AVX512F__
            if (bs == 16)  // the online-softmax update of one block in one vector per row
              online_softmax16(sc.data(), bs, nr, visible, &mx[r0 + c0], &l[r0 + c0], corr);
            else
#endif
            for (int64_t g = 0; g < nr; ++g) {
              const int64_t r = r0 + c0 + g;
              float* s = sc.data() + g * bs;
              float bmax = -INFINITY;
              for (int64_t j = 0; j < visible; ++j) bmax = s[j] > bmax ? s[j] : bmax;
              const float m_new = mx[r] > bmax ? mx[r] : bmax;
              corr[g] = exp_f32(mx[r] - m_new);  // 0 on the first block (mx = -inf, clamped)
              for (int64_t j = 0; j < visible; ++j) s[j] -= m_new;
              exp_inplace(s, visible);
              float psum = 0.f;
              for (int64_t j = 0; j < visible; ++j) psum += s[j];
              mx[r] = m_new;
              l[r] = l[r] * corr[g] + psum;
            }
            accumulate_pv_n<T, DC>(nr, &acc[(r0 + c0) * D], D, corr, sc.data(), bs, v_cache + base + kv, row_elems,
                                   vf_row, span, visible, D);
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        T* dst = out + row_idx[r] * D;
        const float inv = 1.0f / l[r];
        for (int64_t d = 0; d < D; ++d) st(dst, d, acc[r * D + d] * inv);
      }
    }
  }
}

template <typename T>
void paged_attention_d(const void* q, const void* k_cache, const void* v_cache, void* out, const int64_t* block_tables,
                       int64_t bt_stride, const int64_t* seq_lens, const int64_t* qstart, const int64_t* reqs,
                       int64_t n_reqs, int64_t Hq, int64_t Hk, int64_t D, int64_t bs, float scale,
                       int64_t skip_blocks, const void* init_out, const float* init_lse) {
  auto run = [&](auto dc) {
    paged_attention<T, decltype(dc)::value>(static_cast<const T*>(q), static_cast<const T*>(k_cache),
                                           static_cast<const T*>(v_cache), static_cast<T*>(out), block_tables,
                                           bt_stride, seq_lens, qstart, reqs, n_reqs, Hq, Hk, D, bs, scale,
                                           skip_blocks, static_cast<const T*>(init_out), init_lse);
  };
  if (D == 64)
    run(std::integral_constant<int64_t, 64>());
  else if (D == 128)
    run(std::integral_constant<int64_t, 128>());
  else
    run(std::integral_constant<int64_t, 0>());
}

// ---- Decode-sized matmul: out = x @ W^T, W in a column-block pair-interleaved layout ----------
// x: [M, K] bf16 rows; Wv: W [N, K] rearranged as [N / 16][K / 2][16][2] (block b, pair p, column j
// holds W[16b + j][2p .. 2p + 1]); out: [M, N] bf16, float accumulation rounded once.
// At decode batch sizes the matmul is bound by streaming W from memory (the model's weights do
// not stay in cache between steps). Two kernels read this layout:
// - AMX (decode_matmul_amx): 16 pairs x 16 columns of a block are one 1 KB B tile; compute is
//   nearly free, so the loop only streams W. Measured on the default model while it still
//   prefetched in software (dropped since, see below), 30 layers' weights from DRAM: batch 16
//   14 ms, batch 64 19 ms, batch 256 37 ms against
//   oneDNN's packed matmul 19 / 28 / 48 ms (weights in cache, batch 256: 0.48 vs 0.52 ms for the
//   MLP's gate/up); 512 rows 65 vs 74 ms, 768 about even, 1,024 144 vs 124. Used up to
//   kAmxMaxRows rows.
// - AVX512_BF16 (decode_matmul_dp): a tile of kMr rows x kNr blocks in 16 float accumulators, one
//   64-byte load giving 16 columns' pairs for vdpbf16ps with the broadcast x pair. Streams as fast
//   up to 4 rows (batch 1: 12.8 ms against 20 ms for oneDNN), then runs out of arithmetic.
// Each thread streams W front to back, so the hardware prefetcher keeps ahead of it; software
// prefetches of the next blocks (tried in both kernels) filled the line-fill buffers and slowed
// the stream: 30 layers' linears from DRAM, in model order, batch 1 12.3 -> 10.7 ms, batch 16
// 13.7 -> 11.3 ms, batch 64 and up unchanged.
// Needs AVX512_BF16, K % 32 == 0 and N % 16 == 0 (kv_decode_matmul_max_rows says how many rows).
constexpr int64_t kMr = 4, kNr = 4;

#if defined(__AVX512F__) && defined(__AVX512BF16__)
template <int64_t MR, int64_t NR, typename To>
inline void decode_tile(const bf16* x, int64_t K, const bf16* w, int64_t P, To* out, int64_t N) {
  __m512 acc[MR][NR];
  for (int64_t i = 0; i < MR; ++i)
    for (int64_t j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t block = P * 32;  // elements of one column block
  for (int64_t p = 0; p < P; ++p) {
    __m512i wv[NR];
    for (int64_t j = 0; j < NR; ++j) wv[j] = _mm512_loadu_si512(w + j * block + p * 32);
    for (int64_t i = 0; i < MR; ++i) {
      int32_t pair;
      std::memcpy(&pair, x + i * K + 2 * p, sizeof(pair));
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
      for (int64_t j = 0; j < NR; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xb, (__m512bh)wv[j]);
    }
  }
  for (int64_t i = 0; i < MR; ++i)
    for (int64_t j = 0; j < NR; ++j)
      store16(out + i * N + j * 16, acc[i][j]);
}

template <int64_t MR, typename To>
inline void decode_tile_n(int64_t nr, const bf16* x, int64_t K, const bf16* w, int64_t P, To* out, int64_t N) {
  switch (nr) {  // nr <= kNr = 4
    case 4: decode_tile<MR, 4>(x, K, w, P, out, N); break;
    case 3: decode_tile<MR, 3>(x, K, w, P, out, N); break;
    case 2: decode_tile<MR, 2>(x, K, w, P, out, N); break;
    default: decode_tile<MR, 1>(x, K, w, P, out, N);
  }
}
#endif

template <typename To>
void decode_matmul_dp(const bf16* x, int64_t M, int64_t K, const bf16* Wv, int64_t N, To* out) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  const int64_t P = K / 2, NB = N / 16, n_tiles = (NB + kNr - 1) / kNr;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < n_tiles; ++t) {
    const int64_t b0 = t * kNr, nr = std::min(kNr, NB - b0);
    const bf16* w = Wv + b0 * P * 32;
    for (int64_t m0 = 0; m0 < M; m0 += kMr) {
      const bf16* xm = x + m0 * K;
      To* om = out + m0 * N + b0 * 16;
      switch (std::min(kMr, M - m0)) {
        case 4: decode_tile_n<4>(nr, xm, K, w, P, om, N); break;
        case 3: decode_tile_n<3>(nr, xm, K, w, P, om, N); break;
        case 2: decode_tile_n<2>(nr, xm, K, w, P, om, N); break;
        default: decode_tile_n<1>(nr, xm, K, w, P, om, N);
      }
    }
  }
#else
  (void)x, (void)M, (void)K, (void)Wv, (void)N, (void)out;
#endif
}

constexpr int64_t kAmxMaxRows = 512;

// Whether this process may use AMX tiles: Linux grants them on request (once per process).
inline bool amx_granted() {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
  static const bool granted = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return granted;
#else
  return false;
#endif
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Eight tiles of 64-byte rows; tiles 0 / 2 / 6 get rows0 rows, 1 / 3 / 7 rows1 (at least 1), 4 / 5
// 16. The decode matmul sizes its row tiles so; the prefill attention uses (16, 16).
inline void amx_configure(int64_t rows0, int64_t rows1) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    const int64_t r = (t == 6 || t == 0 || t == 2) ? rows0 : (t == 7 || t == 1 || t == 3) ? rows1 : 16;
    cfg.rows[t] = static_cast<uint8_t>(r > 0 ? r : 1);
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// Pairs of column blocks, each through all rows in passes of up to 32 before the next pair, so
// the weights stream from memory once (x is re-read from cache instead). Per pass: tiles 0-3
// accumulate (row tile r, block c), 4-5 hold the two blocks' B tiles, 6-7 the two row tiles of x
// (a pass of rows0 + rows1 rows; rows1 <= 0: one row tile); each k step of 32 loads 2 KB of
// weights for 4 tile multiplies.
template <typename To>
void decode_matmul_amx(const bf16* x, int64_t M, int64_t K, const bf16* Wv, int64_t N, To* out) {
  const int64_t NB = N / 16, block = K * 16;  // elements of one column block
  const int64_t n_pairs = (NB + 1) / 2;
  // A float32 output past the caches (the LM head's logits: 256 rows x 49,152 = 50 MB) is written
  // with streaming stores, which skip reading each line in first: 256 rows 15.1 -> 8.1-8.9 ms
  // (bf16 output, normal stores: 12.1-13 ms). Rows are 64-byte aligned when out is (N % 16 == 0).
  const bool stream = std::is_same<To, float>::value && M * N * sizeof(To) > (8 << 20) &&
                      reinterpret_cast<uintptr_t>(out) % 64 == 0;
#pragma omp parallel
  {
    alignas(64) float c[16 * 16];
    int64_t configured = -1;  // rows of the pass the tiles are configured for
#pragma omp for schedule(static)
    for (int64_t q = 0; q < n_pairs; ++q) {
      const int64_t b0 = 2 * q;
      const bool two = b0 + 1 < NB;
      const bf16* w0 = Wv + b0 * block;
      const bf16* w1 = w0 + block;
      for (int64_t m0 = 0; m0 < M; m0 += 32) {
        const int64_t pass = std::min<int64_t>(32, M - m0), rows0 = std::min<int64_t>(16, pass), rows1 = pass - 16;
        if (pass != configured) {
          amx_configure(rows0, rows1);
          configured = pass;
        }
        const bf16* x0 = x + m0 * K;
        const bf16* x1 = x0 + 16 * K;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t k = 0; k < K; k += 32) {  // k / 2 pairs: B tile rows p = k/2 .. k/2 + 15
          _tile_loadd(4, w0 + k * 16, 64);
          if (two) _tile_loadd(5, w1 + k * 16, 64);
          _tile_loadd(6, x0 + k, K * 2);
          _tile_dpbf16ps(0, 6, 4);
          if (two) _tile_dpbf16ps(2, 6, 5);
          if (rows1 > 0) {
            _tile_loadd(7, x1 + k, K * 2);
            _tile_dpbf16ps(1, 7, 4);
            if (two) _tile_dpbf16ps(3, 7, 5);
          }
        }
        auto store = [&](int64_t rows, To* dst) {  // c: [16][16] float -> rows of out
          if constexpr (std::is_same<To, float>::value) {
            if (stream) {
              for (int64_t i = 0; i < rows; ++i) _mm512_stream_ps(dst + i * N, _mm512_load_ps(c + 16 * i));
              return;
            }
          }
          for (int64_t i = 0; i < rows; ++i) store16(dst + i * N, _mm512_load_ps(c + 16 * i));
        };
        _tile_stored(0, c, 64);
        store(rows0, out + m0 * N + b0 * 16);
        if (two) {
          _tile_stored(2, c, 64);
          store(rows0, out + m0 * N + (b0 + 1) * 16);
        }
        if (rows1 > 0) {
          _tile_stored(1, c, 64);
          store(rows1, out + (m0 + 16) * N + b0 * 16);
          if (two) {
            _tile_stored(3, c, 64);
            store(rows1, out + (m0 + 16) * N + (b0 + 1) * 16);
          }
        }
      }
    }
    _tile_release();
    _mm_sfence();  // streaming stores visible before the region's barrier
  }
}

// ---- Attention over a run of keys read in place (AMX): fresh prompts, shared prefixes --------
// Causal: prompts whose keys are all their own (positions 0..n-1, nothing cached): the step's
// q/k/v rows. Not causal: query rows that all see every key of a separate run (a cascade's shared
// prefix, in the cache); then each row's log-sum-exp of its scaled scores can be written too.
// Each task (prompt, q head, 16 query rows) runs a flash loop over blocks of 64 keys up to its
// causal limit (all keys when not causal), in transposed form so that vector lanes are query rows
// and the online softmax needs no horizontal reductions:
//   S^T [64 keys][16 rows] = K [keys][D] . Q^T       (A: K rows read in place; B: Q^T in pairs)
//   O^T [D][16 rows]      += V^T [D][keys] . P^T      (A: V^T, built once per (prompt, kv head);
//                                                      B: P^T in key pairs)
// max / sum in float32, P rounded to bf16 for the PV multiply (as torch's CPU flash attention),
// O accumulated in float32. Tiles: QK: 0 = K rows, 1 = Q^T, 2 / 3 / 6 / 7 = S^T of keys 0-15,
// 16-31, 32-47, 48-63; PV: 4 / 5 = P^T of keys 0-31 / 32-63, 0 / 1 = V^T, 2 / 3 / 6 / 7 = four
// 16-dim blocks of O^T in flight.
constexpr int64_t kPfKeys = 64;  // keys per flash block

// O^T tile C (16 dims x 16 rows) = V^T block (16 dims x 32 or 64 keys at va, row stride vs
// bytes) . P^T (tile 4: keys 0-31, tile 5: keys 32-63 when `second`); A tiles 0 and 1. A macro:
// the tile intrinsics take tile numbers as literals.
#define KV_PV_BLOCK(C, va, vs, second) \
  do {                                 \
    _tile_zero(C);                     \
    _tile_loadd(0, (va), (vs));        \
    _tile_dpbf16ps(C, 0, 4);           \
    if (second) {                      \
      _tile_loadd(1, (va) + 32, (vs)); \
      _tile_dpbf16ps(C, 1, 5);         \
    }                                  \
  } while (0)

// Prompt p: keys (and values) at rows starts[p] .. + lens[p] of k (v); its query rows at
// q_starts[p] .. + q_lens[p] of q, written to the same rows of out (and lse [rows, Hq], if given).
// Causal needs q_starts == starts and q_lens == lens (a prompt attends to itself).
void attention_amx(const bf16* q, const bf16* k, const bf16* v, bf16* out, float* lse, const int64_t* q_starts,
                   const int64_t* q_lens, const int64_t* starts, const int64_t* lens, int64_t P, int64_t Hq,
                   int64_t Hk, int64_t D, int64_t q_stride, int64_t k_stride, int64_t v_stride, float scale,
                   bool causal) {
  const int64_t G = Hq / Hk, DC = D / 32, DB = D / 16;
  std::vector<int64_t> off(P + 1, 0), task_off(P + 1, 0);  // per prompt: padded key offset, first task
  for (int64_t p = 0; p < P; ++p) {
    off[p + 1] = off[p] + (lens[p] + kPfKeys - 1) / kPfKeys * kPfKeys;
    task_off[p + 1] = task_off[p] + Hq * ((q_lens[p] + 15) / 16);
  }
  // V^T of (kv head h, prompt p): [D][padded keys] at (h * off[P] + off[p]) * D, zero past the prompt.
  // Kept per calling thread between calls: a fresh allocation of this size page-faults every call.
  static thread_local std::vector<bf16> vt_buffer;
  if (vt_buffer.size() < static_cast<size_t>(Hk * off[P] * D)) vt_buffer.resize(Hk * off[P] * D);
  bf16* const vt = vt_buffer.data();  // (inside the parallel region the name would be each thread's own)
  const __m512i row_ids = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  __m512i even, odd, pair_perm;  // 16-bit lane indices: low / high halves of 32 pairs; (j, 16 + j) pairs
  {
    alignas(64) uint16_t e[32], o[32], pp[32];
    for (int i = 0; i < 32; ++i) {
      e[i] = static_cast<uint16_t>(2 * i);
      o[i] = static_cast<uint16_t>(2 * i + 1);
      pp[i] = static_cast<uint16_t>(i % 2 ? 16 + i / 2 : i / 2);
    }
    even = _mm512_load_si512(e);
    odd = _mm512_load_si512(o);
    pair_perm = _mm512_load_si512(pp);
  }
#pragma omp parallel
  {
#pragma omp for collapse(2) schedule(static)
    for (int64_t h = 0; h < Hk; ++h)
      for (int64_t p = 0; p < P; ++p) {
        const int64_t n = lens[p], padded = off[p + 1] - off[p];
        bf16* dst = vt + (h * off[P] + off[p]) * D;
        const int* src = reinterpret_cast<const int*>(v + starts[p] * v_stride + h * D);
        for (int64_t key0 = 0; key0 < padded; key0 += 32) {
          // Lanes = keys key0 + i (rows past the prompt masked to 0); gather dim pairs, then split
          // each pair into rows d and d + 1 of V^T.
          const __mmask16 in0 = key0 + 16 <= n ? 0xffff : key0 >= n ? 0 : static_cast<__mmask16>((1u << (n - key0)) - 1);
          const __mmask16 in1 = key0 + 32 <= n ? 0xffff : key0 + 16 >= n ? 0 : static_cast<__mmask16>((1u << (n - key0 - 16)) - 1);
          const __m512i idx0 = _mm512_mullo_epi32(_mm512_add_epi32(row_ids, _mm512_set1_epi32(static_cast<int>(key0))),
                                                  _mm512_set1_epi32(static_cast<int>(v_stride / 2)));
          const __m512i idx1 = _mm512_add_epi32(idx0, _mm512_set1_epi32(static_cast<int>(8 * v_stride)));
          for (int64_t d2 = 0; d2 < D / 2; ++d2) {
            const __m512i a = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), in0, idx0, src + d2, 4);
            const __m512i b = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), in1, idx1, src + d2, 4);
            _mm512_storeu_si512(dst + 2 * d2 * padded + key0, _mm512_permutex2var_epi16(a, even, b));
            _mm512_storeu_si512(dst + (2 * d2 + 1) * padded + key0, _mm512_permutex2var_epi16(a, odd, b));
          }
        }
      }
    amx_configure(16, 16);  // every tile 16 rows of 64 bytes
    alignas(64) uint32_t qt[128 * 16];          // Q^T: [D / 2 pairs][16 rows] of bf16 pairs
    alignas(64) bf16 ktail[kPfKeys * 256];     // the last block's keys, zero-padded
    alignas(64) float s[kPfKeys * 16], ot[256 * 16], c[64 * 16];
    alignas(64) uint32_t pt[kPfKeys / 2 * 16];  // P^T: [key pairs][16 rows] of bf16 pairs
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < task_off[P]; ++t) {
      const int64_t p = std::upper_bound(task_off.begin(), task_off.end(), t) - task_off.begin() - 1;
      const int64_t n = lens[p], nq = q_lens[p], blocks = (nq + 15) / 16, local = t - task_off[p];
      const int64_t qb = blocks - 1 - local / Hq, h = local % Hq, hk = h / G;  // longest rows first
      const int64_t row0 = qb * 16, rows = std::min<int64_t>(16, nq - row0), kend = causal ? row0 + rows : n;
      const int64_t padded = off[p + 1] - off[p];
      // Q^T pairs: lane r = row row0 + r (rows past the prompt repeat its last row; not written out)
      const __m512i qidx = _mm512_mullo_epi32(_mm512_min_epi32(row_ids, _mm512_set1_epi32(rows - 1)),
                                              _mm512_set1_epi32(static_cast<int>(q_stride / 2)));
      const int* qbase = reinterpret_cast<const int*>(q + (q_starts[p] + row0) * q_stride + h * D);
      for (int64_t d2 = 0; d2 < D / 2; ++d2)
        _mm512_store_si512(qt + d2 * 16, _mm512_i32gather_epi32(qidx, qbase + d2, 4));
      __m512 m = _mm512_set1_ps(-INFINITY), l = _mm512_setzero_ps();
      std::memset(ot, 0, sizeof(float) * 16 * D);
      const bf16* kp = k + starts[p] * k_stride + hk * D;
      const bf16* vp = vt + (hk * off[P] + off[p]) * D;
      for (int64_t key0 = 0; key0 < kend; key0 += kPfKeys) {
        const int64_t nt = std::min<int64_t>(4, (kend - key0 + 15) / 16);  // S^T tiles of 16 keys needed
        const bf16* kblk = kp + key0 * k_stride;
        int64_t kstr = k_stride;
        if (key0 + kPfKeys > n) {  // keys past the prompt: zeros (never read out of bounds)
          const int64_t have = n - key0;
          for (int64_t j = 0; j < kPfKeys; ++j) {
            if (j < have)
              std::memcpy(ktail + j * D, kblk + j * k_stride, D * sizeof(bf16));
            else
              std::memset(ktail + j * D, 0, D * sizeof(bf16));
          }
          kblk = ktail;
          kstr = D;
        }
        // S^T: tiles 2, 3, 6, 7 hold keys 0-15, 16-31, 32-47, 48-63 of the block
        _tile_zero(2);
        if (nt > 1) _tile_zero(3);
        if (nt > 2) _tile_zero(6);
        if (nt > 3) _tile_zero(7);
        const size_t ks = kstr * sizeof(bf16);
        for (int64_t cc = 0; cc < DC; ++cc) {
          _tile_loadd(1, qt + cc * 256, 64);
          _tile_loadd(0, kblk + cc * 32, ks);
          _tile_dpbf16ps(2, 0, 1);
          if (nt > 1) {
            _tile_loadd(0, kblk + 16 * kstr + cc * 32, ks);
            _tile_dpbf16ps(3, 0, 1);
          }
          if (nt > 2) {
            _tile_loadd(0, kblk + 32 * kstr + cc * 32, ks);
            _tile_dpbf16ps(6, 0, 1);
          }
          if (nt > 3) {
            _tile_loadd(0, kblk + 48 * kstr + cc * 32, ks);
            _tile_dpbf16ps(7, 0, 1);
          }
        }
        _tile_stored(2, s, 64);
        if (nt > 1) _tile_stored(3, s + 256, 64);
        if (nt > 2) _tile_stored(6, s + 512, 64);
        if (nt > 3) _tile_stored(7, s + 768, 64);
        // Key j is visible to lane r iff key0 + j <= row0 + r (causal), key0 + j < n (not causal).
        const int64_t nkeys = nt * 16;
        __mmask16 vis[kPfKeys];
        // Maxima of the raw scores, then scaled (scale > 0: the same as the max of scaled scores).
        const __m512 ninf = _mm512_set1_ps(-INFINITY), sc = _mm512_set1_ps(scale);
        __m512 mx[4] = {ninf, ninf, ninf, ninf};  // four independent max chains
        for (int64_t j = 0; j < nkeys; ++j) {
          const int64_t first = key0 + j - row0;  // first lane that sees key j
          if (causal)
            vis[j] = first <= 0 ? 0xffff : first >= 16 ? 0 : static_cast<__mmask16>(0xffffu << first);
          else
            vis[j] = key0 + j < n ? 0xffff : 0;
          mx[j % 4] = _mm512_mask_max_ps(mx[j % 4], vis[j], mx[j % 4], _mm512_load_ps(s + j * 16));
        }
        const __m512 mnew =
            _mm512_max_ps(m, _mm512_mul_ps(_mm512_max_ps(_mm512_max_ps(mx[0], mx[1]), _mm512_max_ps(mx[2], mx[3])), sc));
        // Every lane has seen key 0 in the first block, so mnew is finite; there m = -inf and corr
        // is ~1e-38, multiplying l = 0 and O = 0.
        const __m512 corr = exp16_nonpos(_mm512_sub_ps(m, mnew));
        m = mnew;
        __m512 sums[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t j = 0; j < kPfKeys; j += 2) {
          __m512 p0 = _mm512_setzero_ps(), p1 = _mm512_setzero_ps();
          if (j < nkeys) {
            p0 = _mm512_maskz_mov_ps(vis[j], exp16_nonpos(_mm512_fmsub_ps(_mm512_load_ps(s + j * 16), sc, mnew)));
            p1 = _mm512_maskz_mov_ps(vis[j + 1], exp16_nonpos(_mm512_fmsub_ps(_mm512_load_ps(s + j * 16 + 16), sc, mnew)));
            sums[j % 4] = _mm512_add_ps(sums[j % 4], p0);
            sums[j % 4 + 1] = _mm512_add_ps(sums[j % 4 + 1], p1);
          }
          // bf16 pairs (key j, key j + 1) per lane: P^T rows, keys 0-31 then 32-63
          const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(p1, p0);
          _mm512_store_si512(pt + (j / 2) * 16, _mm512_permutexvar_epi16(pair_perm, both));
        }
        l = _mm512_fmadd_ps(l, corr, _mm512_add_ps(_mm512_add_ps(sums[0], sums[1]), _mm512_add_ps(sums[2], sums[3])));
        _tile_loadd(4, pt, 64);
        const bool second = nkeys > 32;
        if (second) _tile_loadd(5, pt + 256, 64);
        for (int64_t db0 = 0; db0 < DB; db0 += 4) {  // up to 4 dim blocks in flight: C in 2, 3, 6, 7
          const int64_t nb = std::min<int64_t>(4, DB - db0);
          const size_t vs = padded * sizeof(bf16);
          const bf16* va = vp + db0 * 16 * padded + key0;  // V^T rows of the first dim block
          KV_PV_BLOCK(2, va, vs, second);
          if (nb > 1) KV_PV_BLOCK(3, va + 16 * padded, vs, second);
          if (nb > 2) KV_PV_BLOCK(6, va + 32 * padded, vs, second);
          if (nb > 3) KV_PV_BLOCK(7, va + 48 * padded, vs, second);
          _tile_stored(2, c, 64);
          if (nb > 1) _tile_stored(3, c + 256, 64);
          if (nb > 2) _tile_stored(6, c + 512, 64);
          if (nb > 3) _tile_stored(7, c + 768, 64);
          for (int64_t i = 0; i < nb * 16; ++i) {
            float* orow = ot + (db0 * 16 + i) * 16;
            _mm512_store_ps(orow, _mm512_fmadd_ps(_mm512_load_ps(orow), corr, _mm512_load_ps(c + i * 16)));
          }
        }
      }
      // out[row] = O^T column / l; lse[row] = m + log(l)
      alignas(64) float inv_l[16], l_rows[16], m_rows[16];
      _mm512_store_ps(inv_l, _mm512_div_ps(_mm512_set1_ps(1.0f), l));
      _mm512_store_ps(l_rows, l);
      _mm512_store_ps(m_rows, m);
      const __m512i col = _mm512_mullo_epi32(row_ids, _mm512_set1_epi32(16));
      for (int64_t r = 0; r < rows; ++r) {
        if (lse) lse[(q_starts[p] + row0 + r) * Hq + h] = m_rows[r] + std::log(l_rows[r]);
        bf16* dst = out + ((q_starts[p] + row0 + r) * Hq + h) * D;
        const __m512 inv = _mm512_set1_ps(inv_l[r]);
        for (int64_t d = 0; d < D; d += 16) {
          const __m512 o = _mm512_i32gather_ps(col, ot + d * 16 + r, 4);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d), to_bf16(_mm512_mul_ps(o, inv)));
        }
      }
    }
    _tile_release();
  }
}
#undef KV_PV_BLOCK
#endif

}  // namespace

extern "C" {

void kv_rms_norm(int dtype, const void* x, void* residual, void* out, const void* w, int64_t rows, int64_t D,
                 float eps) {
  if (dtype == 1)
    rms_norm(static_cast<const bf16*>(x), static_cast<float*>(residual), static_cast<bf16*>(out),
             static_cast<const bf16*>(w), rows, D, eps);
  else
    rms_norm(static_cast<const float*>(x), static_cast<float*>(residual), static_cast<float*>(out),
             static_cast<const float*>(w), rows, D, eps);
}

void kv_silu_and_mul(int dtype, const void* x, void* out, int64_t rows, int64_t I) {
  if (dtype == 1)
    silu_and_mul(static_cast<const bf16*>(x), static_cast<bf16*>(out), rows, I);
  else
    silu_and_mul(static_cast<const float*>(x), static_cast<float*>(out), rows, I);
}

void kv_rotary(int dtype, void* q, void* k, const float* cos_sin, int64_t rows, int64_t Hq, int64_t Hk,
               int64_t D, int64_t q_stride, int64_t k_stride) {
  if (dtype == 1)
    rotary(static_cast<bf16*>(q), static_cast<bf16*>(k), cos_sin, rows, Hq, Hk, D, q_stride, k_stride);
  else
    rotary(static_cast<float*>(q), static_cast<float*>(k), cos_sin, rows, Hq, Hk, D, q_stride, k_stride);
}

void kv_write_kv(int dtype, const void* k, const void* v, int64_t k_stride, int64_t v_stride, void* k_cache,
                 void* v_cache, const int64_t* slots, int64_t rows, int64_t row) {
  if (dtype == 1)
    write_kv(static_cast<const bf16*>(k), static_cast<const bf16*>(v), k_stride, v_stride, static_cast<bf16*>(k_cache),
             static_cast<bf16*>(v_cache), slots, rows, row);
  else
    write_kv(static_cast<const float*>(k), static_cast<const float*>(v), k_stride, v_stride,
             static_cast<float*>(k_cache), static_cast<float*>(v_cache), slots, rows, row);
}

void kv_argmax_rows(int dtype, const void* x, int64_t* out, int64_t rows, int64_t cols, int64_t stride) {
  if (dtype == 1)
    argmax_rows(static_cast<const bf16*>(x), out, rows, cols, stride);
  else
    argmax_rows(static_cast<const float*>(x), out, rows, cols, stride);
}

void kv_sample_rows(int dtype, const void* x, int64_t* out, int64_t rows, int64_t cols, int64_t stride,
                    const float* inv_temp, const double* u) {
  if (dtype == 1)
    sample_rows(static_cast<const bf16*>(x), out, rows, cols, stride, inv_temp, u);
  else
    sample_rows(static_cast<const float*>(x), out, rows, cols, stride, inv_temp, u);
}

void kv_paged_attention(int dtype, const void* q, const void* k_cache, const void* v_cache, void* out,
                        const int64_t* block_tables, int64_t bt_stride, const int64_t* seq_lens,
                        const int64_t* qstart, const int64_t* reqs, int64_t n_reqs, int64_t Hq, int64_t Hk,
                        int64_t D, int64_t bs, float scale, int64_t skip_blocks, const void* init_out,
                        const float* init_lse) {
  if (dtype == 1)
    paged_attention_d<bf16>(q, k_cache, v_cache, out, block_tables, bt_stride, seq_lens, qstart, reqs, n_reqs, Hq,
                            Hk, D, bs, scale, skip_blocks, init_out, init_lse);
  else
    paged_attention_d<float>(q, k_cache, v_cache, out, block_tables, bt_stride, seq_lens, qstart, reqs, n_reqs, Hq,
                             Hk, D, bs, scale, skip_blocks, init_out, init_lse);
}

// Rows up to which kv_decode_matmul_bf16 beats oneDNN: kAmxMaxRows where AMX tiles are usable
// and allowed (compiled in and granted by the OS, asked once), kMr with AVX512_BF16 only, 0
// without it (or when K % 32 or N % 16 is not 0).
int kv_decode_matmul_max_rows(int64_t K, int64_t N, int allow_amx) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  if (K % 32 != 0 || N % 16 != 0) return 0;
  return allow_amx && amx_granted() ? kAmxMaxRows : kMr;
#else
  (void)K, (void)N, (void)allow_amx;
  return 0;
#endif
}

// allow_amx = 0 runs the AVX512_BF16 kernel even where AMX is usable (tests compare the two).
// out_f32: out is float32 (the float32 accumulators, unrounded), else bf16.
void kv_decode_matmul_bf16(const void* x, int64_t M, int64_t K, const void* Wv, int64_t N, void* out, int allow_amx,
                           int out_f32) {
  const bf16 *xb = static_cast<const bf16*>(x), *w = static_cast<const bf16*>(Wv);
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  if (allow_amx && amx_granted()) {
    if (out_f32) return decode_matmul_amx(xb, M, K, w, N, static_cast<float*>(out));
    return decode_matmul_amx(xb, M, K, w, N, static_cast<bf16*>(out));
  }
#else
  (void)allow_amx;
#endif
  if (out_f32) return decode_matmul_dp(xb, M, K, w, N, static_cast<float*>(out));
  decode_matmul_dp(xb, M, K, w, N, static_cast<bf16*>(out));
}

// Whether attention_amx applies (AMX granted, head size a multiple of 32 up to 256, its
// 32-bit gather offsets in range for every prompt); where not, callers run SDPA.
inline bool attention_amx_applies(const int64_t* lens, int64_t P, int64_t Hq, int64_t Hk, int64_t D,
                                      int64_t q_stride, int64_t v_stride) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  if (!amx_granted() || D % 32 != 0 || D > 256 || Hk <= 0 || Hq % Hk != 0) return false;
  for (int64_t p = 0; p < P; ++p)  // gather offsets (rows x stride / 2, rows up to the padded length) are 32-bit
    if ((lens[p] + kPfKeys) * std::max(q_stride, v_stride) / 2 >= (int64_t{1} << 31)) return false;
  return true;
#else
  (void)lens, (void)P, (void)Hq, (void)Hk, (void)D, (void)q_stride, (void)v_stride;
  return false;
#endif
}

// A whole stack of Llama decoder layers for one step in one call: the same kernels, in the same
// order, on the same values as the Python layers (model/llama.py) with the CPU attention backend,
// so the result is bit-identical; what it saves is the Python between them. The caller
// (ops/cpu_layers.py) has checked that it applies: bf16, decode_matmul for every linear (rows <=
// its max rows), no biases or q/k norms, each request's attention either a fresh prompt (the AMX
// prefill kernel) or the paged kernel's, after a cascade's shared prefix (the AMX kernel over every
// row of the step) where there is one. Returns 0, doing nothing, where the AMX kernel does not
// apply to the fresh prompts or the prefix (the caller then runs the Python layers), else 1.
// layer_ptrs: [L][8] = input norm w, qkv W, o W, post norm w, gate_up W, down W (decode_weight
// layouts), keys, values of the layer's cache. dims: M, H, Hq, Hk, D, I, block size, bt_stride,
// n_reqs (paged kernel's requests `reqs`), P (fresh prompts at rows fresh_starts, fresh_lens long),
// prefix blocks (0: no cascade), the first of them (consecutive ids).
// x: [M, H] the embeddings (read only); out: [M, H] the last layer's MLP output; residual: [M, H]
// float32, written (layer 0 starts it as x, as the Python layer does, then each norm adds into it).
// scratch: bf16, M * (H + 3 * Hq * D + (Hq + 2 * Hk) * D + 3 * I + 2 * Hq) + 32.
int kv_llama_layers_bf16(int64_t L, const int64_t* layer_ptrs, const void* x_, void* out_, float* residual,
                         void* scratch, const int64_t* dims, const float* cos_sin, const int64_t* slots,
                         const int64_t* block_tables, const int64_t* seq_lens, const int64_t* qstart,
                         const int64_t* reqs, const int64_t* fresh_starts, const int64_t* fresh_lens, float eps,
                         float scale) {
  const int64_t M = dims[0], H = dims[1], Hq = dims[2], Hk = dims[3], D = dims[4], I = dims[5], bs = dims[6];
  const int64_t bt_stride = dims[7], n_reqs = dims[8], P = dims[9], W = (Hq + 2 * Hk) * D;
  const int64_t prefix_blocks = dims[10], prefix_keys = prefix_blocks * bs, prefix_at = dims[11] * bs * Hk * D;
  if (P > 0 && !attention_amx_applies(fresh_lens, P, Hq, Hk, D, W, W)) return 0;
  if (prefix_blocks > 0 && !attention_amx_applies(&prefix_keys, 1, Hq, Hk, D, std::max(W, Hk * D), Hk * D))
    return 0;
  const bf16* x = static_cast<const bf16*>(x_);
  bf16* hidden = static_cast<bf16*>(out_);     // each layer's output, the next one's input
  bf16* normed = static_cast<bf16*>(scratch);  // [M, H]
  bf16* qkv = normed + M * H;                  // [M, W]
  bf16* q = qkv + M * W;                       // [M, Hq * D]: q rows, contiguous for the paged kernel
  bf16* attn = q + M * Hq * D;                 // [M, Hq * D]
  bf16* gate_up = attn + M * Hq * D;           // [M, 2I]
  bf16* act = gate_up + M * 2 * I;             // [M, I]
  bf16* prefix_out = act + M * I;              // [M, Hq, D]: attention over the shared prefix
  float* prefix_lse =  // [M, Hq] float32, 64-byte aligned (the scratch has room for it)
      reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(prefix_out + M * Hq * D) + 63) & ~uintptr_t{63});
  for (int64_t l = 0; l < L; ++l) {
    const int64_t* w = layer_ptrs + 8 * l;
    const bf16 *ln1 = reinterpret_cast<const bf16*>(w[0]), *ln2 = reinterpret_cast<const bf16*>(w[3]);
    bf16 *k_cache = reinterpret_cast<bf16*>(w[6]), *v_cache = reinterpret_cast<bf16*>(w[7]);
    if (l == 0) {  // residual <- x, normed <- norm(x)
      for (int64_t i = 0; i < M * H; ++i) residual[i] = bf2f(x[i]);
      rms_norm(x, static_cast<float*>(nullptr), normed, ln1, M, H, eps);
    } else {
      rms_norm(hidden, residual, normed, ln1, M, H, eps);
    }
    kv_decode_matmul_bf16(normed, M, H, reinterpret_cast<const void*>(w[1]), W, qkv, 1, 0);
    rotary(qkv, qkv + Hq * D, cos_sin, M, Hq, Hk, D, W, W);
    write_kv(qkv + Hq * D, qkv + (Hq + Hk) * D, W, W, k_cache, v_cache, slots, M, Hk * D);
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (P > 0)
      attention_amx(qkv, qkv + Hq * D, qkv + (Hq + Hk) * D, attn, nullptr, fresh_starts, fresh_lens, fresh_starts,
                    fresh_lens, P, Hq, Hk, D, W, W, W, scale, true);
    if (prefix_blocks > 0) {  // a cascade covers every row (the caller checked)
      const int64_t zero = 0;
      attention_amx(qkv, k_cache + prefix_at, v_cache + prefix_at, prefix_out, prefix_lse, &zero, &M, &zero,
                    &prefix_keys, 1, Hq, Hk, D, W, Hk * D, Hk * D, scale, false);
    }
#endif
    if (n_reqs > 0) {
      for (int64_t r = 0; r < M; ++r) std::memcpy(q + r * Hq * D, qkv + r * W, Hq * D * sizeof(bf16));
      paged_attention_d<bf16>(q, k_cache, v_cache, attn, block_tables, bt_stride, seq_lens, qstart, reqs, n_reqs,
                              Hq, Hk, D, bs, scale, prefix_blocks, prefix_blocks > 0 ? prefix_out : nullptr,
                              prefix_blocks > 0 ? prefix_lse : nullptr);
    }
    kv_decode_matmul_bf16(attn, M, Hq * D, reinterpret_cast<const void*>(w[2]), H, hidden, 1, 0);
    rms_norm(hidden, residual, normed, ln2, M, H, eps);
    kv_decode_matmul_bf16(normed, M, H, reinterpret_cast<const void*>(w[4]), 2 * I, gate_up, 1, 0);
    silu_and_mul(gate_up, act, M, I);
    kv_decode_matmul_bf16(act, M, I, reinterpret_cast<const void*>(w[5]), H, hidden, 1, 0);
  }
  return 1;
}

// Causal attention of fresh prompts (see attention_amx): returns 0, doing nothing, where
// it does not apply (no AMX, D not a multiple of 32 or over 256); the caller then runs SDPA.
int kv_prefill_attention_bf16(const void* q, const void* k, const void* v, void* out, const int64_t* starts,
                              const int64_t* lens, int64_t P, int64_t Hq, int64_t Hk, int64_t D, int64_t q_stride,
                              int64_t k_stride, int64_t v_stride, float scale) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  if (!attention_amx_applies(lens, P, Hq, Hk, D, q_stride, v_stride)) return 0;
  attention_amx(static_cast<const bf16*>(q), static_cast<const bf16*>(k), static_cast<const bf16*>(v),
                static_cast<bf16*>(out), nullptr, starts, lens, starts, lens, P, Hq, Hk, D, q_stride, k_stride,
                v_stride, scale, true);
  return 1;
#else
  (void)q, (void)k, (void)v, (void)out, (void)starts, (void)lens, (void)P, (void)Hq, (void)Hk, (void)D;
  (void)q_stride, (void)k_stride, (void)v_stride, (void)scale;
  return 0;
#endif
}

// Rows 0..T-1 of q over n keys / values, all visible (a cascade's shared prefix, read in place
// with row stride kv_stride): out [T, Hq, D] bf16 and lse [T, Hq] float32, the natural-log sum of
// exp of each row's scaled scores. Returns 0, doing nothing, where the kernel does not apply.
int kv_prefix_attention_bf16(const void* q, const void* k, const void* v, void* out, float* lse, int64_t T,
                             int64_t n, int64_t Hq, int64_t Hk, int64_t D, int64_t q_stride, int64_t kv_stride,
                             float scale) {
  const int64_t zero = 0;
  if (T <= 0 || n <= 0 || !attention_amx_applies(&n, 1, Hq, Hk, D, std::max(q_stride, kv_stride), kv_stride))
    return 0;
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  attention_amx(static_cast<const bf16*>(q), static_cast<const bf16*>(k), static_cast<const bf16*>(v),
                static_cast<bf16*>(out), lse, &zero, &T, &zero, &n, 1, Hq, Hk, D, q_stride, kv_stride, kv_stride, scale,
                false);
  return 1;
#else
  (void)q, (void)k, (void)v, (void)out, (void)lse, (void)scale, (void)zero;
  return 0;
#endif
}

}  // extern "C"
