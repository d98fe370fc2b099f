// Decode-sized matmul: out = x @ W^T with bf16 weights in a column-block pair-interleaved layout,
// float32 accumulation. Written once over the vector layer (vec.hpp); AMX tiles in amx.cpp.
//
// x: [M, K] bf16 rows; W [N, K] rearranged as [N / 16][K / 2][16][2] (block b, pair p, column j
// holds W[16b + j][2p .. 2p + 1]); out: [M, N] bf16 (rounded once) or float32 (the sums).
// At decode batch sizes the matmul is bound by streaming W from memory (the model's weights do not
// stay in cache between steps): one vector load gives 16 columns' pairs, which dot_pairs multiplies
// with the broadcast x pair (vdpbf16ps with AVX512_BF16; elsewhere the pairs are converted in
// registers and multiplied by two FMAs, in vdpbf16ps's order). A register tile of kMatmulMr rows x
// kMatmulNr column blocks per step (vec*.hpp sizes it for the ISA's register file). Each thread
// streams its columns' weights front to back through all rows, so W is read from memory once and
// the hardware prefetcher keeps ahead of it; software prefetches of the next blocks (tried) filled
// the line-fill buffers and slowed the stream: 30 layers' linears from DRAM, in model order, batch
// 1 12.3 -> 10.7 ms, batch 16 13.7 -> 11.3 ms (AVX512_BF16), batch 64 and up unchanged.
#include <omp.h>

#include <algorithm>
#include <vector>

#include "kernels.hpp"

namespace kv {
using namespace vec;
namespace {

using XT = PairScalar;  // what bcast_pair reads x from

template <int64_t MR, int64_t NR, typename To>
inline void tile(const XT* x, int64_t K, const bf16* w, int64_t P, To* out, int64_t N, bool streamed) {
  F32x16 acc[MR][NR];
  for (int64_t i = 0; i < MR; ++i)
    for (int64_t j = 0; j < NR; ++j) acc[i][j] = zero();
  const int64_t block = P * 32;  // elements of one column block
  for (int64_t p = 0; p < P; ++p) {
    Pairs wv[NR];
    for (int64_t j = 0; j < NR; ++j) wv[j] = load_pairs(w + j * block + p * 32);
    for (int64_t i = 0; i < MR; ++i) {
      const Pairs xb = bcast_pair(x + i * K + 2 * p);
      for (int64_t j = 0; j < NR; ++j) acc[i][j] = dot_pairs(acc[i][j], xb, wv[j]);
    }
  }
  for (int64_t i = 0; i < MR; ++i)
    for (int64_t j = 0; j < NR; ++j) {
      if constexpr (std::is_same_v<To, float>) {
        if (streamed) {
          stream(out + i * N + j * 16, acc[i][j]);
          continue;
        }
      }
      store(out + i * N + j * 16, acc[i][j]);
    }
}

// The register tile's accumulators (kMatmulMr x kMatmulNr vectors) go to more column blocks when
// fewer rows fill it (at most 4): a tile of one row and one block is two chains of dependent FMAs
// (dot_pairs), latency-bound; four blocks are independent chains. Each column's sums are the same
// in any tile, so results do not depend on it. AVX2 (1 x 1 -> 1 x 4), the default model's linears x
// 30 layers, M = 1, one thread: 30.5 -> 20.9 ms (AVX-512's 4 x 4 tile, the same code: 19.7-22.4).
constexpr int64_t nr_for_rows(int64_t m) {
  const int64_t nr = kMatmulMr * kMatmulNr / std::min(std::max<int64_t>(m, 1), kMatmulMr);
  return std::min<int64_t>(std::max(nr, kMatmulNr), 4);
}

// Tiles of mr <= kMatmulMr rows and nr <= nr_for_rows(mr) blocks, the sizes as template arguments.
template <int64_t MR, typename To>
inline void tile_nr(int64_t nr, const XT* x, int64_t K, const bf16* w, int64_t P, To* out, int64_t N, bool streamed) {
  if constexpr (nr_for_rows(MR) >= 4)
    if (nr == 4) return tile<MR, 4>(x, K, w, P, out, N, streamed);
  if constexpr (nr_for_rows(MR) >= 3)
    if (nr == 3) return tile<MR, 3>(x, K, w, P, out, N, streamed);
  if constexpr (nr_for_rows(MR) >= 2)
    if (nr == 2) return tile<MR, 2>(x, K, w, P, out, N, streamed);
  tile<MR, 1>(x, K, w, P, out, N, streamed);
}

template <typename To>
inline void tile_mr(int64_t mr, int64_t nr, const XT* x, int64_t K, const bf16* w, int64_t P, To* out, int64_t N,
                    bool streamed) {
  if constexpr (kMatmulMr >= 4)
    if (mr == 4) return tile_nr<4>(nr, x, K, w, P, out, N, streamed);
  if constexpr (kMatmulMr >= 3)
    if (mr == 3) return tile_nr<3>(nr, x, K, w, P, out, N, streamed);
  if constexpr (kMatmulMr >= 2)
    if (mr == 2) return tile_nr<2>(nr, x, K, w, P, out, N, streamed);
  tile_nr<1>(nr, x, K, w, P, out, N, streamed);
}

template <typename To>
void matmul_vec(const XT* x, int64_t M, int64_t K, const bf16* W, int64_t N, To* out) {
  const int64_t P = K / 2, NB = N / 16, NR = nr_for_rows(M);
  // A float32 output past the caches (the LM head's logits: 256 rows x 49,152 = 50 MB) is written
  // with streaming stores, which skip reading each line in first (AMX kernel: 256 rows 15.1 ->
  // 8.1-8.9 ms). Rows are 64-byte aligned when out is (N % 16 == 0).
  const bool streamed = std::is_same_v<To, float> && M * N * static_cast<int64_t>(sizeof(To)) > (8 << 20) &&
                        reinterpret_cast<uintptr_t>(out) % 64 == 0;
  // Each thread takes an equal share of the column blocks (tiles of NR, the last of its share
  // shorter): tiles dealt out whole left one thread a tile more (N = 576, NR = 4: 5 and 4).
#pragma omp parallel
  {
    const int64_t threads = omp_get_num_threads(), me = omp_get_thread_num();
    const int64_t first = NB * me / threads, last = NB * (me + 1) / threads;
    for (int64_t b0 = first; b0 < last; b0 += NR) {
      const int64_t nr = std::min(NR, last - b0);
      const bf16* w = W + b0 * P * 32;
      for (int64_t m0 = 0; m0 < M; m0 += kMatmulMr)  // (nr <= nr_for_rows of any fewer rows)
        tile_mr(std::min(kMatmulMr, M - m0), nr, x + m0 * K, K, w, P, out + m0 * N + b0 * 16, N, streamed);
    }
    if (streamed) stream_fence();  // streaming stores visible before the region's barrier
  }
}

}  // namespace

void decode_matmul(const bf16* x, int64_t M, int64_t K, const bf16* w, int64_t N, void* out, bool out_f32,
                   bool allow_amx) {
  if (allow_amx && amx_granted()) {
    if (out_f32) return decode_matmul_amx(x, M, K, w, N, static_cast<float*>(out));
    return decode_matmul_amx(x, M, K, w, N, static_cast<bf16*>(out));
  }
  const XT* xs;
  if constexpr (kNativePairs) {
    xs = reinterpret_cast<const XT*>(x);  // (XT is bf16)
  } else {  // x to float32 once (the tile broadcasts each element once per column block)
    static thread_local std::vector<float> buffer;
    if (buffer.size() < static_cast<size_t>(M * K)) buffer.resize(M * K);
    for (int64_t i = 0; i < M * K; i += 16) store_n(buffer.data() + i, load_n(x + i, M * K - i), M * K - i);
    xs = reinterpret_cast<const XT*>(buffer.data());  // (XT is float)
  }
  if (out_f32) return matmul_vec(xs, M, K, w, N, static_cast<float*>(out));
  matmul_vec(xs, M, K, w, N, static_cast<bf16*>(out));
}

// Rows up to which the decode matmul beats the library matmul kvserve runs otherwise (oneDNN;
// on AVX2, float32 weights through MKL): kAmxMaxRows where AMX tiles are usable and allowed,
// else the vector kernel's measured crossover (vec*.hpp); 0 where the shape does not fit.
int decode_matmul_max_rows(int64_t K, int64_t N, bool allow_amx) {
  if (K % 32 != 0 || N % 16 != 0) return 0;
  return allow_amx && amx_granted() ? static_cast<int>(kAmxMaxRows) : static_cast<int>(kMatmulMaxRows);
}

}  // namespace kv

KV_API int kv_decode_matmul_max_rows(int64_t K, int64_t N, int allow_amx) {
  return kv::decode_matmul_max_rows(K, N, allow_amx != 0);
}

// allow_amx = 0 runs the vector kernel even where AMX is usable (tests compare the two).
// out_f32: out is float32 (the float32 accumulators, unrounded), else bf16.
KV_API void kv_decode_matmul_bf16(const void* x, int64_t M, int64_t K, const void* w, int64_t N, void* out,
                                  int allow_amx, int out_f32) {
  kv::decode_matmul(static_cast<const kv::bf16*>(x), M, K, static_cast<const kv::bf16*>(w), N, out, out_f32 != 0,
                    allow_amx != 0);
}
