// Host emulation of the CUDA features csrc/tidar_attention.cu uses, so its kernels run on a CPU (tests only).
// Put this directory first on the include path (-I csrc/tests/emu) and define TIDAR_ATTN_EMULATE: the .cu then
// compiles as plain C++ with g++ and its kernels run here, each CUDA thread as a ucontext fiber.
//
// What it models
// * Thread blocks run one after another; the threads of a block are fibers scheduled round-robin. Warp-collective
//   operations (ldmatrix, mma.sync, shfl) wait for all 32 lanes of the warp and are computed from the PTX ISA
//   fragment definitions; __syncthreads waits for all threads of the block (a thread that exits or diverges
//   before a barrier is reported as a deadlock).
// * cp.async: the copy is recorded at issue and lands in shared memory only when cp.async.wait_group retires
//   its group (the latest moment the hardware may land it), so a read before the wait sees stale bytes; reading
//   or writing a byte with a copy in flight is reported, and so is an issue over bytes another thread read in
//   the same barrier interval.
// * Shared memory starts as 0xFF bytes (NaN in fp16/bf16/fp32). Every byte of dynamic shared memory has a shadow
//   (barrier interval and thread of the last write, and of the last read): a read of a byte written by another
//   thread in the same barrier interval, or a write of a byte another thread read or wrote in that interval, is a
//   race and is reported.
// * Global memory: cp.async sources must lie inside a registered buffer (tidar_emu::register_buffer).
// * fp16 via _Float16, bf16 with round-to-nearest-even; mma accumulates in double and rounds to fp32 per call;
//   ex2.approx is exp2f.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

// ---- CUDA keywords ---------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)

// ---- runtime API subset -----------------------------------------------------------------------------
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 719 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated cuda error"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline int& tidar_emu_num_sms() { static int n = 132; return n; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) { *v = tidar_emu_num_sms(); return cudaSuccess; }
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int value) {
  return value <= 227 * 1024 ? cudaSuccess : cudaErrorInvalidValue;  // H100 opt-in limit
}

struct float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
inline float2 make_float2(float x, float y) { return float2{x, y}; }

// ---- 16-bit float types -----------------------------------------------------------------------------
struct __half { uint16_t x; };
struct __half2 { __half x, y; };
struct __nv_bfloat16 { uint16_t x; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };

namespace tidar_emu {
inline uint16_t f32_to_f16_bits(float f) {
  _Float16 h = static_cast<_Float16>(f);
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}
inline float f16_bits_to_f32(uint16_t b) {
  _Float16 h;
  std::memcpy(&h, &b, 2);
  return static_cast<float>(h);
}
inline uint16_t f32_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float bf16_bits_to_f32(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
}  // namespace tidar_emu

inline __half2 __floats2half2_rn(float a, float b) {
  return __half2{{tidar_emu::f32_to_f16_bits(a)}, {tidar_emu::f32_to_f16_bits(b)}};
}
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return __nv_bfloat162{{tidar_emu::f32_to_bf16_bits(a)}, {tidar_emu::f32_to_bf16_bits(b)}};
}

// ---- the emulator -------------------------------------------------------------------------------------
namespace tidar_emu {

struct Dim { unsigned x, y, z; };

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "tidar_emu: %s\n", what);
  std::abort();
}

struct Range { const char* lo; const char* hi; };
inline std::vector<Range>& buffers() { static std::vector<Range> b; return b; }
inline void register_buffer(const void* p, size_t bytes) {
  buffers().push_back({static_cast<const char*>(p), static_cast<const char*>(p) + bytes});
}
inline void clear_buffers() { buffers().clear(); }
inline bool in_buffer(const void* p, size_t n) {
  const char* c = static_cast<const char*>(p);
  for (const Range& r : buffers())
    if (c >= r.lo && c + n <= r.hi) return true;
  return false;
}

struct Pending { uint32_t dst; unsigned char data[16]; };

struct Payload {
  uint32_t u[8];
  float f[8];
};

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
  std::vector<Pending> open;                 // issued, not yet committed
  std::vector<std::vector<Pending>> groups;  // committed, not yet retired (oldest first)
};

struct WarpSlot {
  int arrived = 0;
  int op = -1;
  uint64_t gen = 0;
  Payload in[32], out[32];
};

struct Shadow {
  int64_t w_epoch = -1; int w_tid = -1;
  int64_t r_epoch = -1; int r_tid = -1;  // last reader; r_tid = -2: several readers in r_epoch
  int pending = 0;                       // cp.async copies in flight onto this byte
};

struct State {
  ucontext_t sched;
  std::vector<Fiber> fibers;
  int nthreads = 0, cur = -1;
  Dim block_idx{0, 0, 0}, block_dim{1, 1, 1};
  std::vector<unsigned char> smem;
  std::vector<Shadow> shadow;
  int64_t epoch = 0;
  int bar_arrived = 0;
  uint64_t bar_gen = 0;
  uint64_t events = 0;
  std::vector<WarpSlot> warps;
  std::function<void()> body;
  long races = 0;
  long collectives = 0;
};
inline State& st() { static State s; return s; }

inline void report_race(const char* what, uint32_t addr, int t_other) {
  State& s = st();
  if (s.races < 10)
    std::fprintf(stderr, "tidar_emu: RACE %s: block %u thread %d, smem byte %u, other thread %d, interval %lld\n", what,
                 s.block_idx.x, s.cur, addr, t_other, static_cast<long long>(s.epoch));
  ++s.races;
}

inline void yield() {
  State& s = st();
  swapcontext(&s.fibers[s.cur].ctx, &s.sched);
}

inline void check_smem(uint32_t addr, size_t n) {
  if (static_cast<size_t>(addr) + n > st().smem.size()) fail("shared memory access out of bounds");
}

inline void shadow_read(uint32_t addr, size_t n) {
  State& s = st();
  check_smem(addr, n);
  for (size_t i = 0; i < n; ++i) {
    Shadow& sh = s.shadow[addr + i];
    if (sh.pending) report_race("read of a byte with a cp.async in flight", addr + i, -1);
    if (sh.w_epoch == s.epoch && sh.w_tid != s.cur) report_race("read after another thread's write", addr + i, sh.w_tid);
    if (sh.r_epoch == s.epoch) {
      if (sh.r_tid != s.cur) sh.r_tid = -2;
    } else {
      sh.r_epoch = s.epoch;
      sh.r_tid = s.cur;
    }
  }
}
inline void shadow_write(uint32_t addr, size_t n, int tid) {
  State& s = st();
  check_smem(addr, n);
  for (size_t i = 0; i < n; ++i) {
    Shadow& sh = s.shadow[addr + i];
    if (sh.w_epoch == s.epoch && sh.w_tid != tid) report_race("write after another thread's write", addr + i, sh.w_tid);
    if (sh.r_epoch == s.epoch && sh.r_tid != tid) report_race("write after another thread's read", addr + i, sh.r_tid);
    sh.w_epoch = s.epoch;
    sh.w_tid = tid;
  }
}

inline unsigned char* dynamic_smem() { return st().smem.data(); }

// ---- thread indices ----
inline Dim thread_idx() { return Dim{static_cast<unsigned>(st().cur), 0, 0}; }
inline Dim block_idx() { return st().block_idx; }
inline Dim block_dim() { return st().block_dim; }

// ---- barrier ----
inline void syncthreads() {
  State& s = st();
  ++s.events;
  const uint64_t gen = s.bar_gen;
  if (++s.bar_arrived == s.nthreads) {
    s.bar_arrived = 0;
    ++s.bar_gen;
    ++s.epoch;
  } else {
    while (s.bar_gen == gen) yield();
  }
}

// ---- warp collectives ----
template <typename F>
inline Payload warp_collective(int op, const Payload& in, F compute) {
  State& s = st();
  const int warp = s.cur / 32, lane = s.cur % 32;
  if (s.nthreads % 32 != 0) fail("block size not a multiple of 32");
  WarpSlot& w = s.warps[warp];
  if (w.arrived == 0) w.op = op;
  else if (w.op != op) fail("warp lanes reached different collectives (divergence)");
  w.in[lane] = in;
  ++s.events;
  const uint64_t gen = w.gen;
  if (++w.arrived == 32) {
    ++s.collectives;
    compute(w);
    w.arrived = 0;
    ++w.gen;
  } else {
    while (w.gen == gen) yield();
  }
  return w.out[lane];
}

inline float shfl_xor(unsigned mask, float v, int lane_mask) {
  if (mask != 0xffffffffu) fail("partial-warp shuffle");
  Payload in{};
  in.f[0] = v;
  in.u[0] = static_cast<uint32_t>(lane_mask);
  Payload out = warp_collective(1, in, [](WarpSlot& w) {
    for (int l = 0; l < 32; ++l) {
      if (w.in[l].u[0] != w.in[0].u[0]) fail("shfl_xor lanes disagree on the lane mask");
      w.out[l].f[0] = w.in[l ^ static_cast<int>(w.in[0].u[0])].f[0];
    }
  });
  return out.f[0];
}

// ldmatrix.x4: lane 8i + r gives the address of row r of matrix i (16 bytes); without .trans lane l receives
// matrix i's elements (l/4, 2(l%4)), (l/4, 2(l%4)+1) in reg i, with .trans (2(l%4), l/4), (2(l%4)+1, l/4).
inline void ldmatrix_x4(uint32_t addr, bool trans, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  if (addr % 16 != 0) fail("ldmatrix row address not 16-byte aligned");
  shadow_read(addr, 16);  // this lane's row (attributed to the lane that supplies its address)
  Payload in{};
  in.u[0] = addr;
  in.u[1] = trans ? 1u : 0u;
  Payload out = warp_collective(2, in, [](WarpSlot& w) {
    State& s = st();
    auto elem = [&](int lane_of_row, int col) {
      uint16_t v;
      std::memcpy(&v, &s.smem[w.in[lane_of_row].u[0] + 2 * col], 2);
      return static_cast<uint32_t>(v);
    };
    for (int l = 0; l < 32; ++l) {
      if (w.in[l].u[1] != w.in[0].u[1]) fail("ldmatrix lanes disagree on .trans");
      const int g = l / 4, t = l % 4;
      for (int i = 0; i < 4; ++i) {
        uint32_t lo, hi;
        if (!w.in[0].u[1]) {
          lo = elem(8 * i + g, 2 * t);
          hi = elem(8 * i + g, 2 * t + 1);
        } else {
          lo = elem(8 * i + 2 * t, g);
          hi = elem(8 * i + 2 * t + 1, g);
        }
        w.out[l].u[i] = lo | (hi << 16);
      }
    }
  });
  r0 = out.u[0]; r1 = out.u[1]; r2 = out.u[2]; r3 = out.u[3];
}

// mma.sync.m16n8k16.row.col, fp32 accumulate: A reg0 (g, 2t..2t+1), reg1 (g+8, 2t..), reg2 (g, 2t+8..),
// reg3 (g+8, 2t+8..); B reg0 (k 2t..2t+1, n g), reg1 (k 2t+8.., n g); C/D e0,e1 (g, 2t..2t+1), e2,e3 (g+8, ..).
inline void mma_16816(bool is_f16, float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
  Payload in{};
  for (int i = 0; i < 4; ++i) in.u[i] = a[i];
  in.u[4] = b0;
  in.u[5] = b1;
  in.u[6] = is_f16 ? 1u : 0u;
  for (int i = 0; i < 4; ++i) in.f[i] = d[i];
  Payload out = warp_collective(3, in, [](WarpSlot& w) {
    const bool f16 = w.in[0].u[6] != 0;
    auto cvt = [f16](uint32_t bits) { return f16 ? f16_bits_to_f32(static_cast<uint16_t>(bits)) : bf16_bits_to_f32(static_cast<uint16_t>(bits)); };
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
      if ((w.in[l].u[6] != 0) != f16) fail("mma lanes disagree on the type");
      const int g = l / 4, t = l % 4;
      const uint32_t* ar = w.in[l].u;
      A[g][2 * t] = cvt(ar[0] & 0xffff); A[g][2 * t + 1] = cvt(ar[0] >> 16);
      A[g + 8][2 * t] = cvt(ar[1] & 0xffff); A[g + 8][2 * t + 1] = cvt(ar[1] >> 16);
      A[g][2 * t + 8] = cvt(ar[2] & 0xffff); A[g][2 * t + 9] = cvt(ar[2] >> 16);
      A[g + 8][2 * t + 8] = cvt(ar[3] & 0xffff); A[g + 8][2 * t + 9] = cvt(ar[3] >> 16);
      B[2 * t][g] = cvt(ar[4] & 0xffff); B[2 * t + 1][g] = cvt(ar[4] >> 16);
      B[2 * t + 8][g] = cvt(ar[5] & 0xffff); B[2 * t + 9][g] = cvt(ar[5] >> 16);
    }
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      for (int e = 0; e < 4; ++e) {
        const int r = g + 8 * (e >> 1), n = 2 * t + (e & 1);
        double acc = w.in[l].f[e];
        for (int k = 0; k < 16; ++k) acc += static_cast<double>(A[r][k]) * B[k][n];
        w.out[l].f[e] = static_cast<float>(acc);
      }
    }
  });
  for (int i = 0; i < 4; ++i) d[i] = out.f[i];
}

// ---- cp.async ----
inline void cp_async_16(uint32_t dst, const void* src, bool valid) {
  State& s = st();
  if (dst % 16 != 0) fail("cp.async destination not 16-byte aligned");
  if (valid && (reinterpret_cast<uintptr_t>(src) % 16 != 0)) fail("cp.async source not 16-byte aligned");
  check_smem(dst, 16);
  Pending p;
  p.dst = dst;
  if (valid) {
    if (!in_buffer(src, 16)) fail("cp.async reads outside every registered global buffer");
    std::memcpy(p.data, src, 16);
  } else {
    std::memset(p.data, 0, 16);  // src-size 0: zero fill, the source is not read
  }
  for (int i = 0; i < 16; ++i) {
    Shadow& sh = s.shadow[dst + i];
    if (sh.pending) report_race("cp.async onto a byte with a copy in flight", dst + i, -1);
    if (sh.r_epoch == s.epoch && sh.r_tid != s.cur) report_race("cp.async over a byte another thread read", dst + i, sh.r_tid);
    if (sh.w_epoch == s.epoch && sh.w_tid != s.cur) report_race("cp.async over a byte another thread wrote", dst + i, sh.w_tid);
    ++sh.pending;
  }
  s.fibers[s.cur].open.push_back(p);
}
inline void cp_async_commit() {
  Fiber& f = st().fibers[st().cur];
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}
inline void cp_async_wait(int n) {
  State& s = st();
  Fiber& f = s.fibers[s.cur];
  while (static_cast<int>(f.groups.size()) > n) {
    for (const Pending& p : f.groups.front()) {
      for (int i = 0; i < 16; ++i) --s.shadow[p.dst + i].pending;
      shadow_write(p.dst, 16, s.cur);
      std::memcpy(&s.smem[p.dst], p.data, 16);
    }
    f.groups.erase(f.groups.begin());
  }
}

// ---- launch ----
inline void fiber_entry() {
  State& s = st();
  s.body();
  s.fibers[s.cur].done = true;
  ++s.events;
}

template <typename Kernel, typename Args>
inline void launch(Kernel kernel, unsigned grid, int threads, size_t smem_bytes, const Args& args) {
  State& s = st();
  s.nthreads = threads;
  s.block_dim = Dim{static_cast<unsigned>(threads), 1, 1};
  s.fibers.assign(threads, Fiber());
  s.warps.assign((threads + 31) / 32, WarpSlot());
  const size_t stack_bytes = 256 * 1024;
  for (Fiber& f : s.fibers) f.stack.resize(stack_bytes);
  s.body = [kernel, &args]() { kernel(args); };
  for (unsigned b = 0; b < grid; ++b) {
    s.block_idx = Dim{b, 0, 0};
    s.smem.assign(smem_bytes + 16, 0xff);
    s.shadow.assign(smem_bytes + 16, Shadow());
    s.epoch = 0;
    s.bar_arrived = 0;
    for (int t = 0; t < threads; ++t) {
      Fiber& f = s.fibers[t];
      f.done = false;
      f.open.clear();
      f.groups.clear();
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.data();
      f.ctx.uc_stack.ss_size = f.stack.size();
      f.ctx.uc_link = &s.sched;
      makecontext(&f.ctx, fiber_entry, 0);
    }
    int live = threads;
    while (live > 0) {
      const uint64_t before = s.events;
      live = 0;
      for (int t = 0; t < threads; ++t) {
        if (s.fibers[t].done) continue;
        s.cur = t;
        swapcontext(&s.sched, &s.fibers[t].ctx);
        if (!s.fibers[t].done) ++live;
      }
      if (live > 0 && s.events == before) fail("deadlock: threads wait at a barrier or collective that never completes");
    }
    for (const Fiber& f : s.fibers)
      if (!f.open.empty() || !f.groups.empty()) fail("a thread exited with cp.async copies not waited for");
    if (s.bar_arrived != 0) fail("a thread exited while others wait at a barrier");
    s.cur = -1;
  }
}

}  // namespace tidar_emu

#define threadIdx (tidar_emu::thread_idx())
#define blockIdx (tidar_emu::block_idx())
#define blockDim (tidar_emu::block_dim())
inline void __syncthreads() { tidar_emu::syncthreads(); }
inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) { return tidar_emu::shfl_xor(mask, v, lane_mask); }
inline int atomicMin(int* p, int v) { const int old = *p; if (v < old) *p = v; return old; }
inline int atomicMax(int* p, int v) { const int old = *p; if (v > old) *p = v; return old; }
inline size_t __cvta_generic_to_shared(const void* p) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  const unsigned char* base = tidar_emu::st().smem.data();
  if (c < base || c > base + tidar_emu::st().smem.size()) tidar_emu::fail("cvta of a pointer outside shared memory");
  return static_cast<size_t>(c - base);
}
