// Paged attention, reading the KV cache in place. Written once over the vector layer (vec.hpp).
//
// For each listed request b: its query rows qstart[b]..qstart[b+1] (positions seq_lens[b] - qlen ..
// seq_lens[b] - 1) attend causally to its context, held in blocks block_tables[b, :] of the cache.
// q, out: [T, Hq, D]; k_cache, v_cache: [num_blocks, bs, Hk, D]. Online softmax over blocks, so
// nothing of size context is materialised. A work item is (request, query tile, kv heads h0..h1):
// each block's [bs, h0..h1, D] keys and values serve every query row and every head sharing them
// (GQA), read straight from the cache and converted in registers. The next block is prefetched
// while one is computed: in the model the cache streams from DRAM (decode step, default model:
// B=64 87 -> 78 ms, B=256 276 -> 241 ms); a non-temporal hint (to spare the weights in L3)
// measured slower (112 ms at B=64). The prefetches are spread over the block's row groups (kv
// heads): issued in one burst they fill the core's line-fill buffers and stall the compute behind
// them (30 layers x 256 requests x 320 tokens: 117-123 -> 102-107 ms; two blocks ahead, or into
// L2 only, no better).
// Cascade: with skip_blocks > 0 the blocks before it are not read; each row instead starts from
// init_out (its attention output over those blocks, [T, Hq, D]) and init_lse ([T, Hq], the
// natural-log sum of exp of its scaled scores there), i.e. the online-softmax state (lse, 1, out).
#include <vector>

#include "kernels.hpp"

namespace kv {
using namespace vec;
namespace {

constexpr int64_t kTile = 8;  // query positions per work item

// q . k over D elements, as a 16-lane partial sum (reduce_add gives the dot product). bf16: pairs
// through dot_pairs (vdpbf16ps where the ISA has it); float32 and tails: fma.
template <typename T, int64_t DC>
inline F32x16 dot_partial(const T* q, const T* k, int64_t D_) {
  const int64_t D = DC ? DC : D_;
  F32x16 acc = zero();
  int64_t d = 0;
  if constexpr (std::is_same_v<T, bf16>)
    for (; d + 32 <= D; d += 32) acc = dot_pairs(acc, load_pairs(q + d), load_pairs(k + d));
  for (; d < D; d += 16) acc = fma(load_n(q + d, D - d), load_n(k + d, D - d), acc);
  return acc;
}

// Scaled scores of one query row against keys 0..visible-1 of a block: s[j] = (q . k_j) * scale,
// 16 keys at a time summed by reduce_add16.
template <typename T, int64_t DC>
inline void block_scores(const T* q, const T* k, int64_t slot_stride, int64_t visible, int64_t D, float scale,
                         float* s) {
  F32x16 parts[16];
  for (int64_t c0 = 0; c0 < visible; c0 += 16) {
    const int64_t nk = std::min<int64_t>(16, visible - c0);
    for (int64_t jj = 0; jj < 16; ++jj)
      parts[jj] = jj < nk ? dot_partial<T, DC>(q, k + (c0 + jj) * slot_stride, D) : zero();
    store_n(s + c0, mul(reduce_add16(parts), set1(scale)), nk);
  }
}

// The online-softmax update of one block for nr rows (nr <= 4): row g's s_g = s + g * stride holds
// scores s_g[0..visible). s_g <- exp(s_g - m_new) (0 past visible), m[g] <- m_new = max(m[g],
// max s_g), l[g] <- l[g] * corr[g] + sum s_g, with corr[g] = exp(m_old - m_new) (0 on the first
// block: m = -inf).
inline void online_softmax(float* s, int64_t stride, int64_t nr, int64_t visible, float* m, float* l, float* corr) {
  alignas(64) float m_new[16] = {}, c[16] = {};
  for (int64_t g = 0; g < nr; ++g) {
    F32x16 bm = set1(-INFINITY);
    for (int64_t j = 0; j < visible; j += 16)
      bm = max(bm, select(first_lanes(visible - j), load(s + g * stride + j), bm));
    const float bmax = reduce_max(bm);
    m_new[g] = m[g] > bmax ? m[g] : bmax;
    c[g] = m[g] - m_new[g];
  }
  store(c, exp(load(c)));  // all rows' corrections in one vector
  for (int64_t g = 0; g < nr; ++g) {
    float* sg = s + g * stride;
    F32x16 sum = zero();
    for (int64_t j = 0; j < visible; j += 16) {
      const F32x16 p = maskz(first_lanes(visible - j), exp(sub(load(sg + j), set1(m_new[g]))));
      store_n(sg + j, p, visible - j);  // (the next row's scores follow at stride)
      sum = add(sum, p);
    }
    l[g] = l[g] * c[g] + reduce_add(sum);
    m[g] = m_new[g];
    corr[g] = c[g];
  }
}

// For NR rows r: a_r = a_r * corr[r] + sum_j p_r[j] * v_j. The rows read the same kv head at the
// same position (GQA's query heads of one kv head), so they share each value vector: with a
// compile-time D, v_j is loaded from the cache (v + j * slot_stride, converted in registers) once
// for all NR rows, accumulators in registers; otherwise 16 dims at a time through memory.
// Rows per call: as many as keep the accumulators in registers (4 x 4 at D = 64, 2 x 8 at 128).
template <int64_t DC>
constexpr int64_t kPvRows() {
  return DC > 0 && DC <= 64 ? 4 : 2;
}

template <typename T, int64_t DC, int64_t NR>
inline void accumulate_pv_rows(float* a, int64_t a_stride, const float* corr, const float* p, int64_t p_stride,
                               const T* v, int64_t slot_stride, int64_t visible, int64_t D) {
  if constexpr (DC > 0 && DC % 16 == 0) {
    constexpr int64_t NV = DC / 16;
    F32x16 av[NR][NV];
    for (int64_t r = 0; r < NR; ++r)
      for (int64_t i = 0; i < NV; ++i) av[r][i] = mul(load(a + r * a_stride + 16 * i), set1(corr[r]));
    for (int64_t j = 0; j < visible; ++j) {
      const T* vj = v + j * slot_stride;
      F32x16 vv[NV];
      for (int64_t i = 0; i < NV; ++i) vv[i] = load(vj + 16 * i);
      for (int64_t r = 0; r < NR; ++r) {
        const F32x16 pj = set1(p[r * p_stride + j]);
        for (int64_t i = 0; i < NV; ++i) av[r][i] = fma(pj, vv[i], av[r][i]);
      }
    }
    for (int64_t r = 0; r < NR; ++r)
      for (int64_t i = 0; i < NV; ++i) store(a + r * a_stride + 16 * i, av[r][i]);
  } else {
    for (int64_t d = 0; d < D; d += 16) {  // the accumulators are float32 with D rounded up to 16
      for (int64_t r = 0; r < NR; ++r) {
        F32x16 acc = mul(load(a + r * a_stride + d), set1(corr[r]));
        for (int64_t j = 0; j < visible; ++j)
          acc = fma(set1(p[r * p_stride + j]), load_n(v + j * slot_stride + d, D - d), acc);
        store(a + r * a_stride + d, acc);
      }
    }
  }
}

template <typename T, int64_t DC>
inline void accumulate_pv_n(int64_t nr, float* a, int64_t a_stride, const float* corr, const float* p,
                            int64_t p_stride, const T* v, int64_t slot_stride, int64_t visible, int64_t D) {
#define KV_PV_ROWS(NR) accumulate_pv_rows<T, DC, NR>(a, a_stride, corr, p, p_stride, v, slot_stride, visible, D)
  switch (nr) {  // nr <= kPvRows<DC>() <= 4
    case 4: KV_PV_ROWS(4); break;
    case 3: KV_PV_ROWS(3); break;
    case 2: KV_PV_ROWS(2); break;
    default: KV_PV_ROWS(1);
  }
#undef KV_PV_ROWS
}

template <typename T, int64_t DC>
void paged_attention_dc(const T* q, const T* k_cache, const T* v_cache, T* out, const int64_t* block_tables,
                        int64_t bt_stride, const int64_t* seq_lens, const int64_t* qstart, const int64_t* reqs,
                        int64_t n_reqs, int64_t Hq, int64_t Hk, int64_t D_, int64_t bs, float scale,
                        int64_t skip_blocks, const T* init_out, const float* init_lse) {
  const int64_t D = DC ? DC : D_;
  const int64_t Dp = (D + 15) / 16 * 16;  // accumulator row length
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
    // sc: kPvRows rows of one block's scores, with a vector's room past the last
    std::vector<float> acc(R * Dp), mx(R), l(R), sc(4 * bs + 16);
    // Per item, computed once (integer division is slow in the block loop): row r's index in the
    // [T, Hq] layout, and for each group of G rows its query index and kv head offset in a slot.
    std::vector<int64_t> row_idx(R), group_query(R / G), group_kv(R / G);
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
        float* ar = acc.data() + r * Dp;
        std::fill(ar, ar + Dp, 0.f);
        if (init_out) {  // continue from attention over blocks < skip_blocks: state (lse, 1, out)
          for (int64_t d = 0; d < D; d += 16) store_n(ar + d, load_n(init_out + row_idx[r] * D + d, D - d), D - d);
          mx[r] = init_lse[row_idx[r]];
          l[r] = 1.f;
        } else {
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
          const int64_t kv = group_kv[r0 / G];  // this kv head inside a slot
          for (int64_t c0 = 0; c0 < G; c0 += kPvRows<DC>()) {
            const int64_t nr = std::min(kPvRows<DC>(), G - c0);
            float corr[4];
            for (int64_t g = 0; g < nr; ++g)
              block_scores<T, DC>(q + row_idx[r0 + c0 + g] * D, k_cache + base + kv, row_elems, visible, D, scale,
                                  sc.data() + g * bs);
            online_softmax(sc.data(), bs, nr, visible, &mx[r0 + c0], &l[r0 + c0], corr);
            accumulate_pv_n<T, DC>(nr, &acc[(r0 + c0) * Dp], Dp, corr, sc.data(), bs, v_cache + base + kv,
                                   row_elems, visible, D);
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const F32x16 inv = set1(1.0f / l[r]);
        for (int64_t d = 0; d < D; d += 16)
          store_n(out + row_idx[r] * D + d, mul(load(acc.data() + r * Dp + d), inv), D - d);
      }
    }
  }
}

}  // namespace

template <typename T>
void paged_attention(const T* q, const T* k_cache, const T* v_cache, T* out, const int64_t* block_tables,
                     int64_t bt_stride, const int64_t* seq_lens, const int64_t* qstart, const int64_t* reqs,
                     int64_t n_reqs, int64_t Hq, int64_t Hk, int64_t D, int64_t bs, float scale, int64_t skip_blocks,
                     const T* init_out, const float* init_lse) {
  auto run = [&](auto dc) {
    paged_attention_dc<T, decltype(dc)::value>(q, k_cache, v_cache, out, block_tables, bt_stride, seq_lens, qstart,
                                               reqs, n_reqs, Hq, Hk, D, bs, scale, skip_blocks, init_out, init_lse);
  };
  if (D == 64)
    run(std::integral_constant<int64_t, 64>());
  else if (D == 128)
    run(std::integral_constant<int64_t, 128>());
  else
    run(std::integral_constant<int64_t, 0>());
}

template void paged_attention<float>(const float*, const float*, const float*, float*, const int64_t*, int64_t,
                                     const int64_t*, const int64_t*, const int64_t*, int64_t, int64_t, int64_t,
                                     int64_t, int64_t, float, int64_t, const float*, const float*);
template void paged_attention<bf16>(const bf16*, const bf16*, const bf16*, bf16*, const int64_t*, int64_t,
                                    const int64_t*, const int64_t*, const int64_t*, int64_t, int64_t, int64_t,
                                    int64_t, int64_t, float, int64_t, const bf16*, const float*);

}  // namespace kv

using kv::bf16;

KV_API void kv_paged_attention(int dtype, const void* q, const void* k_cache, const void* v_cache, void* out,
                               const int64_t* block_tables, int64_t bt_stride, const int64_t* seq_lens,
                               const int64_t* qstart, const int64_t* reqs, int64_t n_reqs, int64_t Hq, int64_t Hk,
                               int64_t D, int64_t bs, float scale, int64_t skip_blocks, const void* init_out,
                               const float* init_lse) {
  if (dtype == 1)
    kv::paged_attention(static_cast<const bf16*>(q), static_cast<const bf16*>(k_cache),
                        static_cast<const bf16*>(v_cache), static_cast<bf16*>(out), block_tables, bt_stride, seq_lens,
                        qstart, reqs, n_reqs, Hq, Hk, D, bs, scale, skip_blocks, static_cast<const bf16*>(init_out),
                        init_lse);
  else
    kv::paged_attention(static_cast<const float*>(q), static_cast<const float*>(k_cache),
                        static_cast<const float*>(v_cache), static_cast<float*>(out), block_tables, bt_stride,
                        seq_lens, qstart, reqs, n_reqs, Hq, Hk, D, bs, scale, skip_blocks,
                        static_cast<const float*>(init_out), init_lse);
}
