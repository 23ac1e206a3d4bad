// Host-only checks of the tidar_attention CUDA kernel's integer logic and fragment maps (no GPU, no CUDA):
//   g++ -std=c++17 -O2 -Wall -Wextra -I csrc csrc/tests/test_tidar_attention_host.cpp -o /tmp/t && /tmp/t
//
// 1. Tile plans (tidar_attention_plan.cuh, the code the kernel runs) against the layout rule evaluated naively:
//    every visible (row, key) pair lies in exactly one walked tile of exactly one split, full tiles are fully
//    visible and in bounds, masked tiles evaluate the rule exactly, no tile is walked twice, loads stay in
//    [0, min(Skv, s0 + S)); over decode-step, training, prefill, causal and random layouts, GQA groups, ragged
//    seg_start, scratch keys past the segment, out-of-range layout values and 1..9 splits.
// 2. The ldmatrix / mma.sync m16n8k16 fragment maps, replayed from the PTX ISA's fragment definitions on the
//    swizzled shared-memory layout: S = Q K^T and O = P V of one warp and one tile, exact on small integers.
// 3. The kernel's algorithm in float (tile walk, exp2-domain online softmax with the kernel's -inf handling,
//    split partials + log-sum-exp merge) against a double-precision softmax per query, including queries that
//    see nothing (out 0, lse -inf); and the split-KV policy (bounds, no split where it cannot pay).
#include "tidar_attention_plan.cuh"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <vector>

using namespace tidar_attn;

static int g_failures = 0;
#define CHECK(cond, ...)                                   \
  do {                                                     \
    if (!(cond)) {                                         \
      if (g_failures < 20) {                               \
        std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
        std::printf(__VA_ARGS__);                          \
        std::printf("\n");                                 \
      }                                                    \
      ++g_failures;                                        \
    }                                                      \
  } while (0)

struct Layout {
  std::vector<int> ll, bid;
};

static Layout decode_step(int K) {
  Layout L;
  for (int t = 0; t < K; ++t) { L.ll.push_back(t + 1); L.bid.push_back(-1); }
  for (int j = 1; j <= K; ++j)
    for (int s = 0; s < K; ++s) { L.ll.push_back(j); L.bid.push_back(j); }
  return L;
}
static Layout training(int n, int K) {
  Layout L;
  for (int i = 0; i < n; ++i) { L.ll.push_back(i + 1); L.bid.push_back(-1); }
  for (int i = 0; i < n; ++i) { L.ll.push_back((i / K) * K); L.bid.push_back(i / K); }
  return L;
}
static Layout prefill(int n, int K) {
  Layout L;
  for (int i = 0; i < n; ++i) { L.ll.push_back(i + 1); L.bid.push_back(-1); }
  for (int i = 0; i < K; ++i) { L.ll.push_back(n); L.bid.push_back(0); }
  return L;
}
static Layout causal(int n) {
  Layout L;
  for (int i = 0; i < n; ++i) { L.ll.push_back(i + 1); L.bid.push_back(-1); }
  return L;
}
static Layout random_layout(std::mt19937& rng, int S, bool wild) {
  Layout L;
  std::uniform_int_distribution<int> lld(0, S), bd(-1, 3), wl(-3, S + 5), wb(-3, 5);
  for (int i = 0; i < S; ++i) {
    L.ll.push_back(wild ? wl(rng) : lld(rng));
    L.bid.push_back(wild ? wb(rng) : bd(rng));
  }
  return L;
}

// The rule of docs/design.md §2 (keys past s0 + S and past Skv are never visible); ll clamped to S as the op's
// contract says local_limit lies in [0, S] (the torch layer rejects other values).
static bool rule(const Layout& L, int S, int Skv, int s0, int i, long j) {
  if (j < 0 || j >= Skv || j >= static_cast<long>(s0) + S) return false;
  const long lim = static_cast<long>(s0) + std::min(L.ll[i], S);
  if (j < lim) return true;
  return j >= s0 && L.bid[i] >= 0 && L.bid[j - s0] == L.bid[i];
}

// The thread block prologue of the kernel, on the host.
static TileStats block_stats(const Layout& L, int S, int G, int Skv, int s0, int m0) {
  const int rows = S * G, key_end = key_end_of(s0, S, Skv);
  int pe_min = std::numeric_limits<int>::max(), pe_max = 0, bmin = std::numeric_limits<int>::max(), bmax = -1;
  for (int t = 0; t < kBlockM && m0 + t < rows; ++t) {
    const int qi = (m0 + t) / G;
    const int pe = prefix_end_of(s0, L.ll[qi], S, key_end);
    pe_min = std::min(pe_min, pe);
    pe_max = std::max(pe_max, pe);
    if (L.bid[qi] >= 0) { bmin = std::min(bmin, L.bid[qi]); bmax = std::max(bmax, L.bid[qi]); }
  }
  int jlo = std::numeric_limits<int>::max(), jhi = -1;
  if (bmax >= 0) {
    const int seg_len = static_cast<int>(clamp64(static_cast<int64_t>(key_end) - s0, 0, S));
    for (int j = 0; j < seg_len; ++j)
      if (L.bid[j] >= bmin && L.bid[j] <= bmax) { jlo = std::min(jlo, j); jhi = std::max(jhi, j); }
  }
  TileStats st;
  st.pe_min = pe_min;
  st.pe_max = pe_max;
  if (jhi >= 0) { st.blk_lo = s0 + jlo; st.blk_hi = s0 + jhi + 1; } else { st.blk_lo = st.blk_hi = 0; }
  return st;
}

// The kernel's mask for (row query qi, key j) inside a masked tile.
static bool kernel_visible(const Layout& L, int S, int Skv, int s0, int qi, long j) {
  const int key_end = key_end_of(s0, S, Skv);
  const int pe = prefix_end_of(s0, L.ll[qi], S, key_end);
  const int bk = key_in_segment(j, s0, key_end) ? L.bid[j - s0] : -2;
  return visible(j, pe, L.bid[qi], bk);
}

static long g_plans = 0, g_tiles = 0;

// Part 1 for one (layout, G, Skv, s0, num_splits).
static void check_plans(const Layout& L, int G, int Skv, int s0, int num_splits) {
  const int S = static_cast<int>(L.ll.size()), rows = S * G;
  const int key_end = key_end_of(s0, S, Skv);
  const int n_key_tiles = cdiv_int(Skv, kBlockN) + 1;
  for (int m0 = 0; m0 < rows; m0 += kBlockM) {
    const int mrows = std::min(kBlockM, rows - m0);
    const TileStats st = block_stats(L, S, G, Skv, s0, m0);
    CHECK(st.pe_min >= 0 && st.pe_min <= st.pe_max && st.pe_max <= key_end, "stats %d %d", st.pe_min, st.pe_max);
    std::vector<int> walked(n_key_tiles + 2, 0);
    for (int sp = 0; sp < num_splits; ++sp) {
      const TilePlan p = make_plan(st, s0, key_end, num_splits, sp);
      ++g_plans;
      CHECK(p.full_begin >= 0 && p.full_begin <= p.full_end && p.m1_begin <= p.m1_end && p.m2_begin <= p.m2_end,
            "plan order");
      for (int i = 0; i < p.count(); ++i) {
        bool masked;
        const int t = p.tile(i, &masked);
        ++g_tiles;
        CHECK(t >= 0 && t < n_key_tiles, "tile %d out of range", t);
        if (t < 0 || t >= n_key_tiles) continue;
        walked[t]++;
        const long n0 = static_cast<long>(t) * kBlockN;
        for (long j = n0; j < n0 + kBlockN; ++j) {
          if (!masked) {
            CHECK(j < Skv && j < key_end, "full tile key %ld out of bounds (Skv %d)", j, Skv);
            for (int r = 0; r < mrows; ++r)
              CHECK(rule(L, S, Skv, s0, (m0 + r) / G, j), "full tile %d not fully visible (row %d key %ld)", t,
                    m0 + r, j);
          } else {
            // The kernel loads key j iff j < key_end and masks with kernel_visible.
            for (int r = 0; r < mrows; ++r) {
              const int qi = (m0 + r) / G;
              const bool kv = j < key_end && kernel_visible(L, S, Skv, s0, qi, j);
              CHECK(kv == rule(L, S, Skv, s0, qi, j), "masked tile rule mismatch row %d key %ld", m0 + r, j);
            }
          }
        }
      }
    }
    // Exactly once: no tile twice, and every tile with a visible pair walked.
    for (int t = 0; t < n_key_tiles; ++t) {
      CHECK(walked[t] <= 1, "tile %d walked %d times", t, walked[t]);
      bool any = false;
      for (long j = static_cast<long>(t) * kBlockN; j < static_cast<long>(t + 1) * kBlockN && !any; ++j)
        for (int r = 0; r < mrows && !any; ++r) any = rule(L, S, Skv, s0, (m0 + r) / G, j);
      CHECK(!any || walked[t] == 1, "tile %d has visible keys but is skipped (m0 %d s0 %d)", t, m0, s0);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Part 2: fragment maps. Shared memory as float arrays of the swizzled layout; registers as pairs of floats.
// ------------------------------------------------------------------------------------------------
struct Pair { float lo, hi; };

// ldmatrix.x4: lane 8i + r gives the address (element offset) of row r of matrix i; without .trans lane l
// receives matrix i's (l/4, 2(l%4)) and (l/4, 2(l%4)+1) in reg i; with .trans (2(l%4), l/4), (2(l%4)+1, l/4).
static void ldmatrix_x4(const std::vector<float>& smem, const int addr[32], bool trans, Pair out[32][4]) {
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 4; ++i) {
      const int g = lane / 4, t = lane % 4;
      if (!trans) {
        const int a = addr[8 * i + g];
        out[lane][i] = {smem[a + 2 * t], smem[a + 2 * t + 1]};
      } else {
        out[lane][i] = {smem[addr[8 * i + 2 * t] + g], smem[addr[8 * i + 2 * t + 1] + g]};
      }
    }
}

// mma.m16n8k16 (row.col): A reg0 (g, 2t..2t+1), reg1 (g+8, 2t..), reg2 (g, 2t+8..), reg3 (g+8, 2t+8..);
// B reg0 (k 2t..2t+1, n g), reg1 (k 2t+8.., n g); C e0,e1 (g, 2t..2t+1), e2,e3 (g+8, 2t..).
static void mma(float c[32][4], const Pair a[32][4], const Pair b[32][2]) {
  float A[16][16], B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    A[g][2 * t] = a[lane][0].lo; A[g][2 * t + 1] = a[lane][0].hi;
    A[g + 8][2 * t] = a[lane][1].lo; A[g + 8][2 * t + 1] = a[lane][1].hi;
    A[g][2 * t + 8] = a[lane][2].lo; A[g][2 * t + 9] = a[lane][2].hi;
    A[g + 8][2 * t + 8] = a[lane][3].lo; A[g + 8][2 * t + 9] = a[lane][3].hi;
    B[2 * t][g] = b[lane][0].lo; B[2 * t + 1][g] = b[lane][0].hi;
    B[2 * t + 8][g] = b[lane][1].lo; B[2 * t + 9][g] = b[lane][1].hi;
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int e = 0; e < 4; ++e) {
      const int r = g + 8 * (e >> 1), n = 2 * t + (e & 1);
      double acc = 0;
      for (int k = 0; k < 16; ++k) acc += static_cast<double>(A[r][k]) * B[k][n];
      c[lane][e] += static_cast<float>(acc);
    }
  }
}

template <int D>
static void check_fragments(std::mt19937& rng) {
  constexpr int kChunks = D / 8, kKSteps = D / 16, kNB = kBlockN / 8, kDB = D / 8;
  std::uniform_int_distribution<int> small(-4, 4);
  const int warp = 3;  // any warp of the block: its rows are [16 warp, 16 warp + 16)
  std::vector<float> Q(kBlockM * D), K(kBlockN * D), V(kBlockN * D), P(16 * kBlockN);
  for (auto& x : Q) x = static_cast<float>(small(rng));
  for (auto& x : K) x = static_cast<float>(small(rng));
  for (auto& x : V) x = static_cast<float>(small(rng));
  for (auto& x : P) x = static_cast<float>(small(rng));
  // cp.async stores: thread chunk i -> (row i / kChunks, chunk i % kChunks) at swz<D>.
  std::vector<float> sQ(kBlockM * D, NAN), sK(kBlockN * D, NAN), sV(kBlockN * D, NAN);
  std::vector<int> hits_q(kBlockM * D, 0), hits_k(kBlockN * D, 0);
  for (int i = 0; i < kBlockM * kChunks; ++i) {
    const int rl = i / kChunks, c = i % kChunks;
    for (int e = 0; e < 8; ++e) { sQ[swz<D>(rl, c) + e] = Q[rl * D + c * 8 + e]; hits_q[swz<D>(rl, c) + e]++; }
  }
  for (int i = 0; i < kBlockN * kChunks; ++i) {
    const int rl = i / kChunks, c = i % kChunks;
    for (int e = 0; e < 8; ++e) {
      sK[swz<D>(rl, c) + e] = K[rl * D + c * 8 + e];
      sV[swz<D>(rl, c) + e] = V[rl * D + c * 8 + e];
      hits_k[swz<D>(rl, c) + e]++;
    }
  }
  for (int h : hits_q) CHECK(h == 1, "Q smem element written %d times", h);
  for (int h : hits_k) CHECK(h == 1, "K/V smem element written %d times", h);
  // Bank conflicts: the 8 row addresses of each 8x8 matrix of an ldmatrix must fall in 8 distinct 16-byte bank
  // groups (128-byte lines: (element offset * 2 / 16) % 8).
  auto conflict_free = [](const int addr[32]) {
    for (int i = 0; i < 4; ++i) {
      int seen = 0;
      for (int r = 0; r < 8; ++r) seen |= 1 << ((addr[8 * i + r] * 2 / 16) % 8);
      if (seen != 0xff) return false;
    }
    return true;
  };

  // Q fragments.
  Pair qf[kKSteps][32][4];
  for (int kk = 0; kk < kKSteps; ++kk) {
    int addr[32];
    for (int lane = 0; lane < 32; ++lane) addr[lane] = swz<D>(warp * 16 + frag_q_row(lane), frag_q_chunk(lane, kk));
    CHECK(conflict_free(addr), "Q ldmatrix bank conflict kk %d", kk);
    ldmatrix_x4(sQ, addr, false, qf[kk]);
  }
  // S = Q K^T, the kernel's loop order.
  float s[kNB][32][4] = {};
  for (int kk = 0; kk < kKSteps; ++kk)
    for (int nb2 = 0; nb2 < kNB / 2; ++nb2) {
      int addr[32];
      for (int lane = 0; lane < 32; ++lane) addr[lane] = swz<D>(frag_k_key(lane, nb2), frag_k_chunk(lane, kk));
      CHECK(conflict_free(addr), "K ldmatrix bank conflict");
      Pair b[32][4];
      ldmatrix_x4(sK, addr, false, b);
      Pair b01[32][2], b23[32][2];
      for (int lane = 0; lane < 32; ++lane) {
        b01[lane][0] = b[lane][0]; b01[lane][1] = b[lane][1];
        b23[lane][0] = b[lane][2]; b23[lane][1] = b[lane][3];
      }
      mma(s[2 * nb2], qf[kk], b01);
      mma(s[2 * nb2 + 1], qf[kk], b23);
    }
  for (int nb = 0; nb < kNB; ++nb)
    for (int lane = 0; lane < 32; ++lane)
      for (int e = 0; e < 4; ++e) {
        const int r = warp * 16 + frag_c_row(lane, e), key = nb * 8 + frag_c_col(lane, e);
        double ref = 0;
        for (int d = 0; d < D; ++d) ref += static_cast<double>(Q[r * D + d]) * K[key * D + d];
        CHECK(s[nb][lane][e] == static_cast<float>(ref), "S[%d][%d] = %g, want %g (D=%d)", r, key, s[nb][lane][e],
              ref, D);
      }
  // O = P V with P in the S accumulator layout re-packed as the kernel does.
  for (int nb = 0; nb < kNB; ++nb)
    for (int lane = 0; lane < 32; ++lane)
      for (int e = 0; e < 4; ++e) s[nb][lane][e] = P[frag_c_row(lane, e) * kBlockN + nb * 8 + frag_c_col(lane, e)];
  float o[kDB][32][4] = {};
  for (int kk = 0; kk < kBlockN / 16; ++kk) {
    Pair pa[32][4];
    for (int lane = 0; lane < 32; ++lane) {
      pa[lane][0] = {s[2 * kk][lane][0], s[2 * kk][lane][1]};
      pa[lane][1] = {s[2 * kk][lane][2], s[2 * kk][lane][3]};
      pa[lane][2] = {s[2 * kk + 1][lane][0], s[2 * kk + 1][lane][1]};
      pa[lane][3] = {s[2 * kk + 1][lane][2], s[2 * kk + 1][lane][3]};
    }
    for (int dn2 = 0; dn2 < kDB / 2; ++dn2) {
      int addr[32];
      for (int lane = 0; lane < 32; ++lane) addr[lane] = swz<D>(frag_v_key(lane, kk), frag_v_chunk(lane, dn2));
      CHECK(conflict_free(addr), "V ldmatrix bank conflict");
      Pair b[32][4];
      ldmatrix_x4(sV, addr, true, b);
      Pair b01[32][2], b23[32][2];
      for (int lane = 0; lane < 32; ++lane) {
        b01[lane][0] = b[lane][0]; b01[lane][1] = b[lane][1];
        b23[lane][0] = b[lane][2]; b23[lane][1] = b[lane][3];
      }
      mma(o[2 * dn2], pa, b01);
      mma(o[2 * dn2 + 1], pa, b23);
    }
  }
  for (int dn = 0; dn < kDB; ++dn)
    for (int lane = 0; lane < 32; ++lane)
      for (int e = 0; e < 4; ++e) {
        const int r = frag_c_row(lane, e), col = dn * 8 + frag_c_col(lane, e);
        // the epilogue stores element pair (e, e+1) at column dn * 8 + 2 * (lane % 4)
        CHECK(col == dn * 8 + 2 * (lane & 3) + (e & 1), "epilogue column map");
        double ref = 0;
        for (int j = 0; j < kBlockN; ++j) ref += static_cast<double>(P[r * kBlockN + j]) * V[j * D + col];
        CHECK(o[dn][lane][e] == static_cast<float>(ref), "O[%d][%d] = %g, want %g (D=%d)", r, col, o[dn][lane][e],
              ref, D);
      }
}

// ------------------------------------------------------------------------------------------------
// Part 3: the algorithm in float vs a double softmax. One (b, kv head) with G packed heads, small head dim.
// ------------------------------------------------------------------------------------------------
static void check_algorithm(std::mt19937& rng, const Layout& L, int G, int Skv, int s0, int num_splits,
                            double* max_err) {
  const int S = static_cast<int>(L.ll.size()), rows = S * G, Dh = 8;
  const float scale = 0.35f, qk_scale = scale * 1.4426950408889634f;
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> q(rows * Dh), k(static_cast<size_t>(Skv) * Dh), v(static_cast<size_t>(Skv) * Dh);
  for (auto& x : q) x = nd(rng) * 2.f;
  for (auto& x : k) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  // Scratch keys past the segment hold NaN, as an uninitialised cache might: they must never be read.
  for (long j = std::max<long>(0, static_cast<long>(s0) + S); j < Skv; ++j)
    for (int d = 0; d < Dh; ++d) { k[j * Dh + d] = NAN; v[j * Dh + d] = NAN; }
  const int key_end = key_end_of(s0, S, Skv);
  std::vector<float> o_part(static_cast<size_t>(num_splits) * rows * Dh, NAN), lse_part(num_splits * rows, NAN);
  for (int m0 = 0; m0 < rows; m0 += kBlockM) {
    const TileStats st = block_stats(L, S, G, Skv, s0, m0);
    for (int sp = 0; sp < num_splits; ++sp) {
      const TilePlan p = make_plan(st, s0, key_end, num_splits, sp);
      for (int r = m0; r < std::min(rows, m0 + kBlockM); ++r) {
        const int qi = r / G;
        const int pe = prefix_end_of(s0, L.ll[qi], S, key_end), bq = L.bid[qi];
        float m = -INFINITY, l = 0.f, acc[8] = {};
        for (int i = 0; i < p.count(); ++i) {
          bool masked;
          const int t = p.tile(i, &masked);
          float sc[kBlockN];
          float mx = m;
          for (int kl = 0; kl < kBlockN; ++kl) {
            const long j = static_cast<long>(t) * kBlockN + kl;
            const bool loaded = !masked || j < key_end;  // zero-filled otherwise
            float dot = 0.f;
            if (loaded)
              for (int d = 0; d < Dh; ++d) dot += q[r * Dh + d] * k[j * Dh + d];
            float x = dot * qk_scale;
            if (masked) {
              const int bk = key_in_segment(j, s0, key_end) ? L.bid[j - s0] : -2;
              if (!visible(j, pe, bq, bk)) x = -INFINITY;
            }
            sc[kl] = x;
            mx = std::max(mx, x);
          }
          const float base = mx == -INFINITY ? 0.f : mx;
          const float alpha = std::exp2(m - base);
          m = mx;
          float sum = 0.f;
          for (int d = 0; d < Dh; ++d) acc[d] *= alpha;
          for (int kl = 0; kl < kBlockN; ++kl) {
            const long j = static_cast<long>(t) * kBlockN + kl;
            const bool loaded = !masked || j < key_end;
            const float pr = std::exp2(sc[kl] - base);
            sum += pr;
            for (int d = 0; d < Dh; ++d) acc[d] += pr * (loaded ? v[j * Dh + d] : 0.f);
          }
          l = l * alpha + sum;
        }
        const bool seen = l > 0.f;
        for (int d = 0; d < Dh; ++d) o_part[(static_cast<size_t>(sp) * rows + r) * Dh + d] = seen ? acc[d] / l : 0.f;
        lse_part[sp * rows + r] = seen ? m + std::log2(l) : -INFINITY;
      }
    }
  }
  for (int r = 0; r < rows; ++r) {
    // merge (the merge kernel's arithmetic; with one split the forward writes o_part / lse directly)
    float mx = -INFINITY;
    for (int sp = 0; sp < num_splits; ++sp) mx = std::max(mx, lse_part[sp * rows + r]);
    float out[8] = {}, tot = 0.f;
    if (mx != -INFINITY)
      for (int sp = 0; sp < num_splits; ++sp) {
        const float l2 = lse_part[sp * rows + r];
        if (l2 == -INFINITY) continue;
        const float w = std::exp2(l2 - mx);
        tot += w;
        for (int d = 0; d < Dh; ++d) out[d] += w * o_part[(static_cast<size_t>(sp) * rows + r) * Dh + d];
      }
    const float inv = tot > 0.f ? 1.f / tot : 0.f;
    const float lse = tot > 0.f ? (mx + std::log2(tot)) * 0.6931471805599453f : -INFINITY;
    // reference
    const int qi = r / G;
    double rm = -INFINITY;
    std::vector<double> sc(Skv, -INFINITY);
    for (long j = 0; j < Skv; ++j)
      if (rule(L, S, Skv, s0, qi, j)) {
        double dot = 0;
        for (int d = 0; d < Dh; ++d) dot += static_cast<double>(q[r * Dh + d]) * k[j * Dh + d];
        sc[j] = dot * scale;
        rm = std::max(rm, sc[j]);
      }
    if (rm == -INFINITY) {
      CHECK(lse == -INFINITY, "empty row %d: lse %g", r, lse);
      for (int d = 0; d < Dh; ++d) CHECK(out[d] * inv == 0.f, "empty row %d: out %g", r, out[d] * inv);
      continue;
    }
    double den = 0, num[8] = {};
    for (long j = 0; j < Skv; ++j)
      if (sc[j] != -INFINITY) {
        const double w = std::exp(sc[j] - rm);
        den += w;
        for (int d = 0; d < Dh; ++d) num[d] += w * v[j * Dh + d];
      }
    const double ref_lse = rm + std::log(den);
    CHECK(std::fabs(lse - ref_lse) < 1e-4 * (1 + std::fabs(ref_lse)), "row %d lse %g want %g", r, lse, ref_lse);
    for (int d = 0; d < Dh; ++d) {
      const double err = std::fabs(out[d] * inv - num[d] / den);
      *max_err = std::max(*max_err, err);
      CHECK(err < 2e-5 && std::isfinite(out[d] * inv), "row %d col %d out %g want %g (s0 %d Skv %d splits %d)", r, d,
            out[d] * inv, num[d] / den, s0, Skv, num_splits);
    }
  }
}

int main() {
  std::mt19937 rng(1234);
  // ---- 1. plans ----
  std::vector<Layout> layouts;
  for (int K : {1, 2, 3, 4, 5, 8, 16}) layouts.push_back(decode_step(K));
  for (auto nk : {std::pair<int, int>{64, 16}, {100, 7}, {37, 37}, {130, 1}}) layouts.push_back(training(nk.first, nk.second));
  layouts.push_back(prefill(50, 8));
  layouts.push_back(prefill(1, 16));
  layouts.push_back(causal(1));
  layouts.push_back(causal(129));
  for (int S : {1, 7, 63, 113, 200}) layouts.push_back(random_layout(rng, S, false));
  const size_t n_regular = layouts.size();
  for (int S : {5, 70, 150}) layouts.push_back(random_layout(rng, S, true));  // out-of-range values: memory safety
  for (size_t li = 0; li < layouts.size(); ++li) {
    const Layout& L = layouts[li];
    const int S = static_cast<int>(L.ll.size());
    for (int G : {1, 3, 4, 8}) {
      for (int extra_prefix : {0, 1, 63, 64, 65, 300, 1000}) {
        for (int scratch : {0, 5, 64, 200}) {
          const int s0 = extra_prefix, Skv = s0 + S + scratch;
          for (int ns : {1, 2, 3, 9}) check_plans(L, G, Skv, s0, ns);
        }
      }
      if (li >= n_regular) {  // wild seg_start too: negative and past Skv
        for (int s0 : {-70, -1, 3}) check_plans(L, G, S + 10, s0, 2);
        check_plans(L, G, S + 10, S + 40, 3);
      }
    }
  }
  std::printf("plans: %ld plans, %ld tiles checked against the rule\n", g_plans, g_tiles);

  // ---- 2. fragments ----
  for (int rep = 0; rep < 3; ++rep) {
    check_fragments<64>(rng);
    check_fragments<128>(rng);
  }
  std::printf("fragments: ldmatrix/mma maps exact for D=64 and D=128, conflict-free swizzle\n");

  // ---- 3. algorithm ----
  double max_err = 0;
  int runs = 0;
  for (size_t li = 0; li < n_regular; ++li) {
    const Layout& L = layouts[li];
    for (int G : {1, 4}) {
      for (auto cfg : {std::pair<int, int>{0, 0}, {70, 3}, {700, 64}, {1500, 0}}) {
        const int S = static_cast<int>(L.ll.size());
        const int s0 = cfg.first, Skv = s0 + S + cfg.second;
        for (int ns : {1, 2, 5}) {
          check_algorithm(rng, L, G, Skv, s0, ns, &max_err);
          ++runs;
        }
      }
    }
  }
  std::printf("algorithm: %d runs, max |out - ref| = %.3g\n", runs, max_err);

  // ---- split policy ----
  CHECK(choose_num_splits(264, 264 * 128, 32768, 128, 132) == 1, "two full waves: no split");
  CHECK(choose_num_splits(8, 8 * 128, 100, 128, 132) == 1, "short cache: no split");
  CHECK(choose_num_splits(8, 8 * 128, 32768, 128, 132) > 8, "8 blocks over 32k keys: split");
  std::printf("policy (132 SMs; D=128 unless noted): base ctas x keys -> splits\n");
  for (int64_t ctas : {1, 6, 18, 24, 34, 72, 96, 136, 288, 544}) {
    std::printf("  %4lld ctas:", static_cast<long long>(ctas));
    for (int skv : {1024, 4368, 8464, 33040}) {
      for (int D : {64, 128}) {
        const int64_t rows_total = ctas * 100;  // ~ B * Hq * S for GQA-packed decode rows
        const int ns = choose_num_splits(ctas, rows_total, skv, D, 132);
        CHECK(ns >= 1 && ns <= kMaxSplits && (ns == 1 || ns <= (skv / kBlockN) / 4), "splits %d", ns);
        for (int s2 = 1; s2 <= std::min(kMaxSplits, (skv / kBlockN) / 4); ++s2)
          CHECK(split_cost(ctas, rows_total, skv, D, 132, ns) <= 1.03 * split_cost(ctas, rows_total, skv, D, 132, s2),
                "policy not within 3%% of the cheapest");
        if (D == 128) std::printf(" %5d keys -> %2d", skv, ns);
      }
    }
    std::printf("\n");
  }
  if (g_failures) {
    std::printf("%d FAILURES\n", g_failures);
    return 1;
  }
  std::printf("all host checks passed\n");
  return 0;
}
