// A step's whole stack of Llama decoder layers in one call (ops/cpu_layers.py), at every level.
#include <type_traits>

#include "kernels.hpp"

using namespace kv;

namespace {

// out [M, N] = x [M, K] @ W^T for one of the stack's linears: `type` < 0 is a bf16 weight in
// decode_weight's layout (T is bf16 then), else a GGUF block type (quant.cpp); x and out in T.
template <typename T>
void linear(int64_t type, const T* x, int64_t M, int64_t K, const void* w, int64_t N, T* out) {
  constexpr bool kBf16 = std::is_same_v<T, bf16>;
  if constexpr (kBf16) {
    if (type < 0) return decode_matmul(x, M, K, static_cast<const bf16*>(w), N, out, false, true);
  }
  quant_matmul(static_cast<int>(type), x, kBf16, M, K, static_cast<const uint8_t*>(w), N, out, kBf16);
}

// dst [rows, n] (row stride dst_stride) = src [rows, n] (row stride src_stride) in another type:
// float32 -> bf16 rounds to nearest even, as torch's .to(); bf16 -> float32 is exact.
template <typename S, typename D>
void convert_rows(const S* src, int64_t src_stride, D* dst, int64_t dst_stride, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < n; i += 16) vec::store_n(dst + r * dst_stride + i, vec::load_n(src + r * src_stride + i, n - i), n - i);
}

inline uintptr_t align64(uintptr_t p) { return (p + 63) & ~uintptr_t{63}; }

// T: the activations (float32 or bf16); C: the KV cache and attention (T, or bf16 under float32
// activations: q, k, v rounded to it after rotary and the attention output read back exactly, as
// layers/attention.py does).
template <typename T, typename C>
int layers(int64_t L, const int64_t* layer_ptrs, const T* x, T* hidden, float* residual, void* scratch,
           const int64_t* dims, const float* cos_sin, const int64_t* slots, const int64_t* block_tables,
           const int64_t* seq_lens, const int64_t* qstart, const int64_t* reqs, const int64_t* fresh_starts,
           const int64_t* fresh_lens, float eps, float scale) {
  const int64_t M = dims[0], H = dims[1], Hq = dims[2], Hk = dims[3], D = dims[4], I = dims[5], bs = dims[6];
  const int64_t bt_stride = dims[7], n_reqs = dims[8], P = dims[9], W = (Hq + 2 * Hk) * D;
  const int64_t prefix_blocks = dims[10], prefix_keys = prefix_blocks * bs, prefix_at = dims[11] * bs * Hk * D;
  constexpr bool kMixed = !std::is_same_v<T, C>;
  constexpr bool kAmx = std::is_same_v<C, bf16>;  // the AMX attention kernels take bf16 only
  if (P > 0 && !(kAmx && attention_amx_applies(fresh_lens, P, Hq, Hk, D, W, W))) return 0;
  if (prefix_blocks > 0 && !(kAmx && attention_amx_applies(&prefix_keys, 1, Hq, Hk, D, std::max(W, Hk * D), Hk * D)))
    return 0;
  // Activations (T), then, 64-byte aligned, attention's buffers (C), then prefix_lse (float32, aligned).
  T* normed = static_cast<T*>(scratch);  // [M, H]
  T* qkv_t = normed + M * H;              // [M, W]
  T* gate_up = qkv_t + M * W;             // [M, 2I]
  T* act = gate_up + M * 2 * I;           // [M, I]
  T* attn_t = act + M * I;                // [M, Hq * D] (kMixed only): the attention output, read back
  C* qkv = kMixed ? reinterpret_cast<C*>(align64(reinterpret_cast<uintptr_t>(attn_t + M * Hq * D)))
                  : reinterpret_cast<C*>(qkv_t);  // [M, W] in C
  C* q = kMixed ? qkv + M * W : reinterpret_cast<C*>(attn_t);  // [M, Hq * D]: q rows, contiguous for the paged kernel
  C* attn = q + M * Hq * D;        // [M, Hq * D]
  C* prefix_out = attn + M * Hq * D;  // [M, Hq, D]: attention over the shared prefix
  float* prefix_lse = reinterpret_cast<float*>(align64(reinterpret_cast<uintptr_t>(prefix_out + M * Hq * D)));
  for (int64_t l = 0; l < L; ++l) {
    const int64_t* w = layer_ptrs + 12 * l;
    const T *ln1 = reinterpret_cast<const T*>(w[0]), *ln2 = reinterpret_cast<const T*>(w[3]);
    C *k_cache = reinterpret_cast<C*>(w[6]), *v_cache = reinterpret_cast<C*>(w[7]);
    const void *w_qkv = reinterpret_cast<const void*>(w[1]), *w_o = reinterpret_cast<const void*>(w[2]);
    const void *w_gate_up = reinterpret_cast<const void*>(w[4]), *w_down = reinterpret_cast<const void*>(w[5]);
    if (l == 0) {  // residual <- x, normed <- norm(x)
      if constexpr (std::is_same_v<T, bf16>) {
        for (int64_t i = 0; i < M * H; ++i) residual[i] = bf2f(x[i]);
      } else {
        std::memcpy(residual, x, M * H * sizeof(float));
      }
      rms_norm(x, static_cast<float*>(nullptr), normed, ln1, M, H, eps);
    } else {
      rms_norm(static_cast<const T*>(hidden), residual, normed, ln1, M, H, eps);
    }
    linear(w[8], normed, M, H, w_qkv, W, qkv_t);
    rotary(qkv_t, qkv_t + Hq * D, cos_sin, M, Hq, Hk, D, W, W);
    if constexpr (kMixed) convert_rows(qkv_t, W, qkv, W, M, W);
    write_kv(qkv + Hq * D, qkv + (Hq + Hk) * D, W, W, k_cache, v_cache, slots, M, Hk * D);
    if constexpr (kAmx) {
      if (P > 0)
        attention_amx(qkv, qkv + Hq * D, qkv + (Hq + Hk) * D, attn, nullptr, fresh_starts, fresh_lens, fresh_starts,
                      fresh_lens, P, Hq, Hk, D, W, W, W, scale, true);
      if (prefix_blocks > 0) {  // a cascade covers every row (the caller checked)
        const int64_t zero = 0;
        attention_amx(qkv, k_cache + prefix_at, v_cache + prefix_at, prefix_out, prefix_lse, &zero, &M, &zero,
                      &prefix_keys, 1, Hq, Hk, D, W, Hk * D, Hk * D, scale, false);
      }
    }
    if (n_reqs > 0) {
      for (int64_t r = 0; r < M; ++r) std::memcpy(q + r * Hq * D, qkv + r * W, Hq * D * sizeof(C));
      paged_attention<C>(q, k_cache, v_cache, attn, block_tables, bt_stride, seq_lens, qstart, reqs, n_reqs, Hq, Hk,
                         D, bs, scale, prefix_blocks, prefix_blocks > 0 ? prefix_out : nullptr,
                         prefix_blocks > 0 ? prefix_lse : nullptr);
    }
    const T* o_in = reinterpret_cast<const T*>(attn);
    if constexpr (kMixed) {
      convert_rows(attn, Hq * D, attn_t, Hq * D, M, Hq * D);
      o_in = attn_t;
    }
    linear(w[9], o_in, M, Hq * D, w_o, H, hidden);
    rms_norm(static_cast<const T*>(hidden), residual, normed, ln2, M, H, eps);
    linear(w[10], normed, M, H, w_gate_up, 2 * I, gate_up);
    silu_and_mul(static_cast<const T*>(gate_up), act, M, I);
    linear(w[11], act, M, I, w_down, H, hidden);
  }
  return 1;
}

}  // namespace

// A whole stack of Llama decoder layers for one step in one call: the same kernels, in the same
// order, on the same values as the Python layers (model/llama.py) with the CPU attention backend,
// so the result is bit-identical; what it saves is the Python between them. The caller
// (ops/cpu_layers.py) has checked that it applies: every linear a decode_matmul weight (bf16 only)
// or GGUF blocks (quant_matmul), at most their max rows, no biases or q/k norms, each request's
// attention either a fresh prompt (the AMX prefill kernel, bf16) or the paged kernel's, after a
// cascade's shared prefix (the AMX kernel over every row of the step) where there is one. Returns
// 0, doing nothing, where the AMX kernel does not apply to the fresh prompts or the prefix (no AMX
// in this build or granted, or float32: the caller then runs the Python layers), else 1.
// dtype: 0 float32, 1 bf16 (activations, norms, KV cache), 2 float32 activations and norms with a
// bf16 KV cache (attention in bf16).
// layer_ptrs: [L][12] = input norm w, qkv W, o W, post norm w, gate_up W, down W, keys, values of the
// layer's cache, then the four W's types (-1: bf16 in decode_weight's layout; else a GGUF type).
// dims: M, H, Hq, Hk, D, I, block size, bt_stride, n_reqs (paged kernel's requests `reqs`), P (fresh
// prompts at rows fresh_starts, fresh_lens long), prefix blocks (0: no cascade), the first of them
// (consecutive ids).
// x: [M, H] the embeddings (read only); out: [M, H] the last layer's MLP output; residual: [M, H]
// float32, written (layer 0 starts it as x, as the Python layer does, then each norm adds into it).
// scratch: M * (H + W + 3 * I) activations, M * Hq * D more under mode 2, then (64-byte aligned)
// M * (W under mode 2 + 3 * Hq * D) of the cache's type, then (aligned) M * Hq float32 (W = (Hq + 2 Hk) D).
KV_API int kv_llama_layers(int dtype, int64_t L, const int64_t* layer_ptrs, const void* x, void* out,
                           float* residual, void* scratch, const int64_t* dims, const float* cos_sin,
                           const int64_t* slots, const int64_t* block_tables, const int64_t* seq_lens,
                           const int64_t* qstart, const int64_t* reqs, const int64_t* fresh_starts,
                           const int64_t* fresh_lens, float eps, float scale) {
  if (dtype == 1)
    return layers<bf16, bf16>(L, layer_ptrs, static_cast<const bf16*>(x), static_cast<bf16*>(out), residual, scratch,
                              dims, cos_sin, slots, block_tables, seq_lens, qstart, reqs, fresh_starts, fresh_lens, eps,
                              scale);
  if (dtype == 2)
    return layers<float, bf16>(L, layer_ptrs, static_cast<const float*>(x), static_cast<float*>(out), residual,
                               scratch, dims, cos_sin, slots, block_tables, seq_lens, qstart, reqs, fresh_starts,
                               fresh_lens, eps, scale);
  return layers<float, float>(L, layer_ptrs, static_cast<const float*>(x), static_cast<float*>(out), residual,
                              scratch, dims, cos_sin, slots, block_tables, seq_lens, qstart, reqs, fresh_starts,
                              fresh_lens, eps, scale);
}
