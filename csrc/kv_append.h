// kv_append.h: torch-free launcher of the in-place KV-cache append (docs/design.md §7).
//
// cache[b, h, seg_start[b] + s, d] = new[b, h, s, d] for K and V, as raw bits (bit-exact, NaN payloads kept).
// Element strides of [B, H, *, D] tensors; any layout. Rows whose seg_start[b] + S would leave [0, Smax) are
// skipped on the device (the torch layer rejects them before launching, so this is a guard, never a path).
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

struct TidarKvAppendParams {
  void* k_cache; void* v_cache;               // [B, H, Smax, D]
  const void* k_new; const void* v_new;       // [B, H, S, D]
  const int32_t* seg_start;                   // [B], device
  int64_t kc_stride[4], vc_stride[4], kn_stride[4], vn_stride[4];  // element strides
  int64_t B, H, S, D, Smax;
  int elem_size;                              // bytes per element: 1, 2, 4 or 8
};

// 0 ok; < 0 bad arguments (nothing launched); > 0 cudaError_t of the launch.
int tidar_kv_append(const TidarKvAppendParams& p, cudaStream_t stream);
const char* tidar_kv_append_error_string(int code);
