// AMX tile kernels, written for AMX by hand (the one ISA whose code the vector layer does not
// cover): the decode matmul's tile loop and attention of fresh prompts and shared prefixes. Built
// into the amx level only; in other builds amx_granted() is false and the rest is never called.
#include <vector>

#include "kernels.hpp"

#ifdef __linux__
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace kv {

// Whether this process may use AMX tiles: Linux grants them on request (once per process).
bool amx_granted() {
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
inline __m512 exp_nonpos512(__m512 x) { return vec::exp_nonpos(vec::F32x16{x}).v; }

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

// ---- Decode-sized matmul on AMX tiles (matmul.cpp has the layout and the vector kernel) ---------
// 16 pairs x 16 columns of a weight block are one 1 KB B tile; compute is nearly free, so the loop
// only streams W. Default model, 30 layers' weights from DRAM (measured while it still prefetched
// in software): batch 16 14 ms, 64 19 ms, 256 37 ms against oneDNN's packed matmul 19 / 28 / 48
// ms; 512 rows 65 vs 74 ms, 768 about even, 1,024 144 vs 124. Used up to kAmxMaxRows rows.
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
          for (int64_t i = 0; i < rows; ++i) vec::store(dst + i * N, vec::F32x16{_mm512_load_ps(c + 16 * i)});
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
        const __m512 corr = exp_nonpos512(_mm512_sub_ps(m, mnew));
        m = mnew;
        __m512 sums[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t j = 0; j < kPfKeys; j += 2) {
          __m512 p0 = _mm512_setzero_ps(), p1 = _mm512_setzero_ps();
          if (j < nkeys) {
            p0 = _mm512_maskz_mov_ps(vis[j], exp_nonpos512(_mm512_fmsub_ps(_mm512_load_ps(s + j * 16), sc, mnew)));
            p1 = _mm512_maskz_mov_ps(vis[j + 1], exp_nonpos512(_mm512_fmsub_ps(_mm512_load_ps(s + j * 16 + 16), sc, mnew)));
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
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d), vec::to_bf16_bits(_mm512_mul_ps(o, inv)));
        }
      }
    }
    _tile_release();
  }
}
#undef KV_PV_BLOCK

bool attention_amx_applies(const int64_t* lens, int64_t P, int64_t Hq, int64_t Hk, int64_t D, int64_t q_stride,
                           int64_t v_stride) {
  if (!amx_granted() || D % 32 != 0 || D > 256 || Hk <= 0 || Hq % Hk != 0) return false;
  for (int64_t p = 0; p < P; ++p)  // gather offsets (rows x stride / 2, rows up to the padded length) are 32-bit
    if ((lens[p] + kPfKeys) * std::max(q_stride, v_stride) / 2 >= (int64_t{1} << 31)) return false;
  return true;
}

template void decode_matmul_amx<float>(const bf16*, int64_t, int64_t, const bf16*, int64_t, float*);
template void decode_matmul_amx<bf16>(const bf16*, int64_t, int64_t, const bf16*, int64_t, bf16*);

#else  // no AMX in this build: never called (amx_granted() is false)

bool attention_amx_applies(const int64_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t) { return false; }
template <typename To>
void decode_matmul_amx(const bf16*, int64_t, int64_t, const bf16*, int64_t, To*) { __builtin_trap(); }
template void decode_matmul_amx<float>(const bf16*, int64_t, int64_t, const bf16*, int64_t, float*);
template void decode_matmul_amx<bf16>(const bf16*, int64_t, int64_t, const bf16*, int64_t, bf16*);
void attention_amx(const bf16*, const bf16*, const bf16*, bf16*, float*, const int64_t*, const int64_t*,
                   const int64_t*, const int64_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float,
                   bool) {
  __builtin_trap();
}

#endif

}  // namespace kv

using kv::bf16;

KV_API int kv_amx_granted() { return kv::amx_granted(); }

// Causal attention of fresh prompts (see attention_amx): returns 0, doing nothing, where
// it does not apply (no AMX, D not a multiple of 32 or over 256); the caller then runs SDPA.
KV_API int kv_prefill_attention_bf16(const void* q, const void* k, const void* v, void* out, const int64_t* starts,
                                     const int64_t* lens, int64_t P, int64_t Hq, int64_t Hk, int64_t D,
                                     int64_t q_stride, int64_t k_stride, int64_t v_stride, float scale) {
  if (!kv::attention_amx_applies(lens, P, Hq, Hk, D, q_stride, v_stride)) return 0;
  kv::attention_amx(static_cast<const bf16*>(q), static_cast<const bf16*>(k), static_cast<const bf16*>(v),
                    static_cast<bf16*>(out), nullptr, starts, lens, starts, lens, P, Hq, Hk, D, q_stride, k_stride,
                    v_stride, scale, true);
  return 1;
}

// Rows 0..T-1 of q over n keys / values, all visible (a cascade's shared prefix, read in place
// with row stride kv_stride): out [T, Hq, D] bf16 and lse [T, Hq] float32, the natural-log sum of
// exp of each row's scaled scores. Returns 0, doing nothing, where the kernel does not apply.
KV_API int kv_prefix_attention_bf16(const void* q, const void* k, const void* v, void* out, float* lse, int64_t T,
                                    int64_t n, int64_t Hq, int64_t Hk, int64_t D, int64_t q_stride, int64_t kv_stride,
                                    float scale) {
  const int64_t zero = 0;
  if (T <= 0 || n <= 0 || !kv::attention_amx_applies(&n, 1, Hq, Hk, D, std::max(q_stride, kv_stride), kv_stride))
    return 0;
  kv::attention_amx(static_cast<const bf16*>(q), static_cast<const bf16*>(k), static_cast<const bf16*>(v),
                    static_cast<bf16*>(out), lse, &zero, &T, &zero, &n, 1, Hq, Hk, D, q_stride, kv_stride, kv_stride,
                    scale, false);
  return 1;
}
