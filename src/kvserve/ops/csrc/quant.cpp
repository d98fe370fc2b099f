// GGUF quantized weights computed with directly, kept as the file stores them (no repacking: memory
// is the file's size). Written once over the vector layer (vec.hpp); the block types in
// quant_blocks.hpp.
//
// W [N, K]: N rows, each K / block_size consecutive blocks (row_bytes = K / block_size * type_size).
//   dequant: W as float32, bit for bit gguf-py's dequantize (prompt-sized matmuls run MKL's GEMM
//            on it; embedding rows).
//   matmul:  out [M, N] = x [M, K] @ W^T for decode-sized M. Each weight is decoded in registers to
//            exactly dequant's value and multiplied with x in float32 (fma), so the result is
//            F.linear(x, dequant(W)) up to float32 summation order, and that order is fixed: lane l
//            of one accumulator per output sums k = l, l + 16, ... in turn, then reduce_add16's
//            tree, so every ISA, tile and batch size gives the same bits for a row.
// Each thread takes a contiguous range of tiles of kQuantNr weight rows and streams each row once
// for all M rows of x. Up to kQuantMr rows of x, blocks are decoded straight into registers, with
// their scales converted 16 blocks at a time and 4-bit blocks looked up in a 16-value table where
// the ISA permutes fast (quant_blocks.hpp); the bytes two tiles on are prefetched. Past kQuantMr
// rows a tile is decoded once into an L1 buffer that the register tile runs over for every group
// of x rows, K in passes of kQuantKc (one AVX-512 core, per block and row of x: 2.3 cycles decoding
// in registers for 4 rows, 1.7 through the buffer for 16).
// Not done: Q4_0 / Q4_1's scales factor out of a block's dot product (d * sum x q + m * sum x) but
// that costs as many vector operations per block at M = 1 (lookups of q, then one fma each for d
// and m) and sums large terms that cancel; llama.cpp's int8 dot products quantize x (not exact).
// Measured on a 2-core AVX-512 Xeon, default model's linears x 30 layers (each its own weights), x
// and out bf16: Q4_1 at M = 1 5.6 ms vs 10.7 ms for bf16 weights through decode_matmul (AVX2: 7.1
// vs 13.9); at M = 16 about equal (28 vs 25 ms; both bound by float32 FMAs there).
#if defined(__GNUC__) && !defined(__clang__)
// g++ contracts a * b + c into an fma even with -std=c++17 (only ISO C turns that off); gguf-py
// multiplies and adds separately. (Its products here are exact, so an fma would round the same
// way; this keeps the source's operations what runs regardless.)
#pragma GCC optimize("fp-contract=off")
#endif
#include <vector>

#include "kernels.hpp"
#include "quant_blocks.hpp"

namespace kv {
using namespace vec;
namespace {

constexpr int64_t kQuantKc = 512;  // values of K per pass of tile_chunk: its rows of x and w stay in L1

template <typename To>
inline To from_f32(float v) {
  if constexpr (std::is_same_v<To, float>) return v;
  else return f2bf(v);
}

// Up to 16 accumulators reduced together (lane j of reduce_add16 is reduce_add of the j-th) and
// written to their outputs.
template <typename To>
struct Sums {
  F32x16 acc[16];
  To* at[16];
  int n = 0;
  void push(F32x16 a, To* p) {
    acc[n] = a;
    at[n++] = p;
    if (n == 16) flush();
  }
  void flush() {
    if (n == 0) return;
    for (int t = n; t < 16; ++t) acc[t] = zero();
    alignas(64) float s[16];
    store(s, reduce_add16(acc));
    for (int t = 0; t < n; ++t) *at[t] = from_f32<To>(s[t]);
    n = 0;
  }
};

// MR rows of x (rows past mr repeat the last) x kQuantNr weight rows w[j] (rows past nr repeat the
// last; their sums are dropped), blocks decoded in registers.
template <typename F, int64_t MR, typename To>
inline void tile_fused(const float* x, int64_t K, const uint8_t* const* w, int64_t nr, To* out, int64_t N,
                       Sums<To>& sums) {
  constexpr int64_t NR = kQuantNr;
  F32x16 acc[MR][NR];
  for (int64_t i = 0; i < MR; ++i)
    for (int64_t j = 0; j < NR; ++j) acc[i][j] = zero();
  const int64_t nb = K / F::kBlock;
  // The same bytes two tiles on (rows are consecutive): the hardware prefetcher alone left M = 1
  // waiting on memory (default model's linears, 30 layers: 5.4-6.4 -> 4.3-4.9 ms; 1, 3, 6 tiles on
  // and prefetching to L2 only were slower).
  const int64_t ahead = 2 * NR * nb * F::kBytes;
  for (int64_t b0 = 0; b0 < nb; b0 += F::kGroup) {
    const int n = static_cast<int>(std::min<int64_t>(F::kGroup, nb - b0));
    alignas(64) float s[NR][32];
    for (int64_t j = 0; j < NR; ++j) F::scales(w[j] + b0 * F::kBytes, n, s[j]);
    for (int g = 0; g < n * F::kChunks; ++g) {
      const int64_t b = b0 + g / F::kChunks, k = b * F::kBlock + 32 * (g % F::kChunks);
      F32x16 w0[NR], w1[NR];
      for (int64_t j = 0; j < NR; ++j)
        F::template decode<true>(w[j] + b * F::kBytes, g % F::kChunks, s[j], g, w0[j], w1[j]);
      for (int64_t j = 0; j < NR; ++j) {  // (a hint: never faults, even past the end)
        const uintptr_t at = reinterpret_cast<uintptr_t>(w[j] + b * F::kBytes) + ahead;
        __builtin_prefetch(reinterpret_cast<const void*>(at + (g % F::kChunks) * (F::kBytes / F::kChunks)));
      }
      for (int64_t i = 0; i < MR; ++i) {
        const F32x16 x0 = load(x + i * K + k), x1 = load(x + i * K + k + 16);
        for (int64_t j = 0; j < NR; ++j) acc[i][j] = fma(x1, w1[j], fma(x0, w0[j], acc[i][j]));
      }
    }
  }
  for (int64_t i = 0; i < MR; ++i)
    for (int64_t j = 0; j < nr; ++j) sums.push(acc[i][j], out + i * N + j);
}

// kQuantMr rows of x (x[i]) x kQuantNr decoded weight rows (w + j * K) over values k0 .. k0 + kc,
// continuing the sums acc[i * kQuantNr + j] (from 0 where k0 == 0): tile_fused's order, in passes
// that keep x's and w's rows in L1.
inline void tile_chunk(const float* const* x, const float* w, int64_t K, int64_t k0, int64_t kc, F32x16* acc) {
  constexpr int64_t MR = kQuantMr, NR = kQuantNr;
  F32x16 a[MR][NR];
  for (int64_t i = 0; i < MR; ++i)
    for (int64_t j = 0; j < NR; ++j) a[i][j] = k0 == 0 ? zero() : acc[i * NR + j];
  for (int64_t k = k0; k < k0 + kc; k += 16) {
    F32x16 wv[NR];
    for (int64_t j = 0; j < NR; ++j) wv[j] = load(w + j * K + k);
    for (int64_t i = 0; i < MR; ++i) {
      const F32x16 xv = load(x[i] + k);
      for (int64_t j = 0; j < NR; ++j) a[i][j] = fma(xv, wv[j], a[i][j]);
    }
  }
  for (int64_t i = 0; i < MR; ++i)
    for (int64_t j = 0; j < NR; ++j) acc[i * NR + j] = a[i][j];
}

template <typename F, bool kFma>
inline void decode_row(const uint8_t* row, int64_t K, float* out) {
  const int64_t nb = K / F::kBlock;
  for (int64_t b0 = 0; b0 < nb; b0 += F::kGroup) {
    const int n = static_cast<int>(std::min<int64_t>(F::kGroup, nb - b0));
    alignas(64) float s[32];
    F::scales(row + b0 * F::kBytes, n, s);
    for (int g = 0; g < n * F::kChunks; ++g) {
      const int64_t b = b0 + g / F::kChunks;
      float* o = out + b * F::kBlock + 32 * (g % F::kChunks);
      F32x16 w0, w1;
      F::template decode<kFma>(row + b * F::kBytes, g % F::kChunks, s, g, w0, w1);
      store(o, w0);
      store(o + 16, w1);
    }
  }
}

// tile_fused with M <= MR rows, the size as a template argument.
template <typename F, int64_t MR, typename To>
inline void tile_rows(int64_t M, const float* x, int64_t K, const uint8_t* const* w, int64_t nr, To* out, int64_t N,
                      Sums<To>& sums) {
  if constexpr (MR > 1) {
    if (M < MR) return tile_rows<F, MR - 1>(M, x, K, w, nr, out, N, sums);
  }
  tile_fused<F, MR>(x, K, w, nr, out, N, sums);
}

// Each thread takes a contiguous range of tiles of kQuantNr weight rows and streams each row once
// for all M rows of x: up to kQuantMr rows decoded in registers (tile_fused), else decoded once into
// a buffer that tile_chunk runs over for every kQuantMr rows of x.
template <typename F, typename To>
void matmul_rows(const float* x, int64_t M, int64_t K, const uint8_t* W, int64_t N, To* out) {
  constexpr int64_t NR = kQuantNr;
  const int64_t row_bytes = K / F::kBlock * F::kBytes, n_tiles = (N + NR - 1) / NR;
  const int64_t MP = (M + kQuantMr - 1) / kQuantMr * kQuantMr;  // rows past M repeat the last (dropped)
  const bool fused = M <= kQuantMr;
#pragma omp parallel
  {
    Sums<To> sums;
    static thread_local std::vector<F32x16> rows, acc;  // [NR][K] decoded rows, [MP][NR] sums (64-byte aligned)
    if (!fused && rows.size() < static_cast<size_t>(NR * K / 16)) rows.resize(NR * K / 16);
    if (!fused && acc.size() < static_cast<size_t>(MP * NR)) acc.resize(MP * NR);
    float* decoded = reinterpret_cast<float*>(rows.data());
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n_tiles; ++t) {
      const int64_t n0 = t * NR, nr = std::min(NR, N - n0);
      const uint8_t* w[NR];  // rows past N repeat the last (dropped)
      for (int64_t j = 0; j < NR; ++j) w[j] = W + std::min(n0 + j, N - 1) * row_bytes;
      if (fused) {
        tile_rows<F, kQuantMr>(M, x, K, w, nr, out + n0, N, sums);
        continue;
      }
      for (int64_t j = 0; j < NR; ++j) decode_row<F, true>(w[j], K, decoded + j * K);
      for (int64_t k0 = 0; k0 < K; k0 += kQuantKc)
        for (int64_t m0 = 0; m0 < M; m0 += kQuantMr) {
          const float* xr[kQuantMr];
          for (int64_t i = 0; i < kQuantMr; ++i) xr[i] = x + std::min(m0 + i, M - 1) * K;
          tile_chunk(xr, decoded, K, k0, std::min(kQuantKc, K - k0), acc.data() + m0 * NR);
        }
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < nr; ++j) sums.push(acc[i * NR + j], out + i * N + n0 + j);
    }
    sums.flush();
  }
}

}  // namespace

bool quant_dequant(int type, const uint8_t* blocks, int64_t rows, int64_t K, float* out) {
  if (quant_matmul_max_rows(type, K, 1) == 0) return false;
  return quant::with_format(type, [&](auto f) {
    using F = decltype(f);
    const int64_t row_bytes = K / F::kBlock * F::kBytes;
#pragma omp parallel for schedule(static) if (rows * K >= (1 << 16))
    for (int64_t r = 0; r < rows; ++r) decode_row<F, false>(blocks + r * row_bytes, K, out + r * K);
  });
}

int quant_matmul_max_rows(int type, int64_t K, int64_t N) {
  int rows = 0;
  quant::with_format(type, [&](auto f) {
    if (K > 0 && N > 0 && K % decltype(f)::kBlock == 0) rows = static_cast<int>(kQuantMaxRows);
  });
  return rows;
}

bool quant_matmul(int type, const void* x, bool x_bf16, int64_t M, int64_t K, const uint8_t* blocks, int64_t N,
                  void* out, bool out_bf16) {
  if (quant_matmul_max_rows(type, K, N) == 0 || M <= 0) return false;
  const float* xf = static_cast<const float*>(x);
  if (x_bf16) {  // x to float32 once (each element is used once per weight tile)
    static thread_local std::vector<F32x16> buffer;  // (64-byte aligned)
    if (buffer.size() < static_cast<size_t>(M * K / 16)) buffer.resize(M * K / 16);
    const bf16* xb = static_cast<const bf16*>(x);
    for (int64_t i = 0; i < M * K / 16; ++i) buffer[i] = load(xb + 16 * i);  // K % 32 == 0
    xf = reinterpret_cast<const float*>(buffer.data());
  }
  return quant::with_format(type, [&](auto f) {
    using F = decltype(f);
    if (out_bf16) matmul_rows<F>(xf, M, K, blocks, N, static_cast<bf16*>(out));
    else matmul_rows<F>(xf, M, K, blocks, N, static_cast<float*>(out));
  });
}

}  // namespace kv

// type: GGML type id (2 Q4_0, 3 Q4_1, 8 Q8_0, 12 Q4_K, 13 Q5_K, 14 Q6_K) or 100 (Q4_Z); blocks: [rows][K / block
// size blocks] as GGUF stores them; out: [rows, K] float32. Does nothing for other types or K.
KV_API void kv_quant_dequant(int type, const void* blocks, int64_t rows, int64_t K, float* out) {
  kv::quant_dequant(type, static_cast<const uint8_t*>(blocks), rows, K, out);
}

// out [M, N] = x [M, K] @ dequant(W)^T; x_dtype / out_dtype: 0 float32, 1 bfloat16 (rounded once).
KV_API void kv_quant_matmul(int type, const void* x, int x_dtype, int64_t M, int64_t K, const void* blocks, int64_t N,
                            void* out, int out_dtype) {
  kv::quant_matmul(type, x, x_dtype == 1, M, K, static_cast<const uint8_t*>(blocks), N, out, out_dtype == 1);
}

// Rows up to which kv_quant_matmul beats dequantizing W and the library GEMM (kQuantMaxRows);
// 0 where it does not apply (type, K not a whole number of blocks).
KV_API int kv_quant_matmul_max_rows(int type, int64_t K, int64_t N) { return kv::quant_matmul_max_rows(type, K, N); }
