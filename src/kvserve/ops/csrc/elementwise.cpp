// Row-wise kernels: RMSNorm with the residual add fused, SiLU(gate) * up, rotary embedding, and
// the KV cache write. Written once over the vector layer (vec.hpp); rows go to OpenMP threads.
#include "kernels.hpp"

namespace kv {
using namespace vec;

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
    F32x16 acc = zero();
    for (int64_t i = 0; i < D; i += 16) {
      const int64_t n = D - i;  // lanes past n load as 0 and add nothing
      F32x16 h = load_n(xr + i, n);
      if (res) {
        h = add(h, load_n(res + i, n));
        store_n(res + i, h, n);
      }
      acc = fma(h, h, acc);
    }
    const F32x16 inv = set1(1.0f / std::sqrt(reduce_add(acc) / static_cast<float>(D) + eps));
    for (int64_t i = 0; i < D; i += 16) {
      const int64_t n = D - i;
      const F32x16 h = res ? load_n(res + i, n) : load_n(xr + i, n);
      store_n(o + i, mul(load_n(w + i, n), round_to<T>(mul(h, inv))), n);
    }
  }
}

// ---- SiLU(gate) * up ----------------------------------------------------------------------
// x: [rows, 2 * I] laid out [gate | up]; out: [rows, I]. silu(g) = g / (1 + e^-g), rounded to T
// before the multiply, as torch's silu then mul.
template <typename T>
void silu_and_mul(const T* x, T* out, int64_t rows, int64_t I) {
#pragma omp parallel for schedule(static) if (rows * I > 32768)
  for (int64_t r = 0; r < rows; ++r) {
    const T* g = x + r * 2 * I;
    const T* u = g + I;
    T* o = out + r * I;
    for (int64_t i = 0; i < I; i += 16) {
      const int64_t n = I - i;
      const F32x16 a = load_n(g + i, n);
      const F32x16 s = round_to<T>(div(a, add(set1(1.0f), exp(sub(zero(), a)))));
      store_n(o + i, mul(s, load_n(u + i, n)), n);
    }
  }
}

// ---- Rotary embedding (neox / rotate_half layout), in place ----------------------------------
// q: rows of Hq heads of D at row stride q_stride; k likewise (Hk heads, k_stride);
// cos_sin: [rows, D] float32, cos in the first half, sin in the second. cos and sin are rounded
// to T first and every product and sum after, as Hugging Face's rotate_half in the model dtype.
template <typename T>
void rotary(T* q, T* k, const float* cos_sin, int64_t rows, int64_t Hq, int64_t Hk, int64_t D, int64_t q_stride,
            int64_t k_stride) {
  const int64_t half = D / 2;
#pragma omp parallel for schedule(static) if (rows * (Hq + Hk) * D > 32768)
  for (int64_t t = 0; t < rows; ++t) {
    const float* c = cos_sin + t * D;
    const float* s = c + half;
    for (int64_t h = 0; h < Hq + Hk; ++h) {
      T* x = h < Hq ? q + t * q_stride + h * D : k + t * k_stride + (h - Hq) * D;
      for (int64_t i = 0; i < half; i += 16) {
        const int64_t n = half - i;
        const F32x16 cc = round_to<T>(load_n(c + i, n)), ss = round_to<T>(load_n(s + i, n));
        const F32x16 x1 = load_n(x + i, n), x2 = load_n(x + i + half, n);
        store_n(x + i, sub(round_to<T>(mul(x1, cc)), round_to<T>(mul(x2, ss))), n);
        store_n(x + i + half, add(round_to<T>(mul(x2, cc)), round_to<T>(mul(x1, ss))), n);
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

#define KV_INSTANTIATE(T)                                                                                     \
  template void rms_norm<T>(const T*, float*, T*, const T*, int64_t, int64_t, float);                         \
  template void silu_and_mul<T>(const T*, T*, int64_t, int64_t);                                              \
  template void rotary<T>(T*, T*, const float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);        \
  template void write_kv<T>(const T*, const T*, int64_t, int64_t, T*, T*, const int64_t*, int64_t, int64_t);
KV_INSTANTIATE(float)
KV_INSTANTIATE(bf16)
#undef KV_INSTANTIATE

}  // namespace kv

using kv::bf16;

KV_API void kv_rms_norm(int dtype, const void* x, void* residual, void* out, const void* w, int64_t rows, int64_t D,
                        float eps) {
  if (dtype == 1)
    kv::rms_norm(static_cast<const bf16*>(x), static_cast<float*>(residual), static_cast<bf16*>(out),
                 static_cast<const bf16*>(w), rows, D, eps);
  else
    kv::rms_norm(static_cast<const float*>(x), static_cast<float*>(residual), static_cast<float*>(out),
                 static_cast<const float*>(w), rows, D, eps);
}

KV_API void kv_silu_and_mul(int dtype, const void* x, void* out, int64_t rows, int64_t I) {
  if (dtype == 1)
    kv::silu_and_mul(static_cast<const bf16*>(x), static_cast<bf16*>(out), rows, I);
  else
    kv::silu_and_mul(static_cast<const float*>(x), static_cast<float*>(out), rows, I);
}

KV_API void kv_rotary(int dtype, void* q, void* k, const float* cos_sin, int64_t rows, int64_t Hq, int64_t Hk,
                      int64_t D, int64_t q_stride, int64_t k_stride) {
  if (dtype == 1)
    kv::rotary(static_cast<bf16*>(q), static_cast<bf16*>(k), cos_sin, rows, Hq, Hk, D, q_stride, k_stride);
  else
    kv::rotary(static_cast<float*>(q), static_cast<float*>(k), cos_sin, rows, Hq, Hk, D, q_stride, k_stride);
}

KV_API void kv_write_kv(int dtype, const void* k, const void* v, int64_t k_stride, int64_t v_stride, void* k_cache,
                        void* v_cache, const int64_t* slots, int64_t rows, int64_t row) {
  if (dtype == 1)
    kv::write_kv(static_cast<const bf16*>(k), static_cast<const bf16*>(v), k_stride, v_stride,
                 static_cast<bf16*>(k_cache), static_cast<bf16*>(v_cache), slots, rows, row);
  else
    kv::write_kv(static_cast<const float*>(k), static_cast<const float*>(v), k_stride, v_stride,
                 static_cast<float*>(k_cache), static_cast<float*>(v_cache), slots, rows, row);
}
