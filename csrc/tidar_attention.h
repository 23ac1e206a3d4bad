// tidar_attention.h: torch-free launcher of the inference-step TiDAR attention forward (docs/design.md §2, §7).
//
// Keys are the cached prefix followed by the segment. For batch row b with s0 = seg_start[b], query i
// (0 <= i < S) sees key j iff
//     j < s0 + local_limit[i]
//     or (s0 <= j < s0 + S and block_id[i] >= 0 and block_id[j - s0] == block_id[i]);
// keys at j >= s0 + S are never seen (local_limit is clamped to S). out[b, h, i, :] = softmax(x over the visible
// keys) @ v with fp32 accumulation, written in the input dtype, where x = scale * q.k, or with logit soft-capping
// (softcap > 0, Gemma2's attn_logit_softcapping) x = softcap * tanh(scale * q.k / softcap). A query that sees no key writes zeros
// and lse = -inf (the reference op returns zeros there; the Triton op stores +inf in its own lse for its backward).
//
// Work decomposition (see tidar_attention.cu): one thread block per (128 packed rows, batch row, KV head,
// split); rows are (query, head-in-group) pairs so each K/V tile is read once per GQA group. Key tiles of 64
// are classified from the layout vectors in-kernel: full (no mask arithmetic), masked, or skipped.
// The prefix is split across thread blocks (split-KV) when B * Hkv * row tiles cannot fill num_sms; the
// partials go to `workspace` and a second kernel merges them with log-sum-exp. Deterministic.
//
// Requirements (else a negative code, nothing launched): D in {64, 128}; dtype 0 (fp16) or 1 (bf16);
// Hkv > 0 and Hq % Hkv == 0; non-negative sizes; non-null pointers (lse and workspace may be null when not
// needed); last strides 1, other strides >= 0; q/k/v/out base pointers 16-byte aligned and strides of
// dimensions of size > 1 multiples of 8 elements (make the tensor contiguous otherwise); S * Hq / Hkv < 2^31.
// Device data (local_limit, block_id, seg_start) is never trusted for memory safety: only keys in
// [0, min(Skv, s0 + S)) are ever loaded, whatever their values; the torch layer validates their ranges.
// The split count (and so the workspace size) is chosen on the host from the sizes alone, with Skv standing in
// for the prefix length: when k/v are a preallocated cache much longer than max(seg_start) + S, pass that
// shorter Skv (the keys past it are never visible anyway) to avoid splits that find no work.
// No allocation, no host synchronisation: capturable in a CUDA graph (the > 48 KB shared-memory opt-in is set
// on the first call per device, outside any stream).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

struct TidarAttentionParams {
  const void* q; const void* k; const void* v; void* out; float* lse;  // lse [B,Hq,S] fp32 natural-log LSE, may be nullptr
  const int32_t* local_limit; const int32_t* block_id; const int32_t* seg_start;  // [S], [S], [B] (device pointers)
  int64_t q_stride[4], k_stride[4], v_stride[4], o_stride[4];  // element strides of [B,H,S,D] / [B,Hkv,Skv,D] tensors; last stride is 1
  int B, Hq, Hkv, S, Skv, D;   // D in {64, 128}; Hq % Hkv == 0
  float scale;
  float softcap;               // > 0: logit soft-capping; 0: none (a negative or non-finite value is an error)
  int dtype;                   // 0 = fp16, 1 = bf16 (q, k, v, out share it)
  int num_sms;                 // of the current device, to size split-KV (<= 0: queried from the current device)
  void* workspace;             // scratch for split-KV partials, at least tidar_attention_workspace_bytes(p) bytes
};

// Error codes (0 ok; > 0 is a cudaError_t from the launch). The first four match csrc/tidar_common.cuh.
enum TidarAttentionStatus : int {
  TIDAR_ATTN_OK = 0,
  TIDAR_ATTN_ERR_NULL_POINTER = -1,    // q/k/v/out/local_limit/block_id/seg_start null (or workspace when needed)
  TIDAR_ATTN_ERR_BAD_SIZE = -2,        // negative size, or a grid/row count out of range
  TIDAR_ATTN_ERR_BAD_DTYPE = -3,       // dtype not 0 (fp16) or 1 (bf16)
  TIDAR_ATTN_ERR_BAD_STRIDE = -4,      // last stride != 1 or a negative stride
  TIDAR_ATTN_ERR_BAD_HEAD_DIM = -10,   // D not in {64, 128}
  TIDAR_ATTN_ERR_BAD_GQA = -11,        // Hkv <= 0 (with Hq > 0) or Hq % Hkv != 0
  TIDAR_ATTN_ERR_MISALIGNED = -12,     // a base pointer not 16-byte aligned or a stride not a multiple of 8
  TIDAR_ATTN_ERR_NO_WORKSPACE = -13,   // split-KV needs workspace (tidar_attention_workspace_bytes > 0) but it is null
  TIDAR_ATTN_ERR_BAD_SOFTCAP = -14,    // softcap negative, NaN or infinite (0 = no soft-capping)
};

// Bytes of workspace the forward will use for these params (0 when it does not split: workspace may be null).
// Depends only on sizes and num_sms, never on device data.
size_t tidar_attention_workspace_bytes(const TidarAttentionParams& p);
// Number of split-KV chunks the forward will use (1 = no split, no merge kernel). For tests and benchmarks.
int tidar_attention_num_splits(const TidarAttentionParams& p);
int tidar_attention_forward(const TidarAttentionParams& p, cudaStream_t stream);  // 0 ok; <0 bad args (your codes); >0 a cudaError_t
const char* tidar_attention_error_string(int code);
