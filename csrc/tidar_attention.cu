// tidar_attention.cu: inference-step TiDAR attention forward (torch-free). See tidar_attention.h for the contract.
//
// Kernel design
// -------------
// * One thread block = 8 warps = 128 packed rows of one (batch row b, KV head hk) for one split-KV chunk.
//   Packed row r is query r / G of q head hk * G + r % G (G = Hq / Hkv), so every K/V tile is loaded once for
//   the whole GQA group. Warp w owns rows [16w, 16w + 16): one m16 MMA row block.
// * Grid (1-D): block index = ((bh * num_splits) + split) * row_tiles + row_tile, so the row tiles that read
//   the same K/V chunk run side by side (L2 reuse).
// * Prologue: the block reduces, over its valid rows, min/max of the prefix end s0 + min(local_limit, S) and
//   the range of block ids, then scans block_id[0, S) for the keys of those blocks: tidar_attn::TileStats.
//   tidar_attn::make_plan turns it into the walk: full tiles (every row sees every key: no mask arithmetic,
//   no bound checks), then masked tiles (layout rule per element); every other tile is never loaded.
// * Per key tile of 64: cp.async (16 B, L2-only) of K and V into a 3-slot XOR-swizzled shared ring (two
//   tiles in flight while one computes; the Q tile is staged in the third slot before the loop). Per warp:
//   S = Q K^T with mma.sync m16n8k16 (Q fragments stay in registers, K via ldmatrix), fp32 online softmax in
//   the exp2 domain (scale * log2 e folded in, running max, per-thread partial row sums), then O += P V with P
//   re-packed from the S accumulators (no shared round trip) and V via ldmatrix.trans.
// * Split-KV (tidar_attn::choose_num_splits, a wave/tile cost model): splits cut the cached prefix's full
//   tiles (balanced with the segment's masked tiles counted on the last split); each writes its normalised
//   partial O (fp32) and log2-sum-exp to the workspace; a merge kernel (one warp per row, splits combined in a
//   fixed order: deterministic) writes out and lse.
// * Verified without a GPU: csrc/tests/test_tidar_attention_host.cpp (plans, fragment maps, algorithm) and
//   csrc/tests/test_tidar_attention_emu.cpp (this file's kernels run under a CPU emulator with a race checker);
//   on a GPU: csrc/tests/test_tidar_attention_gpu.cu (same cases + a decode-step benchmark).
#include "tidar_attention.h"
#include "tidar_attention_plan.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <climits>
#include <cmath>
#include <cstring>
#include <type_traits>

namespace tidar_attn {
namespace {

constexpr int kThreads = kWarps * 32;
constexpr int kStages = 3;  // K/V ring depth (tiles in flight while one computes: kStages - 1)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ------------------------------------------------------------------------------------------------
// PTX helpers (sm_80+: cp.async, ldmatrix, mma.sync bf16/f16)
// ------------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

#if defined(TIDAR_ATTN_EMULATE)
// Host emulation (csrc/tests/emu/cuda_runtime.h, tests only): the same operations, replayed per the PTX ISA.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  tidar_emu::cp_async_16(dst, src, valid);
}
__device__ __forceinline__ void cp_async_commit() { tidar_emu::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { tidar_emu::cp_async_wait(N); }
__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  tidar_emu::ldmatrix_x4(addr, false, r0, r1, r2, r3);
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  tidar_emu::ldmatrix_x4(addr, true, r0, r1, r2, r3);
}
template <typename T>
__device__ __forceinline__ void mma_16816(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
  tidar_emu::mma_16816(std::is_same<T, __half>::value, d, a, b0, b1);
}
__device__ __forceinline__ float fast_exp2(float x) { return exp2f(x); }
__device__ __forceinline__ void sts_i32(int* p, int v) {
  tidar_emu::shadow_write(smem_u32(p), 4, tidar_emu::st().cur);
  *p = v;
}
__device__ __forceinline__ int lds_i32(const int* p) {
  tidar_emu::shadow_read(smem_u32(p), 4);
  return *p;
}
#else
__device__ __forceinline__ void sts_i32(int* p, int v) { *p = v; }
__device__ __forceinline__ int lds_i32(const int* p) { return *p; }
// 16-byte async copy global -> shared; src_bytes 0 writes zeros (the source is not read).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

// D (16x8 fp32) += A (16x16, row) * B (16x8, col).
template <typename T>
__device__ __forceinline__ void mma_16816(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ float fast_exp2(float x) {  // ex2.approx: exp2(-inf) = +0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

#endif  // TIDAR_ATTN_EMULATE

// Two floats -> packed pair of T (low half = first), as the mma A/C fragments and 4-byte stores want.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same<T, __half>::value) {
    const __half2 h = __floats2half2_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &h, sizeof(u));
    return u;
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &h, sizeof(u));
    return u;
  }
}

// Dynamic shared memory: kStages ring slots of [K tile | V tile] (16-bit, swizzled), then kStages x kBlockN key
// block ids. The Q tile is staged in the last slot before the main loop (Q goes to registers; the slot is
// released by a barrier before tile kStages - 1 is loaded into it): D=128 uses 96.75 KB, D=64 48.75 KB.
template <int D>
struct SmemLayout {
  static constexpr int kKV = kBlockN * D;             // elements of one K (or V) tile
  static constexpr int kSlot = 2 * kKV;               // elements of one ring slot
  static constexpr size_t kSlotBytes = size_t(kSlot) * 2;
  static constexpr size_t kBidOffset = kStages * kSlotBytes;
  static constexpr size_t kBytes = kBidOffset + size_t(kStages) * kBlockN * sizeof(int);
  static_assert(size_t(kBlockM) * D * 2 <= kSlotBytes, "the Q tile must fit in one ring slot");
};

struct KernelArgs {
  const void* q; const void* k; const void* v; void* out; float* lse;
  const int32_t* local_limit; const int32_t* block_id; const int32_t* seg_start;
  int64_t qs0, qs1, qs2, ks0, ks1, ks2, vs0, vs1, vs2, os0, os1, os2;
  int B, Hq, Hkv, G, S, Skv;
  int rows;         // S * G
  int row_tiles;    // cdiv(rows, kBlockM)
  int num_splits;
  float qk_scale;   // scale * log2(e); with soft-capping scale / softcap
  float cap;        // softcap * log2(e); 0 = no soft-capping
  float* o_part;    // [num_splits][B*Hq*S][D] fp32 (num_splits > 1)
  float* lse_part;  // [num_splits][B*Hq*S] fp32, log2 domain
};

// ------------------------------------------------------------------------------------------------
// Forward kernel
// ------------------------------------------------------------------------------------------------
template <int D, typename T>
__global__ void __launch_bounds__(kThreads, (D <= 64 ? 2 : 1)) tidar_attention_fwd_kernel(const KernelArgs a) {
  constexpr int kChunks = D / 8;   // 16-byte chunks per row
  constexpr int kKSteps = D / 16;  // k16 steps of Q K^T
  constexpr int kNB = kBlockN / 8; // n8 blocks of S per tile
  constexpr int kDB = D / 8;       // n8 blocks of O
  using L = SmemLayout<D>;

#if defined(TIDAR_ATTN_EMULATE)
  unsigned char* smem_raw = tidar_emu::dynamic_smem();
#else
  extern __shared__ __align__(128) unsigned char smem_raw[];
#endif
  T* sKV = reinterpret_cast<T*>(smem_raw);                               // [kStages][K tile | V tile]
  T* sQ = sKV + (kStages - 1) * L::kSlot;                                // aliases the last slot (prologue only)
  int* sBid = reinterpret_cast<int*>(smem_raw + L::kBidOffset);          // [kStages][kBlockN]
  __shared__ int sh_stats[6];

  const int tid = threadIdx.x;
  const int warp = tid >> 5, lane = tid & 31;
  // Block index -> (row tile, split, b, hk); row tile fastest.
  const int64_t bid_lin = blockIdx.x;
  const int row_tile = static_cast<int>(bid_lin % a.row_tiles);
  const int64_t rest = bid_lin / a.row_tiles;
  const int split = static_cast<int>(rest % a.num_splits);
  const int bh = static_cast<int>(rest / a.num_splits);
  const int b = bh / a.Hkv, hk = bh % a.Hkv;
  const int m0 = row_tile * kBlockM;
  const int S = a.S, G = a.G;

  const int s0 = a.seg_start[b];
  const int key_end = key_end_of(s0, S, a.Skv);

  // ---- tile statistics over this block's valid rows ----------------------------------------------
  if (tid == 0) {
    sh_stats[0] = INT_MAX;  // pe_min
    sh_stats[1] = 0;        // pe_max
    sh_stats[2] = INT_MAX;  // smallest block id >= 0
    sh_stats[3] = -1;       // largest block id
    sh_stats[4] = INT_MAX;  // first segment index of those blocks
    sh_stats[5] = -1;       // last segment index of those blocks
  }
  __syncthreads();
  if (tid < kBlockM && m0 + tid < a.rows) {
    const int qi = (m0 + tid) / G;
    const int pe = prefix_end_of(s0, a.local_limit[qi], S, key_end);
    atomicMin(&sh_stats[0], pe);
    atomicMax(&sh_stats[1], pe);
    const int bq = a.block_id[qi];
    if (bq >= 0) {
      atomicMin(&sh_stats[2], bq);
      atomicMax(&sh_stats[3], bq);
    }
  }
  __syncthreads();
  const int bmin = sh_stats[2], bmax = sh_stats[3];
  if (bmax >= 0) {
    // Segment keys beyond key_end are never visible: scan only [0, key_end - s0).
    const int seg_len = static_cast<int>(clamp64(static_cast<int64_t>(key_end) - s0, 0, S));
    for (int j = tid; j < seg_len; j += kThreads) {
      const int bj = a.block_id[j];
      if (bj >= bmin && bj <= bmax) {
        atomicMin(&sh_stats[4], j);
        atomicMax(&sh_stats[5], j);
      }
    }
  }
  __syncthreads();
  TileStats st;
  st.pe_min = sh_stats[0];
  st.pe_max = sh_stats[1];
  if (sh_stats[5] >= 0) {
    st.blk_lo = s0 + sh_stats[4];
    st.blk_hi = s0 + sh_stats[5] + 1;
  } else {
    st.blk_lo = st.blk_hi = 0;
  }
  const TilePlan plan = make_plan(st, s0, key_end, a.num_splits, split);
  const int n_tiles = plan.count();

  // ---- per-thread row data (rows g and g + 8 of this warp's m16 block) -----------------------------
  const int g = lane >> 2, t4 = lane & 3;
  const bool warp_active = m0 + warp * 16 < a.rows;  // warp-uniform: skip the math of an all-padding warp
  int row_pe[2], row_bq[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = m0 + warp * 16 + g + 8 * h;
    if (r < a.rows) {
      const int qi = r / G;
      row_pe[h] = prefix_end_of(s0, a.local_limit[qi], S, key_end);
      row_bq[h] = a.block_id[qi];
    } else {
      row_pe[h] = 0;
      row_bq[h] = -1;
    }
  }

  // ---- async loads -----------------------------------------------------------------------------------
  // Copy roles: thread tid moves 16-byte chunk tid % kChunks of rows tid / kChunks + i * kRowsPerPass.
  constexpr int kRowsPerPass = kThreads / kChunks;  // 32 (D=64) or 16 (D=128): a multiple of 8, so the
  const int cp_row = tid / kChunks;                  // swizzle (row & 7) is the same on every pass
  const int cp_chunk = tid % kChunks;
  static_assert(kBlockM % kRowsPerPass == 0 && kBlockN % kRowsPerPass == 0 && kRowsPerPass % 8 == 0, "copy roles");
  {  // Q tile: rows past a.rows are zero-filled (never stored).
    const T* qbase = static_cast<const T*>(a.q) + static_cast<int64_t>(b) * a.qs0 + cp_chunk * 8;
#pragma unroll
    for (int i = 0; i < kBlockM / kRowsPerPass; ++i) {
      const int rl = cp_row + i * kRowsPerPass;
      const int r = m0 + rl;
      const bool ok = r < a.rows;
      const T* src = static_cast<const T*>(a.q);
      if (ok) {
        const int qi = r / G, h = hk * G + r % G;
        src = qbase + static_cast<int64_t>(h) * a.qs1 + static_cast<int64_t>(qi) * a.qs2;
      }
      cp_async_16(smem_u32(sQ + swz<D>(rl, cp_chunk)), src, ok);
    }
    cp_async_commit();
  }
  const T* kthr = static_cast<const T*>(a.k) + static_cast<int64_t>(b) * a.ks0 + static_cast<int64_t>(hk) * a.ks1 +
                  cp_chunk * 8;
  const T* vthr = static_cast<const T*>(a.v) + static_cast<int64_t>(b) * a.vs0 + static_cast<int64_t>(hk) * a.vs1 +
                  cp_chunk * 8;
  const int64_t ks2 = a.ks2, vs2 = a.vs2;
  // K/V tile `tile` -> stage; masked tiles zero-fill keys >= key_end (never read from global) and record the
  // keys' block ids (-2 outside the segment).
  auto load_tile = [&](int tile, bool masked, int stage) {
    const int n0 = tile * kBlockN;
    const uint32_t dK = smem_u32(sKV + stage * L::kSlot + swz<D>(cp_row, cp_chunk));
    const uint32_t dV = dK + L::kKV * 2;
#pragma unroll
    for (int i = 0; i < kBlockN / kRowsPerPass; ++i) {
      const int j = n0 + cp_row + i * kRowsPerPass;
      const bool ok = !masked || j < key_end;
      const T* ks = static_cast<const T*>(a.k);
      const T* vs = static_cast<const T*>(a.v);
      if (ok) {
        ks = kthr + static_cast<int64_t>(j) * ks2;
        vs = vthr + static_cast<int64_t>(j) * vs2;
      }
      // swz<D>(cp_row + i * kRowsPerPass, c) == swz<D>(cp_row, c) + i * kRowsPerPass * D
      cp_async_16(dK + i * kRowsPerPass * D * 2, ks, ok);
      cp_async_16(dV + i * kRowsPerPass * D * 2, vs, ok);
    }
    if (masked && tid < kBlockN) {
      const int j = n0 + tid;
      sts_i32(&sBid[stage * kBlockN + tid], key_in_segment(j, s0, key_end) ? a.block_id[j - s0] : -2);
    }
  };

  // Prologue: tiles 0 .. kStages-2 into slots 0 .. kStages-2 (one commit group each, empty past the walk).
#pragma unroll
  for (int t = 0; t < kStages - 1; ++t) {
    if (t < n_tiles) {
      bool masked;
      const int tile = plan.tile(t, &masked);
      load_tile(tile, masked, t);
    }
    cp_async_commit();
  }
  cp_async_wait<kStages - 1>();  // the Q group (the oldest) has landed; the tiles may still be in flight
  __syncthreads();

  uint32_t qf[kKSteps][4];
#pragma unroll
  for (int kk = 0; kk < kKSteps; ++kk) {
    const int r = warp * 16 + frag_q_row(lane);
    const int c = frag_q_chunk(lane, kk);
    ldsm_x4(smem_u32(sQ + swz<D>(r, c)), qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3]);
  }
  __syncthreads();  // every warp holds its Q fragments: the Q slot is refilled in iteration 0

  float o[kDB][4];
#pragma unroll
  for (int i = 0; i < kDB; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float row_m[2] = {-INFINITY, -INFINITY};  // running max of the scaled (log2-domain) scores
  float row_l[2] = {0.f, 0.f};              // this thread's partial row sums (its 2 columns of each n8 block)
  const float qk_scale = a.qk_scale;
  const float cap = a.cap;
  const bool soft = cap > 0.f;  // block-uniform

  // One key tile: S = Q K^T, online softmax, O += P V. MASKED applies the layout rule per element.
  auto compute_tile = [&](const T* tK, const T* tV, const int* tBid, int n0, auto masked_tag) {
    constexpr bool kMasked = decltype(masked_tag)::value;
    float s[kNB][4];
#pragma unroll
    for (int i = 0; i < kNB; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
#pragma unroll
      for (int nb2 = 0; nb2 < kNB / 2; ++nb2) {
        const int key = frag_k_key(lane, nb2);
        const int c = frag_k_chunk(lane, kk);
        uint32_t b0, b1, b2, b3;
        ldsm_x4(smem_u32(tK + swz<D>(key, c)), b0, b1, b2, b3);
        mma_16816<T>(s[2 * nb2], qf[kk], b0, b1);
        mma_16816<T>(s[2 * nb2 + 1], qf[kk], b2, b3);
      }
    }
    // scale (log2 domain), mask, row max
    float mx[2] = {row_m[0], row_m[1]};
#pragma unroll
    for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[nb][e] * qk_scale;
        if (soft) x = cap * tanhf(x);  // softcap * tanh(scale * q.k / softcap), log2 domain (before the mask)
        if constexpr (kMasked) {
          const int kl = nb * 8 + frag_c_col(lane, e);
          const int h = e >> 1;  // row g + 8 h = frag_c_row(lane, e)
          if (!visible(n0 + kl, row_pe[h], row_bq[h], lds_i32(&tBid[kl]))) x = -INFINITY;
        }
        s[nb][e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
    }
    float base[2], alpha[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      base[h] = mx[h] == -INFINITY ? 0.f : mx[h];  // a row that has seen nothing yet: p = 0, no NaN
      alpha[h] = fast_exp2(row_m[h] - base[h]);    // row_m = -inf -> 0
      row_m[h] = mx[h];
    }
    float sum[2] = {0.f, 0.f};
#pragma unroll
    for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = fast_exp2(s[nb][e] - base[e >> 1]);
        s[nb][e] = p;
        sum[e >> 1] += p;
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) row_l[h] = row_l[h] * alpha[h] + sum[h];
#pragma unroll
    for (int i = 0; i < kDB; ++i) {
      o[i][0] *= alpha[0];
      o[i][1] *= alpha[0];
      o[i][2] *= alpha[1];
      o[i][3] *= alpha[1];
    }
    // O += P V: the S accumulators of n8 blocks 2k, 2k+1 are the A fragment of k16 step k.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t pa[4];
      pa[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      pa[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      pa[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dn2 = 0; dn2 < kDB / 2; ++dn2) {
        const int key = frag_v_key(lane, kk);
        const int c = frag_v_chunk(lane, dn2);
        uint32_t b0, b1, b2, b3;
        ldsm_x4_t(smem_u32(tV + swz<D>(key, c)), b0, b1, b2, b3);
        mma_16816<T>(o[2 * dn2], pa, b0, b1);
        mma_16816<T>(o[2 * dn2 + 1], pa, b2, b3);
      }
    }
  };

  // ---- main loop: kStages-slot ring, tile t in slot t % kStages ---------------------------------------
  int stage = 0;                   // slot of tile it
  int pf_stage = kStages - 1;      // slot of tile it + kStages - 1 (the one issued this iteration)
  for (int it = 0; it < n_tiles; ++it) {
    if (it + kStages - 1 < n_tiles) {
      // pf_stage held tile it - 1 (read in iteration it - 1, released by its trailing barrier) or, at it = 0,
      // the Q tile (released by the barrier after the Q fragments were loaded).
      bool nmasked;
      const int ntile = plan.tile(it + kStages - 1, &nmasked);
      load_tile(ntile, nmasked, pf_stage);
    }
    cp_async_commit();
    cp_async_wait<kStages - 1>();  // all but the kStages - 1 newest groups: tile `it` has landed
    __syncthreads();               // ... for every thread's copies, and sBid[stage] is visible
    bool masked;
    const int tile = plan.tile(it, &masked);
    if (warp_active) {
      const T* tK = sKV + stage * L::kSlot;
      const T* tV = tK + L::kKV;
      const int* tBid = sBid + stage * kBlockN;
      if (masked)
        compute_tile(tK, tV, tBid, tile * kBlockN, std::true_type{});
      else
        compute_tile(tK, tV, tBid, tile * kBlockN, std::false_type{});
    }
    __syncthreads();  // this slot is refilled in iteration it + 1
    stage = stage + 1 == kStages ? 0 : stage + 1;
    pf_stage = pf_stage + 1 == kStages ? 0 : pf_stage + 1;
  }
  cp_async_wait<0>();

  // ---- epilogue ------------------------------------------------------------------------------------
  if (!warp_active) return;
  float inv[2], lse2[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float l = row_l[h];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const bool seen = l > 0.f;
    inv[h] = seen ? 1.f / l : 0.f;
    lse2[h] = seen ? row_m[h] + log2f(l) : -INFINITY;
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = m0 + warp * 16 + g + 8 * h;
    if (r >= a.rows) continue;
    const int qi = r / G, head = hk * G + r % G;
    const int64_t grow = (static_cast<int64_t>(b) * a.Hq + head) * S + qi;  // row of [B, Hq, S]
    if (a.num_splits == 1) {
      T* orow = static_cast<T*>(a.out) + static_cast<int64_t>(b) * a.os0 + static_cast<int64_t>(head) * a.os1 +
                static_cast<int64_t>(qi) * a.os2;
#pragma unroll
      for (int dn = 0; dn < kDB; ++dn) {
        const int col = dn * 8 + 2 * t4;
        *reinterpret_cast<uint32_t*>(orow + col) = pack2<T>(o[dn][2 * h] * inv[h], o[dn][2 * h + 1] * inv[h]);
      }
      if (a.lse != nullptr && t4 == 0) a.lse[grow] = lse2[h] * kLn2;  // natural log; -inf stays -inf
    } else {
      const int64_t prow = static_cast<int64_t>(split) * a.B * a.Hq * S + grow;
      float* orow = a.o_part + prow * D;
#pragma unroll
      for (int dn = 0; dn < kDB; ++dn) {
        const int col = dn * 8 + 2 * t4;
        *reinterpret_cast<float2*>(orow + col) = make_float2(o[dn][2 * h] * inv[h], o[dn][2 * h + 1] * inv[h]);
      }
      if (t4 == 0) a.lse_part[prow] = lse2[h];
    }
  }
}


// ------------------------------------------------------------------------------------------------
// Split-KV merge: one warp per row of [B, Hq, S]; splits combined in index order (deterministic).
// ------------------------------------------------------------------------------------------------
struct MergeArgs {
  const float* o_part; const float* lse_part;
  void* out; float* lse;
  int64_t os0, os1, os2;
  int64_t n_rows;  // B * Hq * S
  int Hq, S, num_splits;
};

template <int D, typename T>
__global__ void __launch_bounds__(256) tidar_attention_merge_kernel(const MergeArgs a) {
  constexpr int kPer = D / 32;  // 2 or 4 consecutive columns per lane
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (r >= a.n_rows) return;
  float mx = -INFINITY;
  for (int s = lane; s < a.num_splits; s += 32) mx = fmaxf(mx, a.lse_part[s * a.n_rows + r]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  float acc[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) acc[i] = 0.f;
  float tot = 0.f;
  if (mx != -INFINITY) {
    for (int s = 0; s < a.num_splits; ++s) {
      const int64_t pr = s * a.n_rows + r;
      const float l2 = a.lse_part[pr];
      if (l2 == -INFINITY) continue;  // an empty split: its partial O is never read
      const float w = exp2f(l2 - mx);
      tot += w;
      const float* src = a.o_part + pr * D + lane * kPer;
      if constexpr (kPer == 4) {
        const float4 x = *reinterpret_cast<const float4*>(src);
        acc[0] += w * x.x; acc[1] += w * x.y; acc[2] += w * x.z; acc[3] += w * x.w;
      } else {
        const float2 x = *reinterpret_cast<const float2*>(src);
        acc[0] += w * x.x; acc[1] += w * x.y;
      }
    }
  }
  const float inv = tot > 0.f ? 1.f / tot : 0.f;
  const int64_t b = r / (static_cast<int64_t>(a.Hq) * a.S);
  const int h = static_cast<int>((r / a.S) % a.Hq);
  const int i = static_cast<int>(r % a.S);
  T* dst = static_cast<T*>(a.out) + b * a.os0 + h * a.os1 + static_cast<int64_t>(i) * a.os2 + lane * kPer;
#pragma unroll
  for (int c = 0; c < kPer; c += 2)
    *reinterpret_cast<uint32_t*>(dst + c) = pack2<T>(acc[c] * inv, acc[c + 1] * inv);
  if (a.lse != nullptr && lane == 0) a.lse[r] = tot > 0.f ? (mx + log2f(tot)) * kLn2 : -INFINITY;
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------
int resolve_num_sms(int num_sms) {
  if (num_sms > 0) return num_sms;
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 1;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) return 1;
  return n;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Strides of a [n0, n1, n2, D] tensor: last 1, others >= 0 and multiples of 8 where the dimension has size > 1.
int check_strides(const int64_t* st, int n0, int n1, int n2) {
  if (st[3] != 1 || st[0] < 0 || st[1] < 0 || st[2] < 0) return TIDAR_ATTN_ERR_BAD_STRIDE;
  const int n[3] = {n0, n1, n2};
  for (int i = 0; i < 3; ++i)
    if (n[i] > 1 && st[i] % 8 != 0) return TIDAR_ATTN_ERR_MISALIGNED;
  return TIDAR_ATTN_OK;
}

int64_t base_ctas(const TidarAttentionParams& p) {
  const int64_t rows = static_cast<int64_t>(p.S) * (p.Hq / p.Hkv);
  return static_cast<int64_t>(p.B) * p.Hkv * ((rows + kBlockM - 1) / kBlockM);
}

// Size checks shared by workspace_bytes / num_splits / forward.
int check_sizes(const TidarAttentionParams& p) {
  if (p.B < 0 || p.Hq < 0 || p.Hkv < 0 || p.S < 0 || p.Skv < 0 || p.D < 0) return TIDAR_ATTN_ERR_BAD_SIZE;
  if (p.D != 64 && p.D != 128) return TIDAR_ATTN_ERR_BAD_HEAD_DIM;
  if (p.dtype != 0 && p.dtype != 1) return TIDAR_ATTN_ERR_BAD_DTYPE;
  if (p.Hq > 0 && (p.Hkv <= 0 || p.Hq % p.Hkv != 0)) return TIDAR_ATTN_ERR_BAD_GQA;
  if (p.Hq > 0 && static_cast<int64_t>(p.S) * (p.Hq / p.Hkv) > INT_MAX - kBlockM) return TIDAR_ATTN_ERR_BAD_SIZE;
  return TIDAR_ATTN_OK;
}

bool nothing_to_do(const TidarAttentionParams& p) { return p.B == 0 || p.Hq == 0 || p.S == 0; }

int splits_for(const TidarAttentionParams& p) {
  if (nothing_to_do(p)) return 1;
  const int64_t rows_total = static_cast<int64_t>(p.B) * p.Hq * p.S;
  return choose_num_splits(base_ctas(p), rows_total, p.Skv, p.D, resolve_num_sms(p.num_sms));
}

template <int D, typename T>
int launch(const TidarAttentionParams& p, int num_splits, cudaStream_t stream) {
  KernelArgs a;
  a.q = p.q; a.k = p.k; a.v = p.v; a.out = p.out; a.lse = p.lse;
  a.local_limit = p.local_limit; a.block_id = p.block_id; a.seg_start = p.seg_start;
  a.qs0 = p.q_stride[0]; a.qs1 = p.q_stride[1]; a.qs2 = p.q_stride[2];
  a.ks0 = p.k_stride[0]; a.ks1 = p.k_stride[1]; a.ks2 = p.k_stride[2];
  a.vs0 = p.v_stride[0]; a.vs1 = p.v_stride[1]; a.vs2 = p.v_stride[2];
  a.os0 = p.o_stride[0]; a.os1 = p.o_stride[1]; a.os2 = p.o_stride[2];
  a.B = p.B; a.Hq = p.Hq; a.Hkv = p.Hkv; a.G = p.Hq / p.Hkv; a.S = p.S; a.Skv = p.Skv;
  a.rows = p.S * a.G;
  a.row_tiles = (a.rows + kBlockM - 1) / kBlockM;
  a.num_splits = num_splits;
  if (p.softcap > 0.f) {
    a.qk_scale = p.scale / p.softcap;
    a.cap = p.softcap * kLog2e;
  } else {
    a.qk_scale = p.scale * kLog2e;
    a.cap = 0.f;
  }
  const int64_t n_rows = static_cast<int64_t>(p.B) * p.Hq * p.S;
  a.o_part = static_cast<float*>(p.workspace);
  a.lse_part = num_splits > 1 ? a.o_part + static_cast<int64_t>(num_splits) * n_rows * D : nullptr;

  const int64_t grid = static_cast<int64_t>(p.B) * p.Hkv * num_splits * a.row_tiles;
  if (grid <= 0 || grid > INT_MAX) return TIDAR_ATTN_ERR_BAD_SIZE;
  constexpr size_t smem = SmemLayout<D>::kBytes;
  auto kernel = tidar_attention_fwd_kernel<D, T>;
  // Opt in to > 48 KB of dynamic shared memory once per device (a host call of ~1 us, kept off the decode path).
  static std::atomic<uint64_t> configured{0};
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return static_cast<int>(e);
  const uint64_t bit = dev < 64 ? (uint64_t(1) << dev) : 0;
  if (bit == 0 || !(configured.load(std::memory_order_acquire) & bit)) {
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return static_cast<int>(e);
    configured.fetch_or(bit, std::memory_order_acq_rel);
  }
#if defined(TIDAR_ATTN_EMULATE)
  tidar_emu::launch(kernel, static_cast<unsigned>(grid), kThreads, smem, a);
#else
  kernel<<<static_cast<unsigned>(grid), kThreads, smem, stream>>>(a);
#endif
  e = cudaGetLastError();
  if (e != cudaSuccess) return static_cast<int>(e);
  if (num_splits > 1) {
    MergeArgs m;
    m.o_part = a.o_part; m.lse_part = a.lse_part; m.out = p.out; m.lse = p.lse;
    m.os0 = p.o_stride[0]; m.os1 = p.o_stride[1]; m.os2 = p.o_stride[2];
    m.n_rows = n_rows; m.Hq = p.Hq; m.S = p.S; m.num_splits = num_splits;
    const int64_t mgrid = (n_rows + 7) / 8;
    if (mgrid > INT_MAX) return TIDAR_ATTN_ERR_BAD_SIZE;
#if defined(TIDAR_ATTN_EMULATE)
    tidar_emu::launch(tidar_attention_merge_kernel<D, T>, static_cast<unsigned>(mgrid), 256, 0, m);
#else
    tidar_attention_merge_kernel<D, T><<<static_cast<unsigned>(mgrid), 256, 0, stream>>>(m);
#endif
    e = cudaGetLastError();
    if (e != cudaSuccess) return static_cast<int>(e);
  }
  return TIDAR_ATTN_OK;
}

}  // namespace
}  // namespace tidar_attn

size_t tidar_attention_workspace_bytes(const TidarAttentionParams& p) {
  using namespace tidar_attn;
  if (check_sizes(p) != TIDAR_ATTN_OK || nothing_to_do(p)) return 0;
  const int ns = splits_for(p);
  if (ns <= 1) return 0;
  const size_t rows = static_cast<size_t>(p.B) * p.Hq * p.S;
  return static_cast<size_t>(ns) * rows * (static_cast<size_t>(p.D) + 1) * sizeof(float);
}

int tidar_attention_num_splits(const TidarAttentionParams& p) {
  using namespace tidar_attn;
  if (check_sizes(p) != TIDAR_ATTN_OK) return 1;
  return splits_for(p);
}

int tidar_attention_forward(const TidarAttentionParams& p, cudaStream_t stream) {
  using namespace tidar_attn;
  int rc = check_sizes(p);
  if (rc != TIDAR_ATTN_OK) return rc;
  if (!(p.softcap >= 0.f) || std::isinf(p.softcap)) return TIDAR_ATTN_ERR_BAD_SOFTCAP;  // NaN fails >= 0
  if (nothing_to_do(p)) return TIDAR_ATTN_OK;
  if (!p.q || !p.k || !p.v || !p.out || !p.local_limit || !p.block_id || !p.seg_start)
    return TIDAR_ATTN_ERR_NULL_POINTER;
  if ((rc = check_strides(p.q_stride, p.B, p.Hq, p.S)) != TIDAR_ATTN_OK) return rc;
  if ((rc = check_strides(p.k_stride, p.B, p.Hkv, p.Skv)) != TIDAR_ATTN_OK) return rc;
  if ((rc = check_strides(p.v_stride, p.B, p.Hkv, p.Skv)) != TIDAR_ATTN_OK) return rc;
  if ((rc = check_strides(p.o_stride, p.B, p.Hq, p.S)) != TIDAR_ATTN_OK) return rc;
  if (!aligned16(p.q) || !aligned16(p.k) || !aligned16(p.v) || !aligned16(p.out)) return TIDAR_ATTN_ERR_MISALIGNED;
  const int ns = splits_for(p);
  if (ns > 1) {
    if (p.workspace == nullptr) return TIDAR_ATTN_ERR_NO_WORKSPACE;
    if (!aligned16(p.workspace)) return TIDAR_ATTN_ERR_MISALIGNED;
  }
  if (p.D == 64) {
    return p.dtype == 0 ? launch<64, __half>(p, ns, stream) : launch<64, __nv_bfloat16>(p, ns, stream);
  }
  return p.dtype == 0 ? launch<128, __half>(p, ns, stream) : launch<128, __nv_bfloat16>(p, ns, stream);
}

const char* tidar_attention_error_string(int code) {
  switch (code) {
    case TIDAR_ATTN_OK: return "ok";
    case TIDAR_ATTN_ERR_NULL_POINTER: return "tidar_attention: a required pointer is null";
    case TIDAR_ATTN_ERR_BAD_SIZE: return "tidar_attention: a size is negative or out of range";
    case TIDAR_ATTN_ERR_BAD_DTYPE: return "tidar_attention: dtype must be 0 (float16) or 1 (bfloat16)";
    case TIDAR_ATTN_ERR_BAD_STRIDE: return "tidar_attention: the last stride must be 1 and no stride negative";
    case TIDAR_ATTN_ERR_BAD_HEAD_DIM: return "tidar_attention: head dim must be 64 or 128";
    case TIDAR_ATTN_ERR_BAD_GQA: return "tidar_attention: Hkv must be positive and divide Hq";
    case TIDAR_ATTN_ERR_MISALIGNED:
      return "tidar_attention: q/k/v/out/workspace must be 16-byte aligned with strides multiple of 8 elements "
             "(make the tensors contiguous)";
    case TIDAR_ATTN_ERR_NO_WORKSPACE: return "tidar_attention: split-KV needs a workspace but it is null";
    case TIDAR_ATTN_ERR_BAD_SOFTCAP: return "tidar_attention: softcap must be 0 (none) or a finite float > 0";
    default: break;
  }
  if (code > 0) return cudaGetErrorString(static_cast<cudaError_t>(code));
  return "tidar_attention: unknown error";
}
