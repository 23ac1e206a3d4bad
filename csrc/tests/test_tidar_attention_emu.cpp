// Runs the real csrc/tidar_attention.cu (host launcher, forward and merge kernels) on the CPU under the emulator of
// csrc/tests/emu/cuda_runtime.h and compares against a double-precision softmax of the same rounded inputs.
//   g++ -std=c++17 -O2 -DTIDAR_ATTN_EMULATE -I csrc/tests/emu -I csrc csrc/tests/test_tidar_attention_emu.cpp
//       -o /tmp/tidar_attention_emu && /tmp/tidar_attention_emu
// Checks per case: out within fp16/bf16 tolerance, lse (natural log, -inf for a query that sees nothing), no
// write outside the logical output (guards and stride gaps keep their sentinel), workspace guards, bitwise
// determinism over two runs, no shared-memory race or cp.async hazard (the emulator aborts or counts), no
// cp.async read outside q/k/v, never-visible keys (scratch past the segment, cache capacity past Skv) hold NaN
// and must not leak into the output. Then the error codes.
//
// The same file runs the kernels on a GPU: csrc/tests/test_tidar_attention_gpu.cu includes it without
// TIDAR_ATTN_EMULATE (buffers, guards included, are mirrored to device memory; races are then compute-sanitizer's
// job) and adds a decode-step benchmark.
#include "tidar_attention.cu"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#if defined(TIDAR_ATTN_EMULATE)
#define EMU_ONLY(x) x
#else
#define EMU_ONLY(x)
#define CUDA_OK(x)                                                                       \
  do {                                                                                   \
    cudaError_t e_ = (x);                                                                \
    if (e_ != cudaSuccess) {                                                             \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
      std::exit(2);                                                                      \
    }                                                                                    \
  } while (0)
#endif

namespace {

int g_fail = 0;
#define EXPECT(cond, ...)                                              \
  do {                                                                 \
    if (!(cond)) {                                                     \
      if (g_fail < 25) {                                               \
        std::printf("  FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);  \
        std::printf(__VA_ARGS__);                                      \
        std::printf("\n");                                             \
      }                                                                \
      ++g_fail;                                                        \
    }                                                                  \
  } while (0)

constexpr uint16_t kSentinel = 0x7d3b;  // an odd fp16/bf16 bit pattern never produced by the kernel here
constexpr size_t kGuard = 64;           // elements of guard before and after every buffer

struct Case {
  std::string name;
  int B, Hq, Hkv, S, Skv, D, dtype;
  std::vector<int> ll, bid, seg;
  bool bshd = false;  // q/out as [B, S, H, D] memory (non-contiguous [B, H, S, D] view)
  int kv_cap = 0;     // allocated keys per head (>= Skv); 0 = Skv
  int num_sms = 132;
  float scale = 0.f;  // 0 = D^-0.5
  float softcap = 0.f;  // > 0: logit soft-capping
};

#if defined(TIDAR_ATTN_EMULATE)
float to_f(uint16_t b, int dtype) { return dtype == 0 ? tidar_emu::f16_bits_to_f32(b) : tidar_emu::bf16_bits_to_f32(b); }
uint16_t from_f(float f, int dtype) { return dtype == 0 ? tidar_emu::f32_to_f16_bits(f) : tidar_emu::f32_to_bf16_bits(f); }
#else
float to_f(uint16_t b, int dtype) {
  if (dtype == 0) { __half h; std::memcpy(&h, &b, 2); return __half2float(h); }
  __nv_bfloat16 h; std::memcpy(&h, &b, 2); return __bfloat162float(h);
}
uint16_t from_f(float f, int dtype) {
  uint16_t b;
  if (dtype == 0) { const __half h = __float2half_rn(f); std::memcpy(&b, &h, 2); }
  else { const __nv_bfloat16 h = __float2bfloat16_rn(f); std::memcpy(&b, &h, 2); }
  return b;
}
#endif

// Host buffer with guards on both sides, 256-byte aligned so a device mirror keeps every offset's alignment.
template <typename E>
struct Buf {
  size_t n = 0, total = 0;
  E sentinel;
  std::unique_ptr<E[], void (*)(void*)> base{nullptr, std::free};
  Buf(size_t n_, E fill, E sentinel_) : n(n_), sentinel(sentinel_) {
    total = n + 2 * kGuard;
    const size_t bytes = ((total * sizeof(E) + 255) / 256) * 256;
    base.reset(static_cast<E*>(std::aligned_alloc(256, bytes)));
    for (size_t i = 0; i < total; ++i) base[i] = sentinel;
    for (size_t i = 0; i < n; ++i) data()[i] = fill;
  }
  E* data() { return base.get() + kGuard; }
  size_t bytes() const { return total * sizeof(E); }
  bool guards_intact() {
    for (size_t i = 0; i < kGuard; ++i)
      if (std::memcmp(&base[i], &sentinel, sizeof(E)) || std::memcmp(&base[kGuard + n + i], &sentinel, sizeof(E)))
        return false;
    return true;
  }
};
using Buf16 = Buf<uint16_t>;
using BufF = Buf<float>;

// Where the kernels see a host buffer: itself under the emulator, a device copy on a GPU.
struct Mirror {
  void* host;
  size_t bytes;
  void* dev;
  Mirror(void* h, size_t b) : host(h), bytes(b), dev(h) {
#if !defined(TIDAR_ATTN_EMULATE)
    CUDA_OK(cudaMalloc(&dev, b == 0 ? 16 : b));
    if (b) CUDA_OK(cudaMemcpy(dev, h, b, cudaMemcpyHostToDevice));
#endif
  }
  template <typename T>
  Mirror(Buf<T>& buf) : Mirror(buf.base.get(), buf.bytes()) {}
  template <typename T>
  T* map(T* hp) const {
    return reinterpret_cast<T*>(static_cast<char*>(dev) + (reinterpret_cast<char*>(hp) - static_cast<char*>(host)));
  }
  void back() {
#if !defined(TIDAR_ATTN_EMULATE)
    if (bytes) CUDA_OK(cudaMemcpy(host, dev, bytes, cudaMemcpyDeviceToHost));
#endif
  }
  ~Mirror() {
#if !defined(TIDAR_ATTN_EMULATE)
    cudaFree(dev);
#endif
  }
  Mirror(const Mirror&) = delete;
  Mirror& operator=(const Mirror&) = delete;
};

int forward_sync(const TidarAttentionParams& p) {
  const int rc = tidar_attention_forward(p, nullptr);
#if !defined(TIDAR_ATTN_EMULATE)
  if (rc == 0) {
    const cudaError_t e = cudaDeviceSynchronize();
    if (e != cudaSuccess) return static_cast<int>(e);
  }
#endif
  return rc;
}

bool rule(const Case& c, int b, int i, long j) {
  const int s0 = c.seg[b];
  if (j < 0 || j >= c.Skv || j >= static_cast<long>(s0) + c.S) return false;
  if (j < static_cast<long>(s0) + std::min(c.ll[i], c.S)) return true;
  return j >= s0 && c.bid[i] >= 0 && c.bid[j - s0] == c.bid[i];
}

void run_case(const Case& c, std::mt19937& rng) {
  const int B = c.B, Hq = c.Hq, Hkv = c.Hkv, S = c.S, Skv = c.Skv, D = c.D, G = Hq / Hkv;
  const int cap = c.kv_cap ? c.kv_cap : Skv;
  const float scale = c.scale != 0.f ? c.scale : 1.f / std::sqrt(static_cast<float>(D));
  const uint16_t nan16 = c.dtype == 0 ? 0x7e00 : 0x7fc0;
  std::normal_distribution<float> nd(0.f, 1.f);
  // q / out strides
  int64_t qs[4];
  if (c.bshd) { qs[0] = int64_t(S) * Hq * D; qs[1] = D; qs[2] = int64_t(Hq) * D; qs[3] = 1; }
  else { qs[0] = int64_t(Hq) * S * D; qs[1] = int64_t(S) * D; qs[2] = D; qs[3] = 1; }
  const int64_t ks[4] = {int64_t(Hkv) * cap * D, int64_t(cap) * D, D, 1};
  const size_t nq = size_t(B) * Hq * S * D, nk = size_t(B) * Hkv * cap * D;
  Buf16 q(nq, 0, kSentinel), k(nk, nan16, kSentinel), v(nk, nan16, kSentinel), out(nq, kSentinel, kSentinel);
  for (size_t i = 0; i < nq; ++i) q.data()[i] = from_f(nd(rng), c.dtype);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hkv; ++h)
      for (long j = 0; j < std::min<long>(Skv, static_cast<long>(c.seg[b]) + S); ++j)  // never-visible keys stay NaN
        for (int d = 0; d < D; ++d) {
          const size_t o = b * ks[0] + h * ks[1] + j * ks[2] + d;
          k.data()[o] = from_f(nd(rng), c.dtype);
          v.data()[o] = from_f(nd(rng), c.dtype);
        }
  BufF lse(size_t(B) * Hq * S, 12345.f, 12345.f);
  std::vector<int32_t> ll(c.ll.begin(), c.ll.end()), bid(c.bid.begin(), c.bid.end()), seg(c.seg.begin(), c.seg.end());
  Mirror mq(q), mk(k), mv(v), mout(out), mlse(lse);
  Mirror mll(ll.data(), ll.size() * 4), mbid(bid.data(), bid.size() * 4), mseg(seg.data(), seg.size() * 4);

  TidarAttentionParams p{};
  p.q = mq.map(q.data()); p.k = mk.map(k.data()); p.v = mv.map(v.data());
  p.out = mout.map(out.data()); p.lse = mlse.map(lse.data());
  p.local_limit = mll.map(ll.data()); p.block_id = mbid.map(bid.data()); p.seg_start = mseg.map(seg.data());
  for (int i = 0; i < 4; ++i) { p.q_stride[i] = qs[i]; p.o_stride[i] = qs[i]; p.k_stride[i] = ks[i]; p.v_stride[i] = ks[i]; }
  p.B = B; p.Hq = Hq; p.Hkv = Hkv; p.S = S; p.Skv = Skv; p.D = D;
  p.scale = scale; p.softcap = c.softcap; p.dtype = c.dtype; p.num_sms = c.num_sms;
  const size_t ws_bytes = tidar_attention_workspace_bytes(p);
  const int splits = tidar_attention_num_splits(p);
  BufF ws(ws_bytes / sizeof(float) + 1, 12345.f, 12345.f);
  Mirror mws(ws);
  p.workspace = ws_bytes ? mws.map(ws.data()) : nullptr;
  EMU_ONLY(tidar_emu::clear_buffers());
  EMU_ONLY(tidar_emu::register_buffer(q.data(), nq * 2));
  EMU_ONLY(tidar_emu::register_buffer(k.data(), nk * 2));
  EMU_ONLY(tidar_emu::register_buffer(v.data(), nk * 2));
  EMU_ONLY(const long races0 = tidar_emu::st().races);
  const int rc = forward_sync(p);
  EXPECT(rc == 0, "forward returned %d (%s)", rc, tidar_attention_error_string(rc));
  EMU_ONLY(EXPECT(tidar_emu::st().races == races0, "%ld shared-memory races", tidar_emu::st().races - races0));
  mout.back(); mlse.back(); mws.back();

  // reference
  double max_err = 0, max_lse_err = 0;
  int empty_rows = 0;
  const double atol = c.dtype == 0 ? 2e-3 : 1.6e-2, rtol = c.dtype == 0 ? 4e-3 : 1.6e-2;
  std::vector<char> written(nq, 0);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hq; ++h) {
      const int hk = h / G;
      for (int i = 0; i < S; ++i) {
        std::vector<double> sc(Skv, -INFINITY);
        double mx = -INFINITY;
        for (long j = 0; j < Skv; ++j) {
          if (!rule(c, b, i, j)) continue;
          double dot = 0;
          for (int d = 0; d < D; ++d)
            dot += double(to_f(q.data()[b * qs[0] + h * qs[1] + i * qs[2] + d], c.dtype)) *
                   to_f(k.data()[b * ks[0] + hk * ks[1] + j * ks[2] + d], c.dtype);
          sc[j] = dot * scale;
          if (c.softcap > 0) sc[j] = c.softcap * std::tanh(sc[j] / c.softcap);  // Gemma2: scale, cap, then mask
          mx = std::max(mx, sc[j]);
        }
        const size_t ob = b * qs[0] + h * qs[1] + i * qs[2];
        for (int d = 0; d < D; ++d) written[ob + d] = 1;
        const float got_lse = lse.data()[(size_t(b) * Hq + h) * S + i];
        if (mx == -INFINITY) {
          ++empty_rows;
          EXPECT(got_lse == -INFINITY, "%s: empty row b%d h%d i%d lse %g", c.name.c_str(), b, h, i, got_lse);
          for (int d = 0; d < D; ++d)
            EXPECT(out.data()[ob + d] == 0 || out.data()[ob + d] == 0x8000, "%s: empty row out %g", c.name.c_str(),
                   to_f(out.data()[ob + d], c.dtype));
          continue;
        }
        double den = 0;
        std::vector<double> num(D, 0.0);
        for (long j = 0; j < Skv; ++j) {
          if (sc[j] == -INFINITY) continue;
          const double w = std::exp(sc[j] - mx);
          den += w;
          for (int d = 0; d < D; ++d) num[d] += w * to_f(v.data()[b * ks[0] + hk * ks[1] + j * ks[2] + d], c.dtype);
        }
        const double ref_lse = mx + std::log(den);
        const double le = std::fabs(got_lse - ref_lse);
        max_lse_err = std::max(max_lse_err, le);
        EXPECT(le <= 1e-4 * (1 + std::fabs(ref_lse)), "%s: lse b%d h%d i%d %g want %g", c.name.c_str(), b, h, i,
               got_lse, ref_lse);
        for (int d = 0; d < D; ++d) {
          const double ref = num[d] / den;
          const float got = to_f(out.data()[ob + d], c.dtype);
          const double err = std::fabs(got - ref);
          if (!(err <= atol + rtol * std::fabs(ref)))
            EXPECT(false, "%s: out b%d h%d i%d d%d = %g want %g", c.name.c_str(), b, h, i, d, got, ref);
          max_err = std::max(max_err, std::isfinite(err) ? err : 1e30);
        }
      }
    }
  // nothing written outside the logical output
  bool stray = false;
  for (size_t i = 0; i < nq; ++i)
    if (!written[i] && out.data()[i] != kSentinel) stray = true;
  EXPECT(!stray, "%s: writes outside the logical output", c.name.c_str());
  EXPECT(out.guards_intact() && lse.guards_intact() && ws.guards_intact(), "%s: guard overwritten", c.name.c_str());

  // determinism: a second run gives the same bits
  std::vector<uint16_t> out1(out.data(), out.data() + nq);
  std::vector<float> lse1(lse.data(), lse.data() + lse.n);
  EXPECT(forward_sync(p) == 0, "second run");
  mout.back(); mlse.back();
  bool same = std::equal(out1.begin(), out1.end(), out.data()) &&
              std::memcmp(lse1.data(), lse.data(), lse.n * sizeof(float)) == 0;
  EXPECT(same, "%s: second run differs", c.name.c_str());
  std::printf("  %-38s D=%3d %s B=%d Hq=%d Hkv=%d S=%3d Skv=%4d splits=%d: max|err| %.2e, lse %.1e, %d empty rows\n",
              c.name.c_str(), D, c.dtype ? "bf16" : "fp16", B, Hq, Hkv, S, Skv, splits, max_err, max_lse_err,
              empty_rows);
}

void decode_layout(int K, std::vector<int>& ll, std::vector<int>& bid) {
  ll.clear(); bid.clear();
  for (int t = 0; t < K; ++t) { ll.push_back(t + 1); bid.push_back(-1); }
  for (int j = 1; j <= K; ++j)
    for (int s = 0; s < K; ++s) { ll.push_back(j); bid.push_back(j); }
}

void error_codes() {
  Buf16 buf(4096, 0, 0);
  int32_t ints_h[4] = {1, 1, 1, 0};
  Mirror mbuf(buf), mints(ints_h, sizeof(ints_h));
  void* al = mbuf.map(buf.data());
  int32_t* ints = mints.map(ints_h);
  TidarAttentionParams base{};
  base.q = base.k = base.v = al; base.out = al;
  base.local_limit = ints; base.block_id = ints; base.seg_start = ints + 3;
  base.B = 1; base.Hq = 2; base.Hkv = 1; base.S = 1; base.Skv = 1; base.D = 64; base.dtype = 0; base.num_sms = 132;
  base.scale = 0.125f;
  for (int64_t* st : {base.q_stride, base.o_stride}) { st[0] = 128; st[1] = 64; st[2] = 64; st[3] = 1; }
  for (int64_t* st : {base.k_stride, base.v_stride}) { st[0] = 64; st[1] = 64; st[2] = 64; st[3] = 1; }
  auto expect_code = [](TidarAttentionParams p, int code, const char* what) {
    const int rc = forward_sync(p);
    EXPECT(rc == code, "%s: got %d want %d", what, rc, code);
    EXPECT(rc == 0 || std::string(tidar_attention_error_string(rc)).size() > 16, "%s: no message", what);
  };
  EMU_ONLY(tidar_emu::clear_buffers());
  EMU_ONLY(tidar_emu::register_buffer(al, 4096 * 2));
  { auto p = base; expect_code(p, 0, "valid"); }
  { auto p = base; p.D = 96; expect_code(p, TIDAR_ATTN_ERR_BAD_HEAD_DIM, "D=96"); }
  { auto p = base; p.D = 32; expect_code(p, TIDAR_ATTN_ERR_BAD_HEAD_DIM, "D=32"); }
  { auto p = base; p.dtype = 2; expect_code(p, TIDAR_ATTN_ERR_BAD_DTYPE, "dtype 2"); }
  { auto p = base; p.Hq = 3; p.Hkv = 2; expect_code(p, TIDAR_ATTN_ERR_BAD_GQA, "Hq % Hkv"); }
  { auto p = base; p.Hkv = 0; expect_code(p, TIDAR_ATTN_ERR_BAD_GQA, "Hkv 0"); }
  { auto p = base; p.q = nullptr; expect_code(p, TIDAR_ATTN_ERR_NULL_POINTER, "q null"); }
  { auto p = base; p.seg_start = nullptr; expect_code(p, TIDAR_ATTN_ERR_NULL_POINTER, "seg_start null"); }
  { auto p = base; p.S = -1; expect_code(p, TIDAR_ATTN_ERR_BAD_SIZE, "S < 0"); }
  { auto p = base; p.Skv = -5; expect_code(p, TIDAR_ATTN_ERR_BAD_SIZE, "Skv < 0"); }
  { auto p = base; p.k_stride[3] = 2; expect_code(p, TIDAR_ATTN_ERR_BAD_STRIDE, "last stride 2"); }
  { auto p = base; p.q_stride[1] = -64; expect_code(p, TIDAR_ATTN_ERR_BAD_STRIDE, "negative stride"); }
  { auto p = base; p.q_stride[1] = 65; expect_code(p, TIDAR_ATTN_ERR_MISALIGNED, "stride 65"); }
  { auto p = base; p.q = static_cast<uint16_t*>(al) + 1; expect_code(p, TIDAR_ATTN_ERR_MISALIGNED, "q + 1"); }
  { auto p = base; p.B = 0; p.q = nullptr; expect_code(p, 0, "B = 0 is a no-op"); }
  { auto p = base; p.softcap = 30.f; expect_code(p, 0, "softcap 30"); }
  { auto p = base; p.softcap = -1.f; expect_code(p, TIDAR_ATTN_ERR_BAD_SOFTCAP, "softcap < 0"); }
  { auto p = base; p.softcap = NAN; expect_code(p, TIDAR_ATTN_ERR_BAD_SOFTCAP, "softcap NaN"); }
  { auto p = base; p.softcap = INFINITY; expect_code(p, TIDAR_ATTN_ERR_BAD_SOFTCAP, "softcap inf"); }
  { auto p = base; p.Skv = 40000; p.workspace = nullptr;
    EXPECT(tidar_attention_workspace_bytes(p) > 0, "a long cache with one row tile splits");
    expect_code(p, TIDAR_ATTN_ERR_NO_WORKSPACE, "no workspace"); }
  std::printf("  error codes checked\n");
}

}  // namespace

#if defined(TIDAR_ATTN_GPU_TEST)
void benchmark();  // test_tidar_attention_gpu.cu
#endif

int main(int argc, char** argv) {
  (void)argc; (void)argv;
  std::mt19937 rng(7);
  std::vector<Case> cases;
  {
    Case c; c.name = "decode K=4, GQA 4, ragged, split";
    c.B = 2; c.Hq = 8; c.Hkv = 2; c.D = 64; c.dtype = 0; decode_layout(4, c.ll, c.bid);
    c.S = static_cast<int>(c.ll.size()); c.seg = {700, 1000}; c.Skv = 1100;
    cases.push_back(c);
  }
  {
    Case c; c.name = "decode K=16, GQA 2, 5 row tiles";
    c.B = 1; c.Hq = 2; c.Hkv = 1; c.D = 128; c.dtype = 1; decode_layout(16, c.ll, c.bid);
    c.S = static_cast<int>(c.ll.size()); c.seg = {130}; c.Skv = 130 + c.S + 40;
    cases.push_back(c);
  }
  {
    Case c; c.name = "training L=40 K=8, BSHD q/out";
    c.B = 1; c.Hq = 3; c.Hkv = 3; c.D = 128; c.dtype = 0; c.bshd = true;
    for (int i = 0; i < 40; ++i) { c.ll.push_back(i + 1); c.bid.push_back(-1); }
    for (int i = 0; i < 40; ++i) { c.ll.push_back((i / 8) * 8); c.bid.push_back(i / 8); }
    c.S = 80; c.seg = {0}; c.Skv = 80;
    cases.push_back(c);
  }
  {
    Case c; c.name = "random + empty rows, cap > Skv, split";
    c.B = 3; c.Hq = 6; c.Hkv = 2; c.D = 64; c.dtype = 1; c.S = 37; c.Skv = 640; c.kv_cap = 700; c.num_sms = 8;
    std::uniform_int_distribution<int> lld(0, c.S), bd(-1, 3);
    for (int i = 0; i < c.S; ++i) { c.ll.push_back(lld(rng)); c.bid.push_back(bd(rng)); }
    c.ll[0] = 0; c.bid[0] = -1;  // sees nothing
    c.ll[5] = 0; c.bid[5] = 7;   // sees only keys of block 7: itself
    c.seg = {0, 300, 555};
    cases.push_back(c);
  }
  {
    Case c; c.name = "S=1 over a 2000-key prefix, split";
    c.B = 1; c.Hq = 4; c.Hkv = 1; c.D = 64; c.dtype = 0; c.S = 1; c.ll = {1}; c.bid = {-1};
    c.seg = {2000}; c.Skv = 2001; c.scale = 0.05f;
    cases.push_back(c);
  }
  {
    Case c; c.name = "decode K=2, GQA 8, D=128 split";
    c.B = 1; c.Hq = 8; c.Hkv = 1; c.D = 128; c.dtype = 1; decode_layout(2, c.ll, c.bid);
    c.S = static_cast<int>(c.ll.size()); c.seg = {1500}; c.Skv = 1500 + c.S + 70;
    cases.push_back(c);
  }
  {
    // Out-of-range layout values (the torch layer rejects them; here only memory safety and the rule as the kernel
    // reads it matter): local_limit < 0 or > S, block ids < -1, seg_start < 0 and past Skv - S.
    Case c; c.name = "wild layout values (memory safety)";
    c.B = 3; c.Hq = 4; c.Hkv = 2; c.D = 128; c.dtype = 0; c.S = 45; c.Skv = 300; c.num_sms = 4;
    std::uniform_int_distribution<int> lld(-3, c.S + 5), bd(-3, 4);
    for (int i = 0; i < c.S; ++i) { c.ll.push_back(lld(rng)); c.bid.push_back(bd(rng)); }
    c.seg = {-5, 200, 290};
    cases.push_back(c);
  }
  {
    // Logit soft-capping (Gemma2): a cap of 1.5 at scale 0.5 bends most scores, so a missing or misplaced cap
    // (after the mask, before the scale) changes the output far beyond the tolerance.
    Case c; c.name = "softcap 1.5, decode K=3, GQA 2, split";
    c.B = 2; c.Hq = 4; c.Hkv = 2; c.D = 64; c.dtype = 0; decode_layout(3, c.ll, c.bid);
    c.S = static_cast<int>(c.ll.size()); c.seg = {600, 311}; c.Skv = 620; c.num_sms = 4;
    c.scale = 0.5f; c.softcap = 1.5f;
    cases.push_back(c);
  }
  {
    Case c; c.name = "softcap 20, random + empty rows, D=128";
    c.B = 1; c.Hq = 3; c.Hkv = 1; c.D = 128; c.dtype = 1; c.S = 29; c.Skv = 90; c.softcap = 20.f; c.scale = 0.3f;
    std::uniform_int_distribution<int> lld(0, c.S), bd(-1, 3);
    for (int i = 0; i < c.S; ++i) { c.ll.push_back(lld(rng)); c.bid.push_back(bd(rng)); }
    c.ll[3] = 0; c.bid[3] = -1;  // sees nothing (seg_start 0)
    c.seg = {0};
    cases.push_back(c);
  }
  {
    Case c; c.name = "prefill n=50 K=16, GQA 8";
    c.B = 1; c.Hq = 8; c.Hkv = 1; c.D = 128; c.dtype = 0;
    for (int i = 0; i < 50; ++i) { c.ll.push_back(i + 1); c.bid.push_back(-1); }
    for (int i = 0; i < 16; ++i) { c.ll.push_back(50); c.bid.push_back(0); }
    c.S = 66; c.seg = {0}; c.Skv = 66;
    cases.push_back(c);
  }
#if defined(TIDAR_ATTN_EMULATE)
  std::printf("tidar_attention under the emulator:\n");
#else
  int dev = 0;
  cudaDeviceProp prop;
  CUDA_OK(cudaGetDevice(&dev));
  CUDA_OK(cudaGetDeviceProperties(&prop, dev));
  std::printf("tidar_attention on %s (sm_%d%d, %d SMs):\n", prop.name, prop.major, prop.minor,
              prop.multiProcessorCount);
#endif
  for (const Case& c : cases) run_case(c, rng);
  error_codes();
  EMU_ONLY(std::printf("%d collectives emulated, %ld races\n", static_cast<int>(tidar_emu::st().collectives),
                       tidar_emu::st().races));
  if (g_fail) {
    std::printf("%d FAILURES\n", g_fail);
    return 1;
  }
  std::printf("all checks passed\n");
#if defined(TIDAR_ATTN_GPU_TEST)
  if (argc > 1 && std::string(argv[1]) == "--bench") benchmark();
#endif
  return 0;
}
