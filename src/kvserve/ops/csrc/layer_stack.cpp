// A step's whole stack of Llama decoder layers in one call (ops/cpu_layers.py), at every level.
#include "kernels.hpp"

using namespace kv;

// A whole stack of Llama decoder layers for one step in one call: the same kernels, in the same
// order, on the same values as the Python layers (model/llama.py) with the CPU attention backend,
// so the result is bit-identical; what it saves is the Python between them. The caller
// (ops/cpu_layers.py) has checked that it applies: bf16, decode_matmul for every linear (rows <=
// its max rows), no biases or q/k norms, each request's attention either a fresh prompt (the AMX
// prefill kernel) or the paged kernel's, after a cascade's shared prefix (the AMX kernel over every
// row of the step) where there is one. Returns 0, doing nothing, where the AMX kernel does not
// apply to the fresh prompts or the prefix (no AMX in this build or granted: the caller then runs
// the Python layers), else 1.
// layer_ptrs: [L][8] = input norm w, qkv W, o W, post norm w, gate_up W, down W (decode_weight
// layouts), keys, values of the layer's cache. dims: M, H, Hq, Hk, D, I, block size, bt_stride,
// n_reqs (paged kernel's requests `reqs`), P (fresh prompts at rows fresh_starts, fresh_lens long),
// prefix blocks (0: no cascade), the first of them (consecutive ids).
// x: [M, H] the embeddings (read only); out: [M, H] the last layer's MLP output; residual: [M, H]
// float32, written (layer 0 starts it as x, as the Python layer does, then each norm adds into it).
// scratch: bf16, M * (H + 3 * Hq * D + (Hq + 2 * Hk) * D + 3 * I + 2 * Hq) + 32.
KV_API int kv_llama_layers_bf16(int64_t L, const int64_t* layer_ptrs, const void* x_, void* out_, float* residual,
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
    decode_matmul(normed, M, H, reinterpret_cast<const bf16*>(w[1]), W, qkv, false, true);
    rotary(qkv, qkv + Hq * D, cos_sin, M, Hq, Hk, D, W, W);
    write_kv(qkv + Hq * D, qkv + (Hq + Hk) * D, W, W, k_cache, v_cache, slots, M, Hk * D);
    if (P > 0)
      attention_amx(qkv, qkv + Hq * D, qkv + (Hq + Hk) * D, attn, nullptr, fresh_starts, fresh_lens, fresh_starts,
                    fresh_lens, P, Hq, Hk, D, W, W, W, scale, true);
    if (prefix_blocks > 0) {  // a cascade covers every row (the caller checked)
      const int64_t zero = 0;
      attention_amx(qkv, k_cache + prefix_at, v_cache + prefix_at, prefix_out, prefix_lse, &zero, &M, &zero,
                    &prefix_keys, 1, Hq, Hk, D, W, Hk * D, Hk * D, scale, false);
    }
    if (n_reqs > 0) {
      for (int64_t r = 0; r < M; ++r) std::memcpy(q + r * Hq * D, qkv + r * W, Hq * D * sizeof(bf16));
      paged_attention<bf16>(q, k_cache, v_cache, attn, block_tables, bt_stride, seq_lens, qstart, reqs, n_reqs,
                              Hq, Hk, D, bs, scale, prefix_blocks, prefix_blocks > 0 ? prefix_out : nullptr,
                              prefix_blocks > 0 ? prefix_lse : nullptr);
    }
    decode_matmul(attn, M, Hq * D, reinterpret_cast<const bf16*>(w[2]), H, hidden, false, true);
    rms_norm(hidden, residual, normed, ln2, M, H, eps);
    decode_matmul(normed, M, H, reinterpret_cast<const bf16*>(w[4]), 2 * I, gate_up, false, true);
    silu_and_mul(gate_up, act, M, I);
    decode_matmul(act, M, I, reinterpret_cast<const bf16*>(w[5]), H, hidden, false, true);
  }
  return 1;
}
