// rejection_sample.cu: the fused TiDAR verification step and the prefill drafts, from raw logits.
//
// Work decomposition (one CTA of kThreads per vocabulary row, two launches per verification step):
//   1. stats kernel, grid B*K: target row i of batch row b (AR logits at d_i mixed with slot 0 of block i+1):
//      greedy: its argmax; sampling: softmax max and sum, then the acceptance test of d_{i+1}
//      (u_{i+1} * q_{i+1}(d) < p_{i+1}(d)). Results go to a float64 workspace [B, K, 4] = (max, sum, argmax, ok).
//   2. finish kernel, grid B*K: every CTA derives a = 1 + leading accepted drafts from the workspace;
//      CTA s = 0 writes accepted/emitted and the correction or bonus token (residual max(0, p_a - q_a) at the
//      first rejection, p_K when every draft was accepted), CTA s >= 1 drafts slot s of proposal block a
//      (argmax, or an inverse-CDF sample whose float32 distribution is written to next_probs).
// The prefill (draft_sample) is the finish kernel's pattern on [B, V] AR logits and a [B, K, V] block.
// Small batches with large vocabularies (B * K < 2 * SMs, at least 4 chunks) take the vocabulary-parallel path
// instead: four launches over (row, position, vocabulary chunk) grids, see "Vocabulary-parallel path" below;
// tidar_rejection_workspace_bytes_v sizes the workspace for the path the launcher will take.
//
// Numerics as the reference: every decision in float64. Mix beta * AR + (1 - beta) * diff with separately
// rounded products (no FMA contraction: __dmul_rn/__dadd_rn), x / T, softmax exp(x - max) / sum, acceptance
// u * q(d) < p(d), residual max(p - q, 0), inverse CDF = first index whose inclusive cumulative sum exceeds
// u * total. Summation order differs from torch's (~1e-16 relative), as for the Triton kernel.
#include "rejection_sample.h"

#include <cstdlib>

#if defined(TIDAR_EMULATE)  // CPU test build: csrc/tests/emu_sampling.h (fibers for threads, see test_cuda_emu.py)
#include "emu_sampling.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>
#define TIDAR_LAUNCH(kernel, grid, threads, stream, arg) kernel<<<(grid), (threads), 0, (stream)>>>(arg)
// Shared-memory fields and the per-block Shared object; the emulator build (emu_sampling.h) puts them in its
// race-checked shared memory instead (every access recorded: same-interval cross-thread accesses are reported).
#define TIDAR_SH(T) T
#define TIDAR_SHARED(type, name) __shared__ type name
#endif

#include "tidar_common.cuh"

namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kItems = 4;  // elements per thread per chunk of the CDF scan
constexpr int kChunk = kThreads * kItems;
constexpr unsigned kFull = 0xffffffffu;

enum MixMode { kFirstOnly = 0, kSecondOnly = 1, kMixed = 2 };

// One target row: logits from `a` (AR) and/or `b` (block slot 0), element strides along V.
struct RowSrc {
  const void* a;
  const void* b;
  int64_t sa, sb;
  int dta, dtb;
  int mode;
};

struct Shared {
  TIDAR_SH(double) red[kWarps];
  TIDAR_SH(int64_t) redi[kWarps];
  TIDAR_SH(int) a;
  TIDAR_SH(double) vp[4];   // vocabulary-parallel path: (max, sum, carry before the claimed chunk, target)
  TIDAR_SH(int64_t) claim;  // vocabulary-parallel path: the chunk that holds the CDF crossing
};

__device__ __forceinline__ double load_logit(const void* base, int64_t off, int dt) {
  switch (dt) {
    case 0: return static_cast<double>(__half2float(static_cast<const __half*>(base)[off]));
    case 1: return static_cast<double>(__bfloat162float(static_cast<const __nv_bfloat16*>(base)[off]));
    case 2: return static_cast<double>(static_cast<const float*>(base)[off]);
    default: return static_cast<const double*>(base)[off];
  }
}

// float64 target logit at v: beta * a + (1 - beta) * b, each product rounded (as torch computes it).
__device__ __forceinline__ double row_x(const RowSrc& r, int64_t v, double beta, double omb) {
  if (r.mode == kFirstOnly) return load_logit(r.a, v * r.sa, r.dta);
  if (r.mode == kSecondOnly) return load_logit(r.b, v * r.sb, r.dtb);
  return __dadd_rn(__dmul_rn(beta, load_logit(r.a, v * r.sa, r.dta)), __dmul_rn(omb, load_logit(r.b, v * r.sb, r.dtb)));
}

// ---------------------------------------------------------------------------------------------
// Block reductions: every thread returns the same value (the final combine runs in the same order in all).
// The leading __syncthreads makes back-to-back calls safe (shared slots are reused).
// ---------------------------------------------------------------------------------------------
struct SumOp {
  __device__ double operator()(double a, double b) const { return a + b; }
};
struct MaxOp {
  __device__ double operator()(double a, double b) const { return fmax(a, b); }
};
struct MinIOp {
  __device__ int64_t operator()(int64_t a, int64_t b) const { return min(a, b); }
};
struct MaxIOp {
  __device__ int64_t operator()(int64_t a, int64_t b) const { return max(a, b); }
};

// Warp shuffles, then the warps' partials through ``red`` (kWarps slots) combined in a fixed order.
template <typename T, typename Slots, typename Op>
__device__ __forceinline__ T block_reduce(T v, Slots& red, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, static_cast<T>(__shfl_xor_sync(kFull, v, o)));
  __syncthreads();
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  T r = red[0];
#pragma unroll
  for (int i = 1; i < kWarps; ++i) r = op(r, static_cast<T>(red[i]));
  return r;
}

__device__ __forceinline__ double block_sum(double v, Shared& sm) { return block_reduce(v, sm.red, SumOp{}); }
__device__ __forceinline__ double block_max(double v, Shared& sm) { return block_reduce(v, sm.red, MaxOp{}); }
__device__ __forceinline__ int64_t block_min_i(int64_t v, Shared& sm) { return block_reduce(v, sm.redi, MinIOp{}); }
__device__ __forceinline__ int64_t block_max_i(int64_t v, Shared& sm) { return block_reduce(v, sm.redi, MaxIOp{}); }

// (value, index) argmax with torch's tie-breaking: the first index of the maximum.
__device__ __forceinline__ bool better(double v, int64_t i, double bv, int64_t bi) {
  return v > bv || (v == bv && i < bi);
}

// Exclusive prefix sum over the block of one value per thread (float64); `chunk_total` = sum of the warp totals.
__device__ __forceinline__ double block_exclusive_scan(double v, Shared& sm, double* chunk_total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  double incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const double n = __shfl_up_sync(kFull, incl, o);
    if (lane >= o) incl += n;
  }
  double excl = __shfl_up_sync(kFull, incl, 1);
  if (lane == 0) excl = 0.0;
  __syncthreads();
  if (lane == 31) sm.red[warp] = incl;
  __syncthreads();
  double pre = 0.0, tot = 0.0;
#pragma unroll
  for (int i = 0; i < kWarps; ++i) {
    if (i < warp) pre += sm.red[i];
    tot += sm.red[i];
  }
  *chunk_total = tot;
  return pre + excl;
}

// ---------------------------------------------------------------------------------------------
// Row primitives (one CTA walks one vocabulary row)
// ---------------------------------------------------------------------------------------------
// (max, first index of the max) of a target row over [lo, hi) (hi > lo); every thread returns the same pair.
__device__ int64_t range_argmax(const RowSrc& r, int64_t lo, int64_t hi, double beta, double omb, Shared& sm,
                                double* best_out) {
  double best = -CUDART_INF;
  int64_t best_i = INT64_MAX;
  for (int64_t v = lo + threadIdx.x; v < hi; v += kThreads) {
    const double x = row_x(r, v, beta, omb);
    if (better(x, v, best, best_i)) { best = x; best_i = v; }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const double ov = __shfl_xor_sync(kFull, best, o);
    const int64_t oi = __shfl_xor_sync(kFull, best_i, o);
    if (better(ov, oi, best, best_i)) { best = ov; best_i = oi; }
  }
  __syncthreads();
  if ((threadIdx.x & 31) == 0) { sm.red[threadIdx.x >> 5] = best; sm.redi[threadIdx.x >> 5] = best_i; }
  __syncthreads();
  best = sm.red[0];
  best_i = sm.redi[0];
  for (int i = 1; i < kWarps; ++i)
    if (better(sm.red[i], sm.redi[i], best, best_i)) { best = sm.red[i]; best_i = sm.redi[i]; }
  *best_out = best;
  return best_i < hi ? best_i : lo;  // hi > lo always; keep the result a valid id anyway
}

__device__ int64_t row_argmax(const RowSrc& r, int64_t V, double beta, double omb, Shared& sm) {
  double best;
  return range_argmax(r, 0, V, beta, omb, sm, &best);
}

// Softmax statistics of x / T: max first, then sum of exp(x / T - max) (as torch.softmax).
// Tempered logit x / T, -inf below the row's top-k/top-p threshold (thr = -inf: no filter; x < -inf never holds).
__device__ __forceinline__ double row_xt(const RowSrc& r, int64_t v, double beta, double omb, double T, double thr) {
  const double x = row_x(r, v, beta, omb) / T;
  return x < thr ? -CUDART_INF : x;
}

__device__ void row_stats(const RowSrc& r, int64_t V, double beta, double omb, double T, double thr, Shared& sm,
                          double* mx_out, double* z_out) {
  double m = -CUDART_INF;
  for (int64_t v = threadIdx.x; v < V; v += kThreads) m = fmax(m, row_xt(r, v, beta, omb, T, thr));
  const double mx = block_max(m, sm);
  double z = 0.0;
  for (int64_t v = threadIdx.x; v < V; v += kThreads) z += exp(row_xt(r, v, beta, omb, T, thr) - mx);
  *mx_out = mx;
  *z_out = block_sum(z, sm);
}

__device__ __forceinline__ double row_p(const RowSrc& r, int64_t v, double beta, double omb, double T, double thr,
                                        double mx, double z) {
  return exp(row_xt(r, v, beta, omb, T, thr) - mx) / z;
}

// Inverse-CDF scan of [lo, hi): the first index whose carry + inclusive in-chunk sum of the weights exceeds
// `target` (weights p = softmax, or the residual max(p - q, 0) when `resid`); when rounding leaves the crossing
// past the chunk, the last index of the chunk with positive weight. Writes p as float32 to p_out[v] if given
// (then the whole chunk is walked). `search` = false: only write p_out (returns -1).
__device__ int64_t range_scan(const RowSrc& r, int64_t lo, int64_t hi, double beta, double omb, double T, double thr,
                              double mx, double z, const float* q, int64_t q_sv, bool resid, float* p_out,
                              bool search, double carry, double target, Shared& sm) {
  int64_t found = hi;
  int64_t last_pos = -1;
  for (int64_t c0 = lo; c0 < hi; c0 += kChunk) {
    const int64_t base = c0 + static_cast<int64_t>(threadIdx.x) * kItems;
    double w[kItems];
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t v = base + k;
      w[k] = 0.0;
      if (v < hi) {
        const double p = row_p(r, v, beta, omb, T, thr, mx, z);
        if (p_out != nullptr) p_out[v] = __double2float_rn(p);
        double wk = p;
        if (resid) {
          const double d = p - static_cast<double>(q[v * q_sv]);
          wk = d > 0.0 ? d : 0.0;
        }
        w[k] = wk;
      }
    }
    if (!search) continue;
    double local = 0.0, incl[kItems];
#pragma unroll
    for (int k = 0; k < kItems; ++k) { local += w[k]; incl[k] = local; }
    double chunk_total;
    const double pre = block_exclusive_scan(local, sm, &chunk_total);
    int64_t cand = hi, lp = -1;
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t v = base + k;
      if (v < hi) {
        if (cand == hi && carry + (pre + incl[k]) > target) cand = v;
        if (w[k] > 0.0) lp = v;
      }
    }
    carry += chunk_total;
    found = min(found, block_min_i(cand, sm));
    last_pos = max(last_pos, block_max_i(lp, sm));
    if (found < hi && p_out == nullptr) break;  // uniform across the block
  }
  if (!search) return -1;
  if (found < hi) return found;
  return last_pos >= 0 ? last_pos : hi - 1;
}

// Inverse-CDF sample of p = softmax(x / T) (or of the residual max(p - q, 0) when `q` is given and has mass):
// the first index whose inclusive cumulative sum exceeds u * total. Writes p as float32 to `p_out` if given.
__device__ int64_t row_sample(const RowSrc& r, int64_t V, double beta, double omb, double T, double thr, double mx,
                              double z, double u, const float* q, int64_t q_sv, float* p_out, Shared& sm) {
  bool resid = false;
  if (q != nullptr) {
    double rs = 0.0;
    for (int64_t v = threadIdx.x; v < V; v += kThreads) {
      const double d = row_p(r, v, beta, omb, T, thr, mx, z) - static_cast<double>(q[v * q_sv]);
      rs += d > 0.0 ? d : 0.0;
    }
    resid = block_sum(rs, sm) > 0.0;
  }
  // total of the weights w (reduction order differs from the scan's by ~1 ulp: see range_scan's fallback)
  double tw = 0.0;
  for (int64_t v = threadIdx.x; v < V; v += kThreads) {
    const double p = row_p(r, v, beta, omb, T, thr, mx, z);
    double w = p;
    if (resid) {
      const double d = p - static_cast<double>(q[v * q_sv]);
      w = d > 0.0 ? d : 0.0;
    }
    tw += w;
  }
  const double target = u * block_sum(tw, sm);
  return range_scan(r, 0, V, beta, omb, T, thr, mx, z, q, q_sv, resid, p_out, true, 0.0, target, sm);
}

__device__ __forceinline__ int64_t tidar_seed(const TidarRandomness& g) { return g.seed_ptr ? *g.seed_ptr : g.seed; }
__device__ __forceinline__ int64_t tidar_offset(const TidarRandomness& g) {
  return g.offset_ptr ? *g.offset_ptr : g.offset;
}

__device__ __forceinline__ double uniform(const TidarRandomness& g, int64_t b, int64_t j, int64_t K) {
  if (g.uniforms != nullptr) return static_cast<double>(g.uniforms[b * g.u_stride[0] + j * g.u_stride[1]]);
  const uint64_t n = static_cast<uint64_t>(tidar_offset(g)) + static_cast<uint64_t>(b) * static_cast<uint64_t>(2 * K) +
                     static_cast<uint64_t>(j);
  return static_cast<double>(tidar_philox_uniform(static_cast<uint64_t>(tidar_seed(g)), n));
}

__host__ __device__ __forceinline__ int mix_mode(double beta) {
  return beta == 1.0 ? kFirstOnly : (beta == 0.0 ? kSecondOnly : kMixed);
}

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ int64_t elem_size(int dt) { return dt == 3 ? 8 : (dt == 2 ? 4 : 2); }

__global__ void __launch_bounds__(kThreads) rejection_stats_kernel(TidarRejectionParams p) {
  TIDAR_SHARED(Shared, sm);
  const int64_t b = blockIdx.x / p.K;
  const int64_t i = blockIdx.x % p.K;  // target row i = p_{i+1}
  const double beta = p.beta, omb = 1.0 - p.beta;
  const int64_t ea = elem_size(p.ar_dtype), eb = elem_size(p.blk_dtype);
  const RowSrc r{static_cast<const char*>(p.ar) + (b * p.ar_stride[0] + i * p.ar_stride[1]) * ea,
                 static_cast<const char*>(p.blk) + (b * p.blk_stride[0] + i * p.blk_stride[1]) * eb,  // block i+1, slot 0
                 p.ar_stride[2], p.blk_stride[3], p.ar_dtype, p.blk_dtype, mix_mode(p.beta)};
  double* ws = p.workspace + (b * p.K + i) * 4;
  const bool has_draft = i + 1 < p.K;
  const int64_t d = has_draft ? p.drafts[b * p.drafts_stride[0] + (i + 1) * p.drafts_stride[1]] : -1;
  const bool d_ok = d >= 0 && d < p.V;  // the host checked; never read out of bounds anyway
  if (p.temperature == 0.0) {
    const int64_t am = row_argmax(r, p.V, beta, omb, sm);
    if (threadIdx.x == 0) {
      ws[0] = 0.0;
      ws[1] = 0.0;
      ws[2] = static_cast<double>(am);
      ws[3] = (has_draft && d_ok && d == am) ? 1.0 : 0.0;
    }
    return;
  }
  double mx, z;
  const double thr = p.thr_target ? p.thr_target[b * p.K + i] : -CUDART_INF;
  row_stats(r, p.V, beta, omb, p.temperature, thr, sm, &mx, &z);
  if (threadIdx.x == 0) {
    double ok = 0.0;
    if (has_draft && d_ok && p.draft_probs != nullptr) {
      const double p_d = row_p(r, d, beta, omb, p.temperature, thr, mx, z);
      const double q_d = static_cast<double>(p.draft_probs[b * p.q_stride[0] + i * p.q_stride[1] + d * p.q_stride[2]]);
      const double u = uniform(p.rng, b, i + 1, p.K);
      ok = __dmul_rn(u, q_d) < p_d ? 1.0 : 0.0;
    }
    ws[0] = mx;
    ws[1] = z;
    ws[2] = 0.0;
    ws[3] = ok;
  }
}

__global__ void __launch_bounds__(kThreads) rejection_finish_kernel(TidarRejectionParams p) {
  TIDAR_SHARED(Shared, sm);
  const int64_t K = p.K;
  const int64_t b = blockIdx.x / K;
  const int64_t s = blockIdx.x % K;
  const double* ws = p.workspace + b * K * 4;
  if (threadIdx.x == 0) {
    int a = 1;
    while (a < K && ws[(a - 1) * 4 + 3] != 0.0) ++a;  // d_a accepted by target row a - 1
    sm.a = a;
  }
  __syncthreads();
  const int64_t a = sm.a;
  const int64_t last = a - 1;
  const bool greedy = p.temperature == 0.0;
  const double beta = p.beta, omb = 1.0 - p.beta;
  const int64_t ea = elem_size(p.ar_dtype), eb = elem_size(p.blk_dtype);
  const char* blk_row = static_cast<const char*>(p.blk) + (b * p.blk_stride[0] + last * p.blk_stride[1]) * eb;
  if (s == 0) {
    if (threadIdx.x == 0) p.accepted[b] = a;
    for (int64_t k = threadIdx.x; k < K; k += kThreads)
      p.emitted[b * K + k] = k < a ? p.drafts[b * p.drafts_stride[0] + k * p.drafts_stride[1]] : -1;
    int64_t tok;
    if (greedy) {
      tok = static_cast<int64_t>(ws[last * 4 + 2]);
    } else {
      RowSrc r{static_cast<const char*>(p.ar) + (b * p.ar_stride[0] + last * p.ar_stride[1]) * ea, blk_row,
               p.ar_stride[2], p.blk_stride[3], p.ar_dtype, p.blk_dtype, mix_mode(p.beta)};
      const bool has_q = a < K && p.draft_probs != nullptr;  // at a == K the bonus comes from p_K itself
      const float* q = has_q ? p.draft_probs + b * p.q_stride[0] + last * p.q_stride[1] : nullptr;
      const double thr = p.thr_target ? p.thr_target[b * K + last] : -CUDART_INF;
      tok = row_sample(r, p.V, beta, omb, p.temperature, thr, ws[last * 4 + 0], ws[last * 4 + 1], uniform(p.rng, b, 0, K),
                       q, p.q_stride[2], nullptr, sm);
    }
    if (threadIdx.x == 0) p.next_drafts[b * K] = tok;
    return;
  }
  // slot s of proposal block a (raw logits, no mix)
  RowSrc r{blk_row + s * p.blk_stride[2] * eb, nullptr, p.blk_stride[3], 0, p.blk_dtype, p.blk_dtype, kFirstOnly};
  int64_t tok;
  if (greedy) {
    tok = row_argmax(r, p.V, 1.0, 0.0, sm);
  } else {
    double mx, z;
    const double thr = p.thr_slots ? p.thr_slots[(b * K + last) * K + s] : -CUDART_INF;
    row_stats(r, p.V, 1.0, 0.0, p.temperature, thr, sm, &mx, &z);
    float* p_out = p.next_probs + (b * (K - 1) + (s - 1)) * p.V;
    tok = row_sample(r, p.V, 1.0, 0.0, p.temperature, thr, mx, z, uniform(p.rng, b, K + s, K), nullptr, 0, p_out, sm);
  }
  if (threadIdx.x == 0) p.next_drafts[b * K + s] = tok;
}

__global__ void __launch_bounds__(kThreads) draft_kernel(TidarDraftParams p) {
  TIDAR_SHARED(Shared, sm);
  const int64_t K = p.K;
  const int64_t b = blockIdx.x / K;
  const int64_t s = blockIdx.x % K;
  const bool greedy = p.temperature == 0.0;
  const int64_t ea = elem_size(p.ar_dtype), eb = elem_size(p.blk_dtype);
  const char* blk_row = static_cast<const char*>(p.blk) + (b * p.blk_stride[0] + s * p.blk_stride[1]) * eb;
  RowSrc r;
  if (s == 0) {  // d_0: the AR logits at the last prompt token, mixed with slot 0
    r = RowSrc{static_cast<const char*>(p.ar) + b * p.ar_stride[0] * ea, blk_row, p.ar_stride[1], p.blk_stride[2],
               p.ar_dtype, p.blk_dtype, mix_mode(p.beta)};
  } else {
    r = RowSrc{blk_row, nullptr, p.blk_stride[2], 0, p.blk_dtype, p.blk_dtype, kFirstOnly};
  }
  const double beta = s == 0 ? p.beta : 1.0, omb = 1.0 - beta;
  int64_t tok;
  if (greedy) {
    tok = row_argmax(r, p.V, beta, omb, sm);
  } else {
    double mx, z;
    const double* thr_row = s == 0 ? p.thr_target : p.thr_slots;
    const double thr = thr_row ? thr_row[s == 0 ? b : b * K + s] : -CUDART_INF;
    row_stats(r, p.V, beta, omb, p.temperature, thr, sm, &mx, &z);
    float* p_out = s == 0 ? nullptr : p.next_probs + (b * (K - 1) + (s - 1)) * p.V;
    const double u = uniform(p.rng, b, s == 0 ? 0 : K + s, K);
    tok = row_sample(r, p.V, beta, omb, p.temperature, thr, mx, z, u, nullptr, 0, p_out, sm);
  }
  if (threadIdx.x == 0) p.next_drafts[b * K + s] = tok;
}

// ---------------------------------------------------------------------------------------------
// Vocabulary-parallel path (small batches, large vocabularies): four launches over vocabulary chunks of
// `chunk` tokens (C = ceil(V / chunk) chunks), so B = 1 spreads over B * K * C CTAs instead of B * K.
//   1. vp_target_stats [B, K, C]: chunk c of target row i: greedy (max, first argmax); sampling (m_c, s_c) =
//      (max of x / T, sum of exp(x / T - m_c)) over the chunk ((-inf, 0) when the filter keeps nothing there).
//   2. vp_accept       [B]:       one warp per target row combines its chunks (greedy: first argmax; sampling:
//      M = max m_c, Z = sum_c s_c exp(m_c - M)), acceptance tests of the drafts (into the [B, K, 4] row
//      workspace, the row path's layout), a, accepted, emitted; the greedy correction.
//   3. vp_chunk_mass   [B, K, C]: row 0: chunk masses of the residual max(0, p_a - q_a) and of p_a; rows
//      s = 1..K-1: chunk statistics (as pass 1) of slot s of proposal block a.
//   4. vp_sample       [B, K, C]: warp 0 of every CTA of a row combines the row's C chunk masses the same way
//      (warp reductions / scans: same bits in every CTA), so exactly one CTA claims the chunk where the
//      cumulative mass first exceeds u * total and scans it (inverse CDF); slot CTAs also write their chunk
//      of next_probs. Greedy slots: CTA c = 0 combines the chunk argmaxes.
// Exactness: greedy is exact (argmax over disjoint ascending chunks, ties to the lowest index). Sampling takes
// every decision with the reference's float64 formulas; only the summation order differs from torch's:
// per-chunk sums (block reductions), Z = sum_c s_c * exp(m_c - M) instead of sum exp(x - M) (a warp tree over
// the chunks), slot chunk masses s_c exp(m_c - M) / Z, cumulative masses by warp scans over groups of 32 chunks:
// ~1e-16 relative, so a token or acceptance can differ from the reference only when a uniform falls within that
// distance of a decision boundary (as the Triton kernel's vocabulary-parallel path). If rounding leaves the
// crossing past the claimed chunk's in-chunk sums, its last token with positive weight is taken.
// Workspace: the row workspace [B, K, 4] (M, Z, argmax, ok) then chunk statistics [B, K, C, 2] (pass 1 writes,
// pass 2 reads; pass 3 reuses the same slots for its masses / slot statistics, pass 4 reads them).
// ---------------------------------------------------------------------------------------------
struct VpShape {
  int64_t chunk, C;
};
struct VpArgs {
  TidarRejectionParams p;
  VpShape vs;
};

// (max, sum of exp(x / T - max)) over [lo, hi), uniform over the block; (-inf, 0) if nothing is kept.
__device__ void range_stats(const RowSrc& r, int64_t lo, int64_t hi, double beta, double omb, double T, double thr,
                            Shared& sm, double* mx_out, double* z_out) {
  double m = -CUDART_INF;
  for (int64_t v = lo + threadIdx.x; v < hi; v += kThreads) m = fmax(m, row_xt(r, v, beta, omb, T, thr));
  const double mx = block_max(m, sm);
  *mx_out = mx;
  if (mx == -CUDART_INF) {  // uniform branch: avoid exp(-inf - -inf) = NaN
    *z_out = 0.0;
    return;
  }
  double z = 0.0;
  for (int64_t v = lo + threadIdx.x; v < hi; v += kThreads) z += exp(row_xt(r, v, beta, omb, T, thr) - mx);
  *z_out = block_sum(z, sm);
}


// Warp-level combines of a row's C chunk statistics (all 32 lanes of one warp call them; every lane gets the same
// result, and every CTA that combines the same row gets the same bits: the order depends on C only).
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

__device__ __forceinline__ double warp_max(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

__device__ __forceinline__ int64_t warp_min_i(int64_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = min(v, static_cast<int64_t>(__shfl_xor_sync(kFull, v, o)));
  return v;
}

// First index of the maximum over the chunks' (max, first argmax) pairs st[2c], st[2c + 1] (exact: `better` is a
// total order on the pairs, ties to the lowest index as torch.argmax).
__device__ int64_t warp_chunk_argmax(const double* st, int64_t C, int64_t V) {
  const int lane = threadIdx.x & 31;
  double best = -CUDART_INF;
  int64_t best_i = INT64_MAX;
  for (int64_t c = lane; c < C; c += 32) {
    const int64_t ci = static_cast<int64_t>(st[c * 2 + 1]);
    if (better(st[c * 2], ci, best, best_i)) { best = st[c * 2]; best_i = ci; }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const double ov = __shfl_xor_sync(kFull, best, o);
    const int64_t oi = __shfl_xor_sync(kFull, best_i, o);
    if (better(ov, oi, best, best_i)) { best = ov; best_i = oi; }
  }
  return best_i < V ? best_i : 0;
}

// Softmax statistics of a row from its chunks' (m_c, s_c): M = max m_c, Z = sum_c s_c exp(m_c - M).
__device__ void warp_chunk_softmax(const double* st, int64_t C, double* mx_out, double* z_out) {
  const int lane = threadIdx.x & 31;
  double m = -CUDART_INF;
  for (int64_t c = lane; c < C; c += 32) m = fmax(m, st[c * 2]);
  const double mx = warp_max(m);
  double z = 0.0;
  for (int64_t c = lane; c < C; c += 32)
    if (st[c * 2] != -CUDART_INF) z += st[c * 2 + 1] * exp(st[c * 2] - mx);
  *mx_out = mx;
  *z_out = warp_sum(z);
}

// Inclusive prefix sum over the warp (Hillis-Steele).
__device__ __forceinline__ double warp_inclusive_scan(double v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const double n = __shfl_up_sync(kFull, v, o);
    if (lane >= o) v += n;
  }
  return v;
}

// Claim of one row (one warp): chunk masses mass(c) >= 0, prefix sums in groups of 32 chunks (warp scan, groups
// in ascending order), total = the last prefix, target = u * total. Returns the first chunk whose inclusive prefix
// exceeds the target (exists when total > 0, as u < 1; else C - 1 with carry 0) and the exclusive prefix before it.
template <typename Mass>
__device__ int64_t warp_claim(Mass mass, int64_t C, double u, double* carry_out, double* target_out) {
  const int lane = threadIdx.x & 31;
  double run = 0.0;
  for (int64_t c0 = 0; c0 < C; c0 += 32) {
    const double m = c0 + lane < C ? mass(c0 + lane) : 0.0;
    run += __shfl_sync(kFull, warp_inclusive_scan(m), 31);
  }
  const double target = u * run;
  *target_out = target;
  run = 0.0;
  for (int64_t c0 = 0; c0 < C; c0 += 32) {
    const double m = c0 + lane < C ? mass(c0 + lane) : 0.0;
    const double incl = warp_inclusive_scan(m);
    double excl = __shfl_up_sync(kFull, incl, 1);
    if (lane == 0) excl = 0.0;
    const int64_t first = warp_min_i(c0 + lane < C && run + incl > target ? lane : 32);
    if (first < 32) {
      *carry_out = run + __shfl_sync(kFull, excl, static_cast<int>(first));
      return c0 + first;
    }
    run += __shfl_sync(kFull, incl, 31);
  }
  *carry_out = 0.0;
  return C - 1;
}

// a = 1 + leading accepted drafts, from the row workspace (pass 2's flags); thread 0 walks, all threads return it.
__device__ int64_t vp_accepted(const double* ws_row, int64_t K, Shared& sm) {
  if (threadIdx.x == 0) {
    int a = 1;
    while (a < K && ws_row[(a - 1) * 4 + 3] != 0.0) ++a;
    sm.a = a;
  }
  __syncthreads();
  return sm.a;
}

__device__ __forceinline__ RowSrc target_row(const TidarRejectionParams& p, int64_t b, int64_t i) {
  const int64_t ea = elem_size(p.ar_dtype), eb = elem_size(p.blk_dtype);
  return RowSrc{static_cast<const char*>(p.ar) + (b * p.ar_stride[0] + i * p.ar_stride[1]) * ea,
                static_cast<const char*>(p.blk) + (b * p.blk_stride[0] + i * p.blk_stride[1]) * eb,  // block i+1 slot 0
                p.ar_stride[2], p.blk_stride[3], p.ar_dtype, p.blk_dtype, mix_mode(p.beta)};
}

__device__ __forceinline__ RowSrc slot_row(const TidarRejectionParams& p, int64_t b, int64_t last, int64_t s) {
  const int64_t eb = elem_size(p.blk_dtype);
  const char* row = static_cast<const char*>(p.blk) +
                    (b * p.blk_stride[0] + last * p.blk_stride[1] + s * p.blk_stride[2]) * eb;
  return RowSrc{row, nullptr, p.blk_stride[3], 0, p.blk_dtype, p.blk_dtype, kFirstOnly};
}

__global__ void __launch_bounds__(kThreads) vp_target_stats_kernel(VpArgs args) {
  TIDAR_SHARED(Shared, sm);
  const TidarRejectionParams& p = args.p;
  const VpShape& vs = args.vs;
  const int64_t c = blockIdx.x % vs.C;
  const int64_t bi = blockIdx.x / vs.C;  // b * K + i
  const int64_t b = bi / p.K, i = bi % p.K;
  const int64_t lo = c * vs.chunk, hi = min(p.V, lo + vs.chunk);
  const RowSrc r = target_row(p, b, i);
  double* out = p.workspace + static_cast<int64_t>(p.B) * p.K * 4 + (bi * vs.C + c) * 2;
  double v0, v1;
  if (p.temperature == 0.0) {
    v1 = static_cast<double>(range_argmax(r, lo, hi, p.beta, 1.0 - p.beta, sm, &v0));
  } else {
    const double thr = p.thr_target ? p.thr_target[bi] : -CUDART_INF;
    range_stats(r, lo, hi, p.beta, 1.0 - p.beta, p.temperature, thr, sm, &v0, &v1);
  }
  if (threadIdx.x == 0) { out[0] = v0; out[1] = v1; }
}

__global__ void __launch_bounds__(kThreads) vp_accept_kernel(VpArgs args) {
  TIDAR_SHARED(Shared, sm);
  const TidarRejectionParams& p = args.p;
  const VpShape& vs = args.vs;
  const int64_t K = p.K, b = blockIdx.x;
  double* ws_row = p.workspace + b * K * 4;
  const double* stats = p.workspace + static_cast<int64_t>(p.B) * K * 4 + b * K * vs.C * 2;
  const bool greedy = p.temperature == 0.0;
  const int lane = threadIdx.x & 31;
  for (int64_t i = threadIdx.x >> 5; i < K; i += kWarps) {  // one warp per target row
    const double* st = stats + i * vs.C * 2;
    const bool has_draft = i + 1 < K;
    const int64_t d = has_draft ? p.drafts[b * p.drafts_stride[0] + (i + 1) * p.drafts_stride[1]] : -1;
    const bool d_ok = d >= 0 && d < p.V;
    double* w = ws_row + i * 4;
    if (greedy) {
      const int64_t am = warp_chunk_argmax(st, vs.C, p.V);
      if (lane == 0) {
        w[0] = 0.0;
        w[1] = 0.0;
        w[2] = static_cast<double>(am);
        w[3] = (has_draft && d_ok && d == am) ? 1.0 : 0.0;
      }
    } else {
      double mx, z;
      warp_chunk_softmax(st, vs.C, &mx, &z);
      if (lane == 0) {
        double ok = 0.0;
        if (has_draft && d_ok && p.draft_probs != nullptr) {
          const double thr = p.thr_target ? p.thr_target[b * K + i] : -CUDART_INF;
          const double p_d = row_p(target_row(p, b, i), d, p.beta, 1.0 - p.beta, p.temperature, thr, mx, z);
          const double q_d =
              static_cast<double>(p.draft_probs[b * p.q_stride[0] + i * p.q_stride[1] + d * p.q_stride[2]]);
          ok = __dmul_rn(uniform(p.rng, b, i + 1, K), q_d) < p_d ? 1.0 : 0.0;
        }
        w[0] = mx;
        w[1] = z;
        w[2] = 0.0;
        w[3] = ok;
      }
    }
  }
  __syncthreads();  // the row workspace (global) is visible to the whole block after the barrier
  const int64_t a = vp_accepted(ws_row, K, sm);
  if (threadIdx.x == 0) {
    p.accepted[b] = a;
    if (greedy) p.next_drafts[b * K] = static_cast<int64_t>(ws_row[(a - 1) * 4 + 2]);
  }
  for (int64_t k = threadIdx.x; k < K; k += kThreads)
    p.emitted[b * K + k] = k < a ? p.drafts[b * p.drafts_stride[0] + k * p.drafts_stride[1]] : -1;
}

__global__ void __launch_bounds__(kThreads) vp_chunk_mass_kernel(VpArgs args) {
  TIDAR_SHARED(Shared, sm);
  const TidarRejectionParams& p = args.p;
  const VpShape& vs = args.vs;
  const int64_t K = p.K;
  const int64_t c = blockIdx.x % vs.C;
  const int64_t bs = blockIdx.x / vs.C;  // b * K + s
  const int64_t b = bs / K, s = bs % K;
  const int64_t lo = c * vs.chunk, hi = min(p.V, lo + vs.chunk);
  const bool greedy = p.temperature == 0.0;
  if (greedy && s == 0) return;  // the greedy correction was written by pass 2
  const int64_t a = vp_accepted(p.workspace + b * K * 4, K, sm);
  const int64_t last = a - 1;
  double* out = p.workspace + static_cast<int64_t>(p.B) * K * 4 + (bs * vs.C + c) * 2;
  double v0, v1;
  if (s == 0) {
    const double* w = p.workspace + (b * K + last) * 4;
    const double mx = w[0], z = w[1];
    const RowSrc r = target_row(p, b, last);
    const double thr = p.thr_target ? p.thr_target[b * K + last] : -CUDART_INF;
    const bool has_q = a < K && p.draft_probs != nullptr;
    const float* q = has_q ? p.draft_probs + b * p.q_stride[0] + last * p.q_stride[1] : nullptr;
    double tr = 0.0, tp = 0.0;
    for (int64_t v = lo + threadIdx.x; v < hi; v += kThreads) {
      const double pv = row_p(r, v, p.beta, 1.0 - p.beta, p.temperature, thr, mx, z);
      tp += pv;
      if (has_q) {
        const double d = pv - static_cast<double>(q[v * p.q_stride[2]]);
        tr += d > 0.0 ? d : 0.0;
      }
    }
    v0 = block_sum(tr, sm);
    v1 = block_sum(tp, sm);
  } else {
    const RowSrc r = slot_row(p, b, last, s);
    if (greedy) {
      v1 = static_cast<double>(range_argmax(r, lo, hi, 1.0, 0.0, sm, &v0));
    } else {
      const double thr = p.thr_slots ? p.thr_slots[(b * K + last) * K + s] : -CUDART_INF;
      range_stats(r, lo, hi, 1.0, 0.0, p.temperature, thr, sm, &v0, &v1);
    }
  }
  if (threadIdx.x == 0) { out[0] = v0; out[1] = v1; }
}

__global__ void __launch_bounds__(kThreads) vp_sample_kernel(VpArgs args) {
  TIDAR_SHARED(Shared, sm);
  const TidarRejectionParams& p = args.p;
  const VpShape& vs = args.vs;
  const int64_t K = p.K, C = vs.C;
  const int64_t c = blockIdx.x % C;
  const int64_t bs = blockIdx.x / C;
  const int64_t b = bs / K, s = bs % K;
  const int64_t lo = c * vs.chunk, hi = min(p.V, lo + vs.chunk);
  const bool greedy = p.temperature == 0.0;
  if (greedy && (s == 0 || c != 0)) return;
  const int64_t a = vp_accepted(p.workspace + b * K * 4, K, sm);
  const int64_t last = a - 1;
  const double* st = p.workspace + static_cast<int64_t>(p.B) * K * 4 + bs * C * 2;  // this row's C chunk pairs
  if (greedy) {  // slot s >= 1, CTA c == 0
    if (threadIdx.x < 32) {
      const int64_t am = warp_chunk_argmax(st, C, p.V);
      if (threadIdx.x == 0) p.next_drafts[b * K + s] = am;
    }
    return;
  }
  if (s == 0) {
    const bool has_q = a < K && p.draft_probs != nullptr;
    if (threadIdx.x < 32) {
      double rmax = 0.0;  // the residual has mass iff a chunk has (sums of non-negative terms)
      if (has_q)
        for (int64_t cc = threadIdx.x; cc < C; cc += 32) rmax = fmax(rmax, st[cc * 2]);
      const int sel = (has_q && warp_max(rmax) > 0.0) ? 0 : 1;  // residual mass, or p_a (bonus / no residual)
      double carry, target;
      const int64_t claim =
          warp_claim([&](int64_t cc) { return st[cc * 2 + sel]; }, C, uniform(p.rng, b, 0, K), &carry, &target);
      if (threadIdx.x == 0) {
        sm.claim = claim;
        sm.vp[0] = static_cast<double>(sel);
        sm.vp[2] = carry;
        sm.vp[3] = target;
      }
    }
    __syncthreads();
    if (c != sm.claim) return;
    const bool resid = sm.vp[0] == 0.0;
    const double* w = p.workspace + (b * K + last) * 4;
    const double thr = p.thr_target ? p.thr_target[b * K + last] : -CUDART_INF;
    const float* q = resid ? p.draft_probs + b * p.q_stride[0] + last * p.q_stride[1] : nullptr;
    const int64_t tok = range_scan(target_row(p, b, last), lo, hi, p.beta, 1.0 - p.beta, p.temperature, thr, w[0],
                                   w[1], q, p.q_stride[2], resid, nullptr, true, sm.vp[2], sm.vp[3], sm);
    if (threadIdx.x == 0) p.next_drafts[b * K] = tok;
    return;
  }
  if (threadIdx.x < 32) {  // warp 0 combines the slot's chunk statistics and claims the sample's chunk
    double mx, z;
    warp_chunk_softmax(st, C, &mx, &z);
    auto mass = [&](int64_t cc) { return st[cc * 2] == -CUDART_INF ? 0.0 : st[cc * 2 + 1] * exp(st[cc * 2] - mx) / z; };
    double carry, target;
    const int64_t claim = warp_claim(mass, C, uniform(p.rng, b, K + s, K), &carry, &target);
    if (threadIdx.x == 0) {
      sm.claim = claim;
      sm.vp[0] = mx;
      sm.vp[1] = z;
      sm.vp[2] = carry;
      sm.vp[3] = target;
    }
  }
  __syncthreads();
  const bool search = c == sm.claim;
  const double thr = p.thr_slots ? p.thr_slots[(b * K + last) * K + s] : -CUDART_INF;
  float* p_out = p.next_probs + (b * (K - 1) + (s - 1)) * p.V;
  const int64_t tok = range_scan(slot_row(p, b, last, s), lo, hi, 1.0, 0.0, p.temperature, thr, sm.vp[0], sm.vp[1],
                                 nullptr, 0, false, p_out, search, sm.vp[2], sm.vp[3], sm);
  if (search && threadIdx.x == 0) p.next_drafts[b * K + s] = tok;
}

bool bad_dtype(int dt) { return dt < 0 || dt > 3; }

constexpr int64_t kVpDefaultChunk = 4096;  // tokens per chunk (152k vocabulary: 38 chunks); untuned without a GPU

// An integer from the environment, `dflt` when unset or not a number.
int64_t env_int(const char* name, int64_t dflt) {
  const char* s = std::getenv(name);
  if (s == nullptr || *s == '\0') return dflt;
  char* end = nullptr;
  const long long v = std::strtoll(s, &end, 10);
  return (end != nullptr && *end == '\0') ? static_cast<int64_t>(v) : dflt;
}

// The path of a [B, K, V] step on the current device: the vocabulary-parallel one when the row path's B * K CTAs
// cannot fill the GPU (B * K < 2 * SMs) and the vocabulary has at least 4 chunks. TIDAR_CUDA_VOCAB_PARALLEL=1/0
// forces it on/off and TIDAR_CUDA_VOCAB_CHUNK sets the chunk (tests: small chunks on small vocabularies).
bool vp_plan(int B, int K, int64_t V, VpShape* vs) {
  int64_t chunk = env_int("TIDAR_CUDA_VOCAB_CHUNK", kVpDefaultChunk);
  if (chunk < 1) chunk = kVpDefaultChunk;
  if (B < 1 || K < 1 || V < 1) return false;
  vs->chunk = chunk;
  vs->C = tidar_cdiv(V, chunk);
  if (static_cast<int64_t>(B) * K * vs->C > INT32_MAX) return false;  // 1-D grid of B * K * C CTAs
  const int64_t force = env_int("TIDAR_CUDA_VOCAB_PARALLEL", -1);
  if (force == 0 || force == 1) return force == 1;
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
    (void)cudaGetLastError();  // do not leave the query's error for the launch status
    return false;
  }
  return vs->C >= 4 && static_cast<int64_t>(B) * K < 2 * static_cast<int64_t>(sms);
}

size_t vp_workspace_bytes(int B, int K, const VpShape& vs) {
  return (static_cast<size_t>(B) * K * 4 + static_cast<size_t>(B) * K * vs.C * 2) * sizeof(double);
}

}  // namespace

size_t tidar_rejection_workspace_bytes_v(int B, int K, int64_t V) {
  VpShape vs{};
  if (vp_plan(B, K, V, &vs)) return vp_workspace_bytes(B, K, vs);
  return tidar_rejection_workspace_bytes(B, K);
}

int tidar_rejection_uses_vocab_parallel(int B, int K, int64_t V) {
  VpShape vs{};
  return vp_plan(B, K, V, &vs) ? 1 : 0;
}

size_t tidar_rejection_workspace_bytes(int B, int K) {
  return static_cast<size_t>(B > 0 ? B : 0) * static_cast<size_t>(K > 0 ? K : 0) * 4 * sizeof(double);
}

const char* tidar_rejection_error_string(int code) { return tidar_status_string(code); }

float tidar_philox_uniform_host(int64_t seed, int64_t offset, int64_t b, int64_t j, int64_t draft_len) {
  const uint64_t n = static_cast<uint64_t>(offset) + static_cast<uint64_t>(b) * static_cast<uint64_t>(2 * draft_len) +
                     static_cast<uint64_t>(j);
  return tidar_philox_uniform(static_cast<uint64_t>(seed), n);
}

int tidar_rejection_sample(const TidarRejectionParams& p, cudaStream_t stream) {
  if (p.B < 0 || p.K < 1 || p.V < 1 || p.V > INT32_MAX) return TIDAR_ERR_BAD_SIZE;
  if (p.B == 0) return TIDAR_OK;
  if (static_cast<int64_t>(p.B) * p.K > INT32_MAX) return TIDAR_ERR_BAD_SIZE;
  if (bad_dtype(p.ar_dtype) || bad_dtype(p.blk_dtype)) return TIDAR_ERR_BAD_DTYPE;
  if (!p.ar || !p.blk || !p.drafts || !p.accepted || !p.emitted || !p.next_drafts || !p.workspace)
    return TIDAR_ERR_NULL_POINTER;
  if (p.temperature < 0.0 || !(p.beta >= 0.0 && p.beta <= 1.0)) return TIDAR_ERR_BAD_MODE;
  const bool greedy = p.temperature == 0.0;
  if (!greedy) {
    if (p.K > 1 && (!p.draft_probs || !p.next_probs)) return TIDAR_ERR_NULL_POINTER;
  }
  VpShape vs{};
  if (vp_plan(p.B, p.K, p.V, &vs) && p.workspace_bytes >= vp_workspace_bytes(p.B, p.K, vs)) {
    const VpArgs vargs{p, vs};
    const unsigned rows = static_cast<unsigned>(p.B) * static_cast<unsigned>(p.K);
    const unsigned cgrid = rows * static_cast<unsigned>(vs.C);
    TIDAR_LAUNCH(vp_target_stats_kernel, cgrid, kThreads, stream, vargs);
    int st = tidar_launch_status();
    if (st != TIDAR_OK) return st;
    TIDAR_LAUNCH(vp_accept_kernel, static_cast<unsigned>(p.B), kThreads, stream, vargs);
    if ((st = tidar_launch_status()) != TIDAR_OK) return st;
    TIDAR_LAUNCH(vp_chunk_mass_kernel, cgrid, kThreads, stream, vargs);
    if ((st = tidar_launch_status()) != TIDAR_OK) return st;
    TIDAR_LAUNCH(vp_sample_kernel, cgrid, kThreads, stream, vargs);
    return tidar_launch_status();
  }
  const unsigned grid = static_cast<unsigned>(p.B) * static_cast<unsigned>(p.K);
  TIDAR_LAUNCH(rejection_stats_kernel, grid, kThreads, stream, p);
  int st = tidar_launch_status();
  if (st != TIDAR_OK) return st;
  TIDAR_LAUNCH(rejection_finish_kernel, grid, kThreads, stream, p);
  return tidar_launch_status();
}

int tidar_draft_sample(const TidarDraftParams& p, cudaStream_t stream) {
  if (p.B < 0 || p.K < 1 || p.V < 1 || p.V > INT32_MAX) return TIDAR_ERR_BAD_SIZE;
  if (p.B == 0) return TIDAR_OK;
  if (static_cast<int64_t>(p.B) * p.K > INT32_MAX) return TIDAR_ERR_BAD_SIZE;
  if (bad_dtype(p.ar_dtype) || bad_dtype(p.blk_dtype)) return TIDAR_ERR_BAD_DTYPE;
  if (!p.ar || !p.blk || !p.next_drafts) return TIDAR_ERR_NULL_POINTER;
  if (p.temperature < 0.0 || !(p.beta >= 0.0 && p.beta <= 1.0)) return TIDAR_ERR_BAD_MODE;
  if (p.temperature != 0.0 && p.K > 1 && !p.next_probs) return TIDAR_ERR_NULL_POINTER;
  const unsigned grid = static_cast<unsigned>(p.B) * static_cast<unsigned>(p.K);
  TIDAR_LAUNCH(draft_kernel, grid, kThreads, stream, p);
  return tidar_launch_status();
}
