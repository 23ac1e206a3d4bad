// rejection_sample.h: torch-free launchers of the fused TiDAR verification step and the prefill drafts
// (docs/design.md §4.1; semantics of tidar_kernels/reference/rejection_sample.py, decisions in float64).
//
// Logit dtype codes: 0 = fp16, 1 = bf16, 2 = fp32, 3 = fp64. All strides are element strides (any layout).
// Randomness: `uniforms` [B, 2K] float32 in [0, 1) when non-null, else Philox4x32-10 with
//   key = (seed lo, seed hi), counter = (n lo, n hi, 0, 0), n = offset + b * 2K + j, u = (c0 >> 8) * 2^-24,
// where seed/offset come from device int64 scalars when `seed_ptr`/`offset_ptr` are non-null (CUDA graphs),
// else from `seed`/`offset`. temperature == 0 is greedy (no uniforms read, no probabilities written).
#pragma once

#include <cuda_runtime.h>
#include <cstddef>
#include <cstdint>

struct TidarRandomness {
  const float* uniforms; int64_t u_stride[2];       // [B, 2K] or nullptr
  const int64_t* seed_ptr; const int64_t* offset_ptr;  // device scalars or nullptr
  int64_t seed, offset;
};

struct TidarRejectionParams {
  const void* ar; int ar_dtype; int64_t ar_stride[3];     // [B, K, V] AR logits at the draft rows
  const void* blk; int blk_dtype; int64_t blk_stride[4];  // [B, K, K, V] proposal blocks: [:, j-1, s] = block j slot s
  const int64_t* drafts; int64_t drafts_stride[2];        // [B, K], ids in [0, V)
  const float* draft_probs; int64_t q_stride[3];          // [B, K-1, V]; may be null when greedy or K == 1
  TidarRandomness rng;
  int64_t* accepted;     // [B] contiguous
  int64_t* emitted;      // [B, K] contiguous
  int64_t* next_drafts;  // [B, K] contiguous
  float* next_probs;     // [B, K-1, V] contiguous; null when greedy
  double* workspace;     // >= tidar_rejection_workspace_bytes_v(B, K, V) bytes (see workspace_bytes)
  // top-k/top-p (sampling only; null = no filter): tokens whose tempered float64 logit x / T is below the row's
  // threshold get probability 0. thr_target [B, K] (target row i), thr_slots [B, K, K] ([b, j-1, s]: block j,
  // slot s), both contiguous float64 (the reference's filter_threshold of the same x, so the kept sets agree).
  const double* thr_target;
  const double* thr_slots;
  int B, K;
  int64_t V;
  double temperature;  // 0 = greedy
  double beta;         // target logits = beta * AR + (1 - beta) * slot 0 (1 and 0 use one side only)
  // bytes available at `workspace`; 0 (or less than tidar_rejection_workspace_bytes_v) keeps the row path
  size_t workspace_bytes;
};

struct TidarDraftParams {
  const void* ar; int ar_dtype; int64_t ar_stride[2];     // [B, V]
  const void* blk; int blk_dtype; int64_t blk_stride[3];  // [B, K, V]
  TidarRandomness rng;
  int64_t* next_drafts;  // [B, K] contiguous
  float* next_probs;     // [B, K-1, V] contiguous; null when greedy
  const double* thr_target;  // [B] contiguous float64 or null (see TidarRejectionParams)
  const double* thr_slots;   // [B, K] contiguous float64 or null (slot 0 unused)
  int B, K;
  int64_t V;
  double temperature, beta;
};

// Workspace of the one-CTA-per-row path ([B, K, 4] float64).
size_t tidar_rejection_workspace_bytes(int B, int K);
// Workspace for whichever path tidar_rejection_sample takes for [B, K, V] on the current device (vocabulary-parallel:
// small batches with large vocabularies; TIDAR_CUDA_VOCAB_PARALLEL=1/0 forces it on/off, TIDAR_CUDA_VOCAB_CHUNK
// sets its chunk, both read at every call). Pass it as workspace_bytes.
size_t tidar_rejection_workspace_bytes_v(int B, int K, int64_t V);
// 1 when tidar_rejection_sample takes the vocabulary-parallel path for [B, K, V] (given that workspace), else 0.
int tidar_rejection_uses_vocab_parallel(int B, int K, int64_t V);
// 0 ok; < 0 bad arguments (nothing launched); > 0 cudaError_t of a launch.
int tidar_rejection_sample(const TidarRejectionParams& p, cudaStream_t stream);
int tidar_draft_sample(const TidarDraftParams& p, cudaStream_t stream);
const char* tidar_rejection_error_string(int code);

// The uniform the kernels use for (seed, offset, b, j) with 2K uniforms per row (host copy of the device code).
float tidar_philox_uniform_host(int64_t seed, int64_t offset, int64_t b, int64_t j, int64_t draft_len);
