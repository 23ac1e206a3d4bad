// kv_append.cu: bit-exact strided copy of a segment's K/V into the cache at per-row offsets.
//
// Fast path: the last dim is contiguous and every row start is 16-byte aligned: one thread moves 16 bytes.
// General path: one thread moves one element (as an integer of the element's size), any strides.
// All index math is 64-bit; every store is guarded by the row's bound (0 <= seg_start + s < Smax).
#include "kv_append.h"

#if defined(TIDAR_EMULATE)  // CPU test build: csrc/tests/emu_sampling.h (fibers for threads, see test_cuda_emu.py)
#include "emu_sampling.h"
#else
#define TIDAR_LAUNCH(kernel, grid, threads, stream, arg) kernel<<<(grid), (threads), 0, (stream)>>>(arg)
#endif

#include "tidar_common.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride beyond this

struct Strides4 { int64_t b, h, s, d; };

inline Strides4 make_strides(const int64_t* st) { return {st[0], st[1], st[2], st[3]}; }

// Copies `Word`s: `words_per_row` of them per (b, h, s) row; `d_step` is the element stride of one Word
// along D (1 word = elem_per_word elements on the fast path, so its D stride is elem_per_word).
template <typename Word>
struct KvArgs {
  Word* kc; Word* vc; const Word* kn; const Word* vn;
  const int32_t* seg_start;
  Strides4 skc, svc, skn, svn;  // in Words (the launcher divided them); d stride in Words too
  int64_t H, S, Smax, words_per_row, total;
};

template <typename Word>
__global__ void __launch_bounds__(kThreads) kv_append_kernel(const KvArgs<Word> a) {
  Word* __restrict__ kc = a.kc;
  Word* __restrict__ vc = a.vc;
  const Word* __restrict__ kn = a.kn;
  const Word* __restrict__ vn = a.vn;
  const Strides4 skc = a.skc, svc = a.svc, skn = a.skn, svn = a.svn;
  const int64_t H = a.H, S = a.S, Smax = a.Smax, words_per_row = a.words_per_row, total = a.total;
  const int32_t* seg_start = a.seg_start;
  const int64_t grid_threads = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < total; idx += grid_threads) {
    const int64_t w = idx % words_per_row;
    const int64_t row = idx / words_per_row;  // (b, h, s) flattened, s fastest
    const int64_t s = row % S;
    const int64_t bh = row / S;
    const int64_t h = bh % H;
    const int64_t b = bh / H;
    const int64_t dst_s = static_cast<int64_t>(__ldg(seg_start + b)) + s;
    if (dst_s < 0 || dst_s >= Smax) continue;  // guard only: the host rejected overflowing rows
    const Word kx = kn[b * skn.b + h * skn.h + s * skn.s + w * skn.d];
    const Word vx = vn[b * svn.b + h * svn.h + s * svn.s + w * svn.d];
    kc[b * skc.b + h * skc.h + dst_s * skc.s + w * skc.d] = kx;
    vc[b * svc.b + h * svc.h + dst_s * svc.s + w * svc.d] = vx;
  }
}

template <typename Word>
int launch(const TidarKvAppendParams& p, int64_t words_per_row, int64_t div, cudaStream_t stream) {
  // `div` = elements per Word: strides (in elements) become strides in Words; D stride becomes 1 Word
  // on the fast path (div > 1 only there) and stays the element stride otherwise.
  auto conv = [&](const int64_t* st) {
    Strides4 r = make_strides(st);
    r.b /= div; r.h /= div; r.s /= div;
    r.d = div > 1 ? 1 : r.d;
    return r;
  };
  const int64_t total = p.B * p.H * p.S * words_per_row;
  if (total == 0) return TIDAR_OK;
  int64_t blocks = tidar_cdiv(total, kThreads);
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  const KvArgs<Word> args{static_cast<Word*>(p.k_cache), static_cast<Word*>(p.v_cache),
                          static_cast<const Word*>(p.k_new), static_cast<const Word*>(p.v_new), p.seg_start,
                          conv(p.kc_stride), conv(p.vc_stride), conv(p.kn_stride), conv(p.vn_stride),
                          p.H, p.S, p.Smax, words_per_row, total};
  TIDAR_LAUNCH(kv_append_kernel<Word>, static_cast<unsigned>(blocks), kThreads, stream, args);
  return tidar_launch_status();
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

}  // namespace

const char* tidar_kv_append_error_string(int code) { return tidar_status_string(code); }

int tidar_kv_append(const TidarKvAppendParams& p, cudaStream_t stream) {
  if (p.B < 0 || p.H < 0 || p.S < 0 || p.D < 0 || p.Smax < 0) return TIDAR_ERR_BAD_SIZE;
  if (p.B == 0 || p.H == 0 || p.S == 0 || p.D == 0) return TIDAR_OK;
  if (!p.k_cache || !p.v_cache || !p.k_new || !p.v_new || !p.seg_start) return TIDAR_ERR_NULL_POINTER;
  if (p.S > p.Smax) return TIDAR_ERR_BAD_SIZE;
  const int es = p.elem_size;
  if (es != 1 && es != 2 && es != 4 && es != 8) return TIDAR_ERR_BAD_DTYPE;

  // Fast path: 16-byte words along a contiguous D, every row start 16-byte aligned.
  bool fast = (p.D * es) % 16 == 0 && aligned16(p.k_cache) && aligned16(p.v_cache) && aligned16(p.k_new) &&
              aligned16(p.v_new);
  const int64_t* all[4] = {p.kc_stride, p.vc_stride, p.kn_stride, p.vn_stride};
  for (int t = 0; t < 4 && fast; ++t) {
    if (all[t][3] != 1) fast = false;
    for (int i = 0; i < 3; ++i)
      if ((all[t][i] * es) % 16 != 0) fast = false;
  }
  if (fast) {
    const int64_t per = 16 / es;
    return launch<uint4>(p, p.D / per, per, stream);
  }
  switch (es) {
    case 1: return launch<uint8_t>(p, p.D, 1, stream);
    case 2: return launch<uint16_t>(p, p.D, 1, stream);
    case 4: return launch<uint32_t>(p, p.D, 1, stream);
    default: return launch<unsigned long long>(p, p.D, 1, stream);
  }
}
