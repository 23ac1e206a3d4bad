// tidar_attention_plan.cuh: the tile classification, split-KV policy and mask rule of tidar_attention.cu as
// plain __host__ __device__ integer functions, so csrc/tests/test_tidar_attention_host.cpp (g++, no CUDA)
// checks exactly the code the kernel runs. No CUDA or torch includes.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define TIDAR_ATTN_HD __host__ __device__ __forceinline__
#else
#define TIDAR_ATTN_HD inline
#endif

namespace tidar_attn {

constexpr int kBlockN = 64;     // keys per tile
constexpr int kWarps = 8;       // warps per thread block
constexpr int kBlockM = 16 * kWarps;  // packed (query, head-in-group) rows per thread block
constexpr int kMaxSplits = 64;

TIDAR_ATTN_HD int64_t clamp64(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

// One past the last key a row may ever load or see: min(Skv, s0 + S), clamped to [0, Skv].
TIDAR_ATTN_HD int key_end_of(int s0, int S, int Skv) {
  return static_cast<int>(clamp64(static_cast<int64_t>(s0) + S, 0, Skv));
}

// One past the last key of the "prefix" part a query with local_limit ll sees: s0 + min(ll, S), within [0, key_end].
TIDAR_ATTN_HD int prefix_end_of(int s0, int ll, int S, int key_end) {
  const int64_t l = ll < S ? ll : S;
  return static_cast<int>(clamp64(static_cast<int64_t>(s0) + l, 0, key_end));
}

// Block id of key j as the mask sees it: block_id[j - s0] inside the segment (and below key_end), else -2
// (never equal to a query's block id, which is >= 0 whenever it is compared).
TIDAR_ATTN_HD bool key_in_segment(int64_t j, int s0, int key_end) { return j >= s0 && j < key_end; }

// The rule, given the row's prefix end pe (prefix_end_of), its block id bq and key j's block id bk (-2 outside
// the segment).
TIDAR_ATTN_HD bool visible(int64_t j, int pe, int bq, int bk) { return j < pe || (bq >= 0 && bk == bq); }

// Per thread block statistics over its valid rows: the smallest and largest prefix end, and the key range
// [blk_lo, blk_hi) (absolute) holding every segment key whose block id lies in [min, max] of the rows' block ids.
struct TileStats {
  int pe_min, pe_max;   // over valid rows; pe_min >= 0
  int blk_lo, blk_hi;   // absolute keys, blk_lo >= blk_hi when no row has a block
};

// The key tiles one thread block (one split) walks, in order: full tiles [full_begin, full_end), then masked
// tiles [m1_begin, m1_end), then masked tiles [m2_begin, m2_end). Tile t covers keys [t*kBlockN, (t+1)*kBlockN).
struct TilePlan {
  int full_begin, full_end;
  int m1_begin, m1_end;
  int m2_begin, m2_end;
  TIDAR_ATTN_HD int count() const { return (full_end - full_begin) + (m1_end - m1_begin) + (m2_end - m2_begin); }
  // The i-th tile of the walk (0 <= i < count()) and whether it needs the mask.
  TIDAR_ATTN_HD int tile(int i, bool* masked) const {
    const int nf = full_end - full_begin;
    if (i < nf) { *masked = false; return full_begin + i; }
    i -= nf;
    *masked = true;
    const int n1 = m1_end - m1_begin;
    if (i < n1) return m1_begin + i;
    return m2_begin + (i - n1);
  }
};

TIDAR_ATTN_HD int cdiv_int(int a, int b) { return (a + b - 1) / b; }

// Tiles entirely below pe_min are full for every row (their keys are all < pe_min <= key_end <= Skv, so they
// need neither the mask nor bound checks). Split-KV cuts only the full tiles of the cached prefix (below s0);
// the last split also takes the remaining full tiles and every masked tile:
//   range 1: [floor(pe_min / N), ceil(pe_max / N))      (the prefix part where rows differ)
//   range 2: [floor(blk_lo / N), ceil(blk_hi / N)) minus what is already covered (the own-block part).
// The cut points balance the splits counting the segment's tiles as the last split's extra work, and depend only
// on s0 and key_end, so every row tile of a batch row cuts at the same keys (its splits share K/V in L2).
// Every visible (row, key) pair lies in exactly one tile of exactly one split (tested on the host).
TIDAR_ATTN_HD TilePlan make_plan(const TileStats& st, int s0, int key_end, int num_splits, int split) {
  TilePlan p;
  const int n_full = st.pe_min / kBlockN;
  const int n_pref = static_cast<int>(clamp64(s0, 0, key_end)) / kBlockN;  // full tiles of the cached prefix
  const int n_split = n_pref < n_full ? n_pref : n_full;                    // (== n_pref for valid layouts)
  const int64_t total = static_cast<int64_t>(n_pref) + (cdiv_int(key_end, kBlockN) - n_pref);
  auto cut = [&](int i) -> int {
    if (i >= num_splits) return n_split;
    const int64_t c = total * i / num_splits;
    return static_cast<int>(c < n_split ? c : n_split);
  };
  p.full_begin = cut(split);
  p.full_end = cut(split + 1);
  p.m1_begin = p.m1_end = p.m2_begin = p.m2_end = 0;
  if (split != num_splits - 1) return p;
  p.full_end = n_full;
  const int e1 = cdiv_int(st.pe_max, kBlockN);
  p.m1_begin = n_full;
  p.m1_end = e1 > n_full ? e1 : n_full;
  if (st.blk_hi > st.blk_lo) {
    const int b0 = st.blk_lo / kBlockN, b1 = cdiv_int(st.blk_hi, kBlockN);
    p.m2_begin = b0 > p.m1_end ? b0 : p.m1_end;
    p.m2_end = b1 > p.m2_begin ? b1 : p.m2_begin;
  }
  return p;
}

// Thread blocks that fit on one SM at once (from the kernel's registers and shared memory; see the .cu).
TIDAR_ATTN_HD int ctas_per_sm(int D) { return D <= 64 ? 2 : 1; }

// Split-KV policy: a cost model in units of one key tile of one thread block. A block walks about
// T = Skv / 64 + 1 tiles (+1 for its prologue and epilogue) unsplit, T / s + 1 split s ways; the grid runs in
// ceil(base_ctas * s / slots) waves; splitting adds the merge launch (~2) and the fp32 partials written and
// read back (~rows_total / 4096 per split, rows_total = B * Hq * S: bytes vs. MMA time of an H100 SM). The
// smallest s within 3% of the cheapest wins; s <= kMaxSplits and at least 4 key tiles per split. Depends only
// on sizes (Skv bounds every row's prefix), never on device data.
TIDAR_ATTN_HD double split_cost(int64_t base_ctas, int64_t rows_total, int Skv, int D, int num_sms, int s) {
  const int64_t slots = static_cast<int64_t>(num_sms) * ctas_per_sm(D);
  const double tiles = static_cast<double>(Skv / kBlockN + 1);
  const double waves = static_cast<double>((base_ctas * s + slots - 1) / slots);
  double c = waves * (tiles / s + 1.0);
  if (s > 1) c += 2.0 + s * static_cast<double>(rows_total) / 4096.0;
  return c;
}

TIDAR_ATTN_HD int choose_num_splits(int64_t base_ctas, int64_t rows_total, int Skv, int D, int num_sms) {
  if (base_ctas <= 0 || num_sms <= 0) return 1;
  int max_s = (Skv / kBlockN) / 4;
  if (max_s > kMaxSplits) max_s = kMaxSplits;
  if (max_s <= 1) return 1;
  double best = split_cost(base_ctas, rows_total, Skv, D, num_sms, 1);
  for (int s = 2; s <= max_s; ++s) {
    const double c = split_cost(base_ctas, rows_total, Skv, D, num_sms, s);
    if (c < best) best = c;
  }
  for (int s = 1; s <= max_s; ++s)
    if (split_cost(base_ctas, rows_total, Skv, D, num_sms, s) <= 1.03 * best) return s;
  return 1;
}

// ------------------------------------------------------------------------------------------------
// Shared-memory tile layout and the lane -> address maps of the mma.sync fragments (m16n8k16, 16-bit inputs).
// The host test replays ldmatrix/mma from the PTX ISA's fragment definitions on these maps.
// ------------------------------------------------------------------------------------------------
// Element offset of 16-byte chunk c (8 elements) of row r in a [rows][D] tile: chunks XOR-swizzled by r % 8 so
// the 8 row addresses of each ldmatrix 8x8 matrix (8 consecutive rows, one logical chunk) hit 8 bank groups.
template <int D>
TIDAR_ATTN_HD int swz(int r, int c) { return r * D + ((c ^ (r & 7)) << 3); }

// ldmatrix.x4 of the A operand (Q rows of the warp, k16 step kk): lane -> (row within the warp's 16, chunk).
TIDAR_ATTN_HD int frag_q_row(int lane) { return lane & 15; }
TIDAR_ATTN_HD int frag_q_chunk(int lane, int kk) { return kk * 2 + (lane >> 4); }
// ldmatrix.x4 (no trans) of B = K^T for keys [16*nb2, 16*nb2+16), k16 step kk: regs 0,1 -> n8 block 2*nb2,
// regs 2,3 -> n8 block 2*nb2+1.
TIDAR_ATTN_HD int frag_k_key(int lane, int nb2) { return nb2 * 16 + (lane & 7) + ((lane >> 4) << 3); }
TIDAR_ATTN_HD int frag_k_chunk(int lane, int kk) { return kk * 2 + ((lane >> 3) & 1); }
// ldmatrix.x4.trans of B = V for keys [16*kk, 16*kk+16) (the k of P V), dims [16*dn2, 16*dn2+16): regs 0,1 ->
// n8 block 2*dn2, regs 2,3 -> n8 block 2*dn2+1.
TIDAR_ATTN_HD int frag_v_key(int lane, int kk) { return kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3); }
TIDAR_ATTN_HD int frag_v_chunk(int lane, int dn2) { return dn2 * 2 + (lane >> 4); }
// Accumulator element e (0..3) of an m16n8 C fragment: row and column within the 16x8 block.
TIDAR_ATTN_HD int frag_c_row(int lane, int e) { return (lane >> 2) + 8 * (e >> 1); }
TIDAR_ATTN_HD int frag_c_col(int lane, int e) { return 2 * (lane & 3) + (e & 1); }

}  // namespace tidar_attn
