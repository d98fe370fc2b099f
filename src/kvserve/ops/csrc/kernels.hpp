// kvserve CPU kernels: what the kernel files share (the layer stack calls the others' kernels).
//
// The library is a plain C ABI over raw pointers, called through ctypes (kvserve/ops/cpu_ops.py),
// built by g++ alone (no torch headers) once per CPU level (ops/cpu_build.py). Each kernel has a
// torch-native reference that the tests compare it with (layers/*.py, attention/torch_ref.py).
//   vec*.hpp         the vector layer every kernel is written against
//   elementwise.cpp  RMSNorm (+ residual add), SiLU-and-mul, rotary, KV cache write
//   sampling.cpp     argmax and inverse-CDF sampling of logits rows
//   attention.cpp    paged attention, reading the KV cache in place
//   matmul.cpp       the decode-sized matmul (bf16 weights, float32 accumulation)
//   quant.cpp        GGUF quantized blocks: dequantization, the decode-sized matmul (quant_blocks.hpp)
//   amx.cpp          AMX tile kernels: matmul, attention of fresh prompts and shared prefixes
//   layer_stack.cpp  a step's whole stack of Llama layers in one call
//   selftest.cpp     the vector layer against its scalar definition; which level this build is
//
// dtype codes: 0 = float32, 1 = bfloat16. Math is float32; results are rounded to the storage
// dtype at the same points as the torch reference (and Hugging Face), so bf16 outputs match it
// up to float summation order. Threads: OpenMP, which resolves to the libgomp torch has loaded.
#pragma once

#include "vec.hpp"

#define KV_API extern "C" __attribute__((visibility("default")))

namespace kv {

// ---- elementwise.cpp (T: float or bf16) ----
template <typename T>
void rms_norm(const T* x, float* residual, T* out, const T* w, int64_t rows, int64_t D, float eps);
template <typename T>
void silu_and_mul(const T* x, T* out, int64_t rows, int64_t I);
template <typename T>
void rotary(T* q, T* k, const float* cos_sin, int64_t rows, int64_t Hq, int64_t Hk, int64_t D, int64_t q_stride,
            int64_t k_stride);
template <typename T>
void write_kv(const T* k, const T* v, int64_t k_stride, int64_t v_stride, T* k_cache, T* v_cache,
              const int64_t* slots, int64_t rows, int64_t row);

// ---- attention.cpp ----
template <typename T>
void paged_attention(const T* q, const T* k_cache, const T* v_cache, T* out, const int64_t* block_tables,
                     int64_t bt_stride, const int64_t* seq_lens, const int64_t* qstart, const int64_t* reqs,
                     int64_t n_reqs, int64_t Hq, int64_t Hk, int64_t D, int64_t bs, float scale, int64_t skip_blocks,
                     const T* init_out, const float* init_lse);

// ---- matmul.cpp ----
// out [M, N] (bf16, or float32: the sums unrounded) = x [M, K] @ W^T, W in decode_weight's layout;
// AMX tiles where allow_amx and granted, else the vector kernel. Needs K % 32 == 0, N % 16 == 0.
void decode_matmul(const bf16* x, int64_t M, int64_t K, const bf16* w, int64_t N, void* out, bool out_f32,
                   bool allow_amx);
int decode_matmul_max_rows(int64_t K, int64_t N, bool allow_amx);

// ---- quant.cpp: GGUF blocks (type: the GGML type id, 2 Q4_0, 3 Q4_1, 8 Q8_0, 12 Q4_K, 13 Q5_K,
// 14 Q6_K; or 100, kvserve's Q4_Z); W [N, K] as GGUF stores it, N rows of K / block size blocks. Each returns false, doing
// nothing, where the type or K does not apply (quant_matmul_max_rows is then 0).
// out [rows, K] float32 = W's values, bit for bit gguf-py's dequantize.
bool quant_dequant(int type, const uint8_t* blocks, int64_t rows, int64_t K, float* out);
// out [M, N] (bf16: rounded once, or float32) = x [M, K] (bf16 or float32) @ W^T, float32 sums.
bool quant_matmul(int type, const void* x, bool x_bf16, int64_t M, int64_t K, const uint8_t* blocks, int64_t N,
                  void* out, bool out_bf16);
int quant_matmul_max_rows(int type, int64_t K, int64_t N);  // the measured crossover with dequant + GEMM

// ---- amx.cpp (where the build has no AMX: amx_granted() is false and nothing else is called) ----
bool amx_granted();  // this process may use AMX tiles (asked of the OS once)
template <typename To>
void decode_matmul_amx(const bf16* x, int64_t M, int64_t K, const bf16* w, int64_t N, To* out);
constexpr int64_t kAmxMaxRows = 512;
// Whether attention_amx applies (AMX granted, head size a multiple of 32 up to 256, its 32-bit
// gather offsets in range for every prompt); where not, callers run SDPA.
bool attention_amx_applies(const int64_t* lens, int64_t P, int64_t Hq, int64_t Hk, int64_t D, int64_t q_stride,
                           int64_t v_stride);
void attention_amx(const bf16* q, const bf16* k, const bf16* v, bf16* out, float* lse, const int64_t* q_starts,
                   const int64_t* q_lens, const int64_t* starts, const int64_t* lens, int64_t P, int64_t Hq,
                   int64_t Hk, int64_t D, int64_t q_stride, int64_t k_stride, int64_t v_stride, float scale,
                   bool causal);

}  // namespace kv
