// Sampling from logits rows: greedy (argmax) and one categorical draw by inverse CDF. Written once
// over the vector layer (vec.hpp); rows go to OpenMP threads.
#include <vector>

#include "kernels.hpp"

namespace kv {
using namespace vec;
namespace {

// Largest value of row[0..cols).
template <typename T>
float row_max(const T* row, int64_t cols) {
  F32x16 m = set1(-INFINITY);
  for (int64_t j = 0; j < cols; j += 16) m = max(m, select(first_lanes(cols - j), load_n(row + j, cols - j), m));
  return reduce_max(m);
}

// First index j with row[j] == m (0 when none: a row holding NaN).
template <typename T>
int64_t first_index_of(const T* row, int64_t cols, float m) {
  const F32x16 mb = set1(m);
  for (int64_t j = 0; j < cols; j += 16) {
    const Mask hit = eq(load_n(row + j, cols - j), mb) & first_lanes(cols - j);
    if (hit) return j + __builtin_ctz(hit);
  }
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
    std::vector<float> e(nb * W, 0.0f);  // this thread's row of weights (tail lanes 0)
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
        const F32x16 v = maskz(first_lanes(cols - j0), exp(mul(sub(load_n(row + j0, cols - j0), set1(m)), set1(it))));
        store(e.data() + j0, v);
        bsum[b] = reduce_add(v);
        total += bsum[b];
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

}  // namespace
}  // namespace kv

using kv::bf16;

KV_API void kv_argmax_rows(int dtype, const void* x, int64_t* out, int64_t rows, int64_t cols, int64_t stride) {
  if (dtype == 1)
    kv::argmax_rows(static_cast<const bf16*>(x), out, rows, cols, stride);
  else
    kv::argmax_rows(static_cast<const float*>(x), out, rows, cols, stride);
}

KV_API void kv_sample_rows(int dtype, const void* x, int64_t* out, int64_t rows, int64_t cols, int64_t stride,
                           const float* inv_temp, const double* u) {
  if (dtype == 1)
    kv::sample_rows(static_cast<const bf16*>(x), out, rows, cols, stride, inv_temp, u);
  else
    kv::sample_rows(static_cast<const float*>(x), out, rows, cols, stride, inv_temp, u);
}
