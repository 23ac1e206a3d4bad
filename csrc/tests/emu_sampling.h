// Host emulation of the extra CUDA features csrc/rejection_sample.cu and csrc/kv_append.cu use, on top of the fiber emulator in
// csrc/tests/emu/cuda_runtime.h (tests only). Compile rejection_sample.cu with -DTIDAR_EMULATE and
// -I csrc/tests/emu -I csrc/tests: every CUDA thread runs as a fiber, warp shuffles are true warp collectives
// (all 32 lanes must arrive: divergence is an error), __syncthreads waits for the whole block.
// Shared memory: csrc/rejection_sample.cu declares its per-block `Shared` with TIDAR_SHARED and its fields with
// TIDAR_SH(T); here they live in the emulator's dynamic shared memory and every field access goes through the
// shadow race checker (a read of a byte another thread wrote in the same barrier interval, or a write over a
// byte another thread read or wrote in it, is counted: emu_sampling_races() in sampling_emu_lib.cpp).
// Other __shared__ variables are plain statics (functional, not race-checked; blocks run one at a time).
#pragma once

#include <algorithm>
#include <cstring>
#include <limits>

#include "emu/cuda_runtime.h"

#define CUDART_INF (std::numeric_limits<double>::infinity())

using std::max;
using std::min;

namespace tidar_emu {
inline uint64_t bits64(double v) { uint64_t u; std::memcpy(&u, &v, 8); return u; }
inline double from_bits64(uint64_t u) { double v; std::memcpy(&v, &u, 8); return v; }

// One 64-bit value per lane through a warp collective; `op` tells shuffles of different kinds apart.
// kind 0: xor lane mask, kind 1: up by delta (lanes < delta keep their own value), kind 2: from lane arg (all
// lanes must name the same source lane here).
inline uint64_t shfl64(int op, int kind, unsigned mask, uint64_t v, int arg) {
  if (mask != 0xffffffffu) fail("partial-warp shuffle");
  Payload in{};
  in.u[0] = static_cast<uint32_t>(v);
  in.u[1] = static_cast<uint32_t>(v >> 32);
  in.u[2] = static_cast<uint32_t>(arg);
  Payload out = warp_collective(op, in, [kind](WarpSlot& w) {
    for (int l = 0; l < 32; ++l) {
      if (w.in[l].u[2] != w.in[0].u[2]) fail("shuffle lanes disagree on the lane argument");
      const int a = static_cast<int>(w.in[0].u[2]);
      const int src = kind == 0 ? (l ^ a) : kind == 1 ? (l >= a ? l - a : l) : (a & 31);
      w.out[l].u[0] = w.in[src].u[0];
      w.out[l].u[1] = w.in[src].u[1];
    }
  });
  return static_cast<uint64_t>(out.u[0]) | (static_cast<uint64_t>(out.u[1]) << 32);
}
}  // namespace tidar_emu

inline double __shfl_xor_sync(unsigned mask, double v, int lane_mask) {
  return tidar_emu::from_bits64(tidar_emu::shfl64(201, 0, mask, tidar_emu::bits64(v), lane_mask));
}
inline long __shfl_xor_sync(unsigned mask, long v, int lane_mask) {
  return static_cast<long>(tidar_emu::shfl64(202, 0, mask, static_cast<uint64_t>(v), lane_mask));
}
inline double __shfl_up_sync(unsigned mask, double v, unsigned delta) {
  return tidar_emu::from_bits64(tidar_emu::shfl64(203, 1, mask, tidar_emu::bits64(v), static_cast<int>(delta)));
}
inline double __shfl_sync(unsigned mask, double v, int src_lane) {
  return tidar_emu::from_bits64(tidar_emu::shfl64(204, 2, mask, tidar_emu::bits64(v), src_lane));
}
inline double __dmul_rn(double a, double b) { volatile double r = a * b; return r; }
inline double __dadd_rn(double a, double b) { volatile double r = a + b; return r; }
inline float __double2float_rn(double v) { return static_cast<float>(v); }
inline float __half2float(__half h) { return tidar_emu::f16_bits_to_f32(h.x); }
inline float __bfloat162float(__nv_bfloat16 h) { return tidar_emu::bf16_bits_to_f32(h.x); }
template <typename T>
inline T __ldg(const T* p) { return *p; }
struct alignas(16) uint4 { unsigned x, y, z, w; };
// gridDim: the emulator runs blocks one after another and does not record the grid size; kernels that use it
// (kv_append's grid-stride loop) read it from here, set by TIDAR_LAUNCH.
inline tidar_emu::Dim& tidar_emu_grid_dim() { static tidar_emu::Dim d{1, 1, 1}; return d; }
#define gridDim (tidar_emu_grid_dim())

namespace tidar_emu {
// A shared-memory field whose every load and store is recorded by the shadow race checker (trivial type: the
// object is the dynamic shared memory's bytes, uninitialised = 0xFF as in the emulator).
template <typename T>
struct Sh {
  T v;
  uint32_t off() const {
    return static_cast<uint32_t>(reinterpret_cast<const unsigned char*>(this) - dynamic_smem());
  }
  operator T() const { shadow_read(off(), sizeof(T)); return v; }
  Sh& operator=(T x) { shadow_write(off(), sizeof(T), st().cur); v = x; return *this; }
};
constexpr size_t kSamplingSmem = 2048;  // dynamic shared bytes of every TIDAR_LAUNCH (>= sizeof(Shared))
}  // namespace tidar_emu
#define TIDAR_SH(T) tidar_emu::Sh<T>
#define TIDAR_SHARED(type, name)                                                             \
  static_assert(sizeof(type) <= tidar_emu::kSamplingSmem, "Shared exceeds the emulated smem"); \
  type& name = *reinterpret_cast<type*>(tidar_emu::dynamic_smem())

#define TIDAR_LAUNCH(kernel, grid, threads, stream, arg)                                     \
  (tidar_emu_grid_dim() = tidar_emu::Dim{static_cast<unsigned>(grid), 1, 1},                \
   tidar_emu::launch(kernel, (grid), (threads), tidar_emu::kSamplingSmem, (arg)), (void)(stream))
