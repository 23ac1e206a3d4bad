// tidar_common.cuh: torch-free helpers shared by the csrc/ kernels (error codes, Philox, bounds helpers).
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

// Error codes of every csrc/ launcher: 0 = ok, < 0 = bad arguments (nothing launched), > 0 = a cudaError_t.
enum TidarStatus : int {
  TIDAR_OK = 0,
  TIDAR_ERR_NULL_POINTER = -1,
  TIDAR_ERR_BAD_SIZE = -2,
  TIDAR_ERR_BAD_DTYPE = -3,
  TIDAR_ERR_BAD_STRIDE = -4,
  TIDAR_ERR_BAD_MODE = -5,
};

inline const char* tidar_status_string(int code) {
  switch (code) {
    case TIDAR_OK: return "ok";
    case TIDAR_ERR_NULL_POINTER: return "a required pointer is null";
    case TIDAR_ERR_BAD_SIZE: return "a size is negative or out of range";
    case TIDAR_ERR_BAD_DTYPE: return "unsupported dtype code";
    case TIDAR_ERR_BAD_STRIDE: return "unsupported stride (the last dimension must be contiguous)";
    case TIDAR_ERR_BAD_MODE: return "unsupported mode";
    default: break;
  }
  if (code > 0) return cudaGetErrorString(static_cast<cudaError_t>(code));
  return "unknown tidar error";
}

// Launch status after a <<<>>>: the launch error, if any, as a positive code.
inline int tidar_launch_status() {
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? TIDAR_OK : static_cast<int>(e);
}

// ---------------------------------------------------------------------------------------------
// Philox4x32-10 (the shared spec): key = seed's int64 bits split in (lo, hi), counter = (n lo, n hi, 0, 0),
// u = float(c0 >> 8) * 2^-24 (exact float32 in [0, 1)).
// ---------------------------------------------------------------------------------------------
__host__ __device__ inline uint32_t tidar_umulhi(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * static_cast<uint64_t>(b)) >> 32);
#endif
}

__host__ __device__ inline float tidar_philox_uniform(uint64_t seed, uint64_t n) {
  const uint32_t PHILOX_A = 0xD2511F53u, PHILOX_B = 0xCD9E8D57u;
  const uint32_t KEY_A = 0x9E3779B9u, KEY_B = 0xBB67AE85u;
  uint32_t k0 = static_cast<uint32_t>(seed & 0xffffffffull), k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0 = static_cast<uint32_t>(n & 0xffffffffull), c1 = static_cast<uint32_t>(n >> 32), c2 = 0u, c3 = 0u;
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const uint32_t _c0 = c0, _c2 = c2;
    c0 = tidar_umulhi(PHILOX_B, _c2) ^ c1 ^ k0;
    c2 = tidar_umulhi(PHILOX_A, _c0) ^ c3 ^ k1;
    c1 = PHILOX_B * _c2;
    c3 = PHILOX_A * _c0;
    k0 += KEY_A;
    k1 += KEY_B;
  }
  return static_cast<float>(c0 >> 8) * 5.9604644775390625e-08f;  // 2^-24
}

inline int64_t tidar_cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
