// tidar_bench: standalone check + timing of the csrc/ kernels on random data, no torch (built by CMakeLists.txt).
//
//   tidar_bench            kv_append (bit-exact vs a host copy), rejection/draft sampling (invariants, determinism,
//                          Philox device == host), attention (finite output, determinism); CUDA-event timings.
//   Without a GPU it prints that there is none and exits 0. Exit status 1 on any failed check.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "kv_append.h"
#include "rejection_sample.h"
#ifdef TIDAR_HAVE_ATTENTION
#include "tidar_attention.h"
#endif

static int g_fail = 0;
#define CHECK(cond, ...)                      \
  do {                                        \
    if (!(cond)) {                            \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
      std::printf(__VA_ARGS__);               \
      std::printf("\n");                      \
      ++g_fail;                               \
    }                                         \
  } while (0)
#define CUDA_OK(expr)                                                                  \
  do {                                                                                 \
    cudaError_t e_ = (expr);                                                           \
    if (e_ != cudaSuccess) {                                                           \
      std::printf("CUDA error %s at %s:%d: %s\n", cudaGetErrorString(e_), __FILE__, __LINE__, #expr); \
      return 1;                                                                        \
    }                                                                                  \
  } while (0)

template <typename T>
struct DevBuf {
  T* p = nullptr;
  size_t n = 0;
  explicit DevBuf(size_t count) : n(count) { cudaMalloc(&p, count * sizeof(T) + 16); }
  ~DevBuf() { cudaFree(p); }
  void upload(const std::vector<T>& h) { cudaMemcpy(p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice); }
  std::vector<T> download() const {
    std::vector<T> h(n);
    cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost);
    return h;
  }
};

static void contiguous_strides(const int64_t* shape, int64_t* st) {
  st[3] = 1;
  for (int i = 2; i >= 0; --i) st[i] = st[i + 1] * shape[i + 1];
}

template <typename F>
static float time_ms(F&& fn, int iters, cudaStream_t s) {
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  fn();
  cudaEventRecord(a, s);
  for (int i = 0; i < iters; ++i) fn();
  cudaEventRecord(b, s);
  cudaEventSynchronize(b);
  float ms = 0;
  cudaEventElapsedTime(&ms, a, b);
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return ms / iters;
}

static int bench_kv_append(cudaStream_t s) {
  const int64_t B = 3, H = 8, Smax = 1000, D = 128, S = 113;
  const int64_t cshape[4] = {B, H, Smax, D}, nshape[4] = {B, H, S, D};
  std::mt19937 rng(1);
  std::vector<uint16_t> kc(B * H * Smax * D), kn(B * H * S * D);
  for (auto& x : kc) x = static_cast<uint16_t>(rng());
  for (auto& x : kn) x = static_cast<uint16_t>(rng());
  std::vector<int32_t> seg = {0, static_cast<int32_t>(Smax - S), 400};
  DevBuf<uint16_t> dkc(kc.size()), dvc(kc.size()), dkn(kn.size()), dvn(kn.size());
  DevBuf<int32_t> dseg(B);
  dkc.upload(kc); dvc.upload(kc); dkn.upload(kn); dvn.upload(kn); dseg.upload(seg);
  TidarKvAppendParams p{};
  p.k_cache = dkc.p; p.v_cache = dvc.p; p.k_new = dkn.p; p.v_new = dvn.p; p.seg_start = dseg.p;
  contiguous_strides(cshape, p.kc_stride);
  contiguous_strides(cshape, p.vc_stride);
  contiguous_strides(nshape, p.kn_stride);
  contiguous_strides(nshape, p.vn_stride);
  p.B = B; p.H = H; p.S = S; p.D = D; p.Smax = Smax; p.elem_size = 2;
  int st = tidar_kv_append(p, s);
  CHECK(st == 0, "kv_append: %s", tidar_kv_append_error_string(st));
  CUDA_OK(cudaStreamSynchronize(s));
  std::vector<uint16_t> want = kc;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < S; ++t)
        std::memcpy(&want[((b * H + h) * Smax + seg[b] + t) * D], &kn[((b * H + h) * S + t) * D], D * 2);
  CHECK(dkc.download() == want && dvc.download() == want, "kv_append: cache differs from the host copy");
  const float ms = time_ms([&] { tidar_kv_append(p, s); }, 50, s);
  std::printf("kv_append      B=%lld H=%lld S=%lld D=%lld fp16: %.4f ms (%.1f GB/s)\n", (long long)B, (long long)H,
              (long long)S, (long long)D, ms, 4.0 * B * H * S * D * 2 / (ms * 1e6));
  return 0;
}

static int bench_sampling(cudaStream_t s) {
  const int B = 4, K = 16;
  const int64_t V = 32000;
  std::mt19937 rng(2);
  std::normal_distribution<float> nd(0.f, 2.f);
  std::vector<float> ar(static_cast<size_t>(B) * K * V), blk(static_cast<size_t>(B) * K * K * V);
  for (auto& x : ar) x = nd(rng);
  for (auto& x : blk) x = nd(rng);
  std::vector<float> q(static_cast<size_t>(B) * (K - 1) * V, 1.0f / V);
  std::vector<int64_t> drafts(B * K);
  for (auto& d : drafts) d = rng() % V;
  DevBuf<float> dar(ar.size()), dblk(blk.size()), dq(q.size()), dnp(q.size()), du(B * 2 * K);
  DevBuf<int64_t> ddr(drafts.size()), dacc(B), demit(B * K), dnext(B * K), dnext2(B * K);
  DevBuf<double> ws(static_cast<size_t>(B) * K * 4);
  dar.upload(ar); dblk.upload(blk); dq.upload(q); ddr.upload(drafts);
  std::vector<float> u(B * 2 * K);
  for (int b = 0; b < B; ++b)
    for (int j = 0; j < 2 * K; ++j) u[b * 2 * K + j] = tidar_philox_uniform_host(7, 100, b, j, K);
  du.upload(u);
  TidarRejectionParams p{};
  p.ar = dar.p; p.ar_dtype = 2; p.ar_stride[0] = K * V; p.ar_stride[1] = V; p.ar_stride[2] = 1;
  p.blk = dblk.p; p.blk_dtype = 2;
  p.blk_stride[0] = static_cast<int64_t>(K) * K * V; p.blk_stride[1] = K * V; p.blk_stride[2] = V; p.blk_stride[3] = 1;
  p.drafts = ddr.p; p.drafts_stride[0] = K; p.drafts_stride[1] = 1;
  p.draft_probs = dq.p; p.q_stride[0] = (K - 1) * V; p.q_stride[1] = V; p.q_stride[2] = 1;
  p.rng.seed = 7; p.rng.offset = 100;  // in-kernel Philox
  p.accepted = dacc.p; p.emitted = demit.p; p.next_drafts = dnext.p; p.next_probs = dnp.p; p.workspace = ws.p;
  p.B = B; p.K = K; p.V = V; p.temperature = 1.0; p.beta = 1.0;
  int st = tidar_rejection_sample(p, s);
  CHECK(st == 0, "rejection_sample: %s", tidar_rejection_error_string(st));
  CUDA_OK(cudaStreamSynchronize(s));
  auto acc = dacc.download(), emit = demit.download(), next = dnext.download();
  for (int b = 0; b < B; ++b) {
    CHECK(acc[b] >= 1 && acc[b] <= K, "accepted[%d] = %lld", b, (long long)acc[b]);
    for (int k = 0; k < K; ++k) {
      CHECK(next[b * K + k] >= 0 && next[b * K + k] < V, "next_drafts out of range");
      CHECK(emit[b * K + k] == (k < acc[b] ? drafts[b * K + k] : -1), "emitted[%d, %d]", b, k);
    }
  }
  auto probs = dnp.download();
  for (int r = 0; r < B * (K - 1); ++r) {
    double sum = 0;
    for (int64_t v = 0; v < V; ++v) sum += probs[r * V + v];
    CHECK(sum > 0.999 && sum < 1.001, "next_probs row %d sums to %f", r, sum);
  }
  // the same uniforms given explicitly: identical tokens (device Philox == host Philox)
  TidarRejectionParams p2 = p;
  p2.rng.uniforms = du.p; p2.rng.u_stride[0] = 2 * K; p2.rng.u_stride[1] = 1;
  p2.next_drafts = dnext2.p;
  st = tidar_rejection_sample(p2, s);
  CHECK(st == 0, "rejection_sample (uniforms): %s", tidar_rejection_error_string(st));
  CUDA_OK(cudaStreamSynchronize(s));
  CHECK(dnext2.download() == next, "Philox in-kernel != the same uniforms given explicitly");
  const float ms = time_ms([&] { tidar_rejection_sample(p, s); }, 20, s);
  p.temperature = 0.0;
  const float ms_g = time_ms([&] { tidar_rejection_sample(p, s); }, 20, s);
  std::printf("rejection      B=%d K=%d V=%lld fp32: sampling %.4f ms, greedy %.4f ms\n", B, K, (long long)V, ms, ms_g);

  TidarDraftParams dp{};
  dp.ar = dar.p; dp.ar_dtype = 2; dp.ar_stride[0] = K * V; dp.ar_stride[1] = 1;
  dp.blk = dblk.p; dp.blk_dtype = 2; dp.blk_stride[0] = static_cast<int64_t>(K) * K * V; dp.blk_stride[1] = V;
  dp.blk_stride[2] = 1;
  dp.rng.seed = 3; dp.next_drafts = dnext.p; dp.next_probs = dnp.p;
  dp.B = B; dp.K = K; dp.V = V; dp.temperature = 0.8; dp.beta = 0.5;
  st = tidar_draft_sample(dp, s);
  CHECK(st == 0, "draft_sample: %s", tidar_rejection_error_string(st));
  CUDA_OK(cudaStreamSynchronize(s));
  return 0;
}

#ifdef TIDAR_HAVE_ATTENTION
static int bench_attention(cudaStream_t s, int num_sms) {
  const int B = 1, Hq = 32, Hkv = 8, K = 16, S = K + K * K, D = 128, prefix = 8192, Skv = prefix + S;
  std::vector<int32_t> ll, bid;
  for (int t = 0; t < K; ++t) { ll.push_back(t + 1); bid.push_back(-1); }
  for (int j = 1; j <= K; ++j)
    for (int t = 0; t < K; ++t) { ll.push_back(j); bid.push_back(j); }
  std::vector<int32_t> seg = {prefix};
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<__half> hq(static_cast<size_t>(B) * Hq * S * D), hk(static_cast<size_t>(B) * Hkv * Skv * D);
  for (auto& x : hq) x = __float2half(nd(rng));
  for (auto& x : hk) x = __float2half(nd(rng));
  DevBuf<__half> dq(hq.size()), dk(hk.size()), dv(hk.size()), dout(hq.size()), dout2(hq.size());
  DevBuf<float> dlse(static_cast<size_t>(B) * Hq * S);
  DevBuf<int32_t> dll(S), dbid(S), dseg(B);
  dq.upload(hq); dk.upload(hk); dv.upload(hk); dll.upload(ll); dbid.upload(bid); dseg.upload(seg);
  TidarAttentionParams p{};
  p.q = dq.p; p.k = dk.p; p.v = dv.p; p.out = dout.p; p.lse = dlse.p;
  p.local_limit = dll.p; p.block_id = dbid.p; p.seg_start = dseg.p;
  const int64_t qs[4] = {B, Hq, S, D}, ks[4] = {B, Hkv, Skv, D};
  contiguous_strides(qs, p.q_stride);
  contiguous_strides(ks, p.k_stride);
  contiguous_strides(ks, p.v_stride);
  contiguous_strides(qs, p.o_stride);
  p.B = B; p.Hq = Hq; p.Hkv = Hkv; p.S = S; p.Skv = Skv; p.D = D; p.scale = 1.0f / sqrtf(static_cast<float>(D));
  p.dtype = 0; p.num_sms = num_sms;
  const size_t wsb = tidar_attention_workspace_bytes(p);
  DevBuf<char> ws(wsb > 0 ? wsb : 1);
  p.workspace = ws.p;
  int st = tidar_attention_forward(p, s);
  CHECK(st == 0, "tidar_attention: %s", tidar_attention_error_string(st));
  CUDA_OK(cudaStreamSynchronize(s));
  auto out = dout.download();
  bool finite = true;
  for (auto x : out) finite = finite && std::isfinite(__half2float(x));
  CHECK(finite, "tidar_attention: non-finite output");
  TidarAttentionParams p2 = p;
  p2.out = dout2.p;
  tidar_attention_forward(p2, s);
  CUDA_OK(cudaStreamSynchronize(s));
  auto out2 = dout2.download();
  CHECK(std::memcmp(out.data(), out2.data(), out.size() * sizeof(__half)) == 0, "tidar_attention: not deterministic");
  const float ms = time_ms([&] { tidar_attention_forward(p, s); }, 20, s);
  std::printf("tidar_attention decode K=%d prefix=%d Hq=%d Hkv=%d D=%d fp16: %.4f ms\n", K, prefix, Hq, Hkv, D, ms);
  return 0;
}
#endif

int main() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    std::printf("tidar_bench: no CUDA GPU visible; nothing to run (the kernels compiled)\n");
    return 0;
  }
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  std::printf("tidar_bench on %s (sm_%d%d, %d SMs)\n", prop.name, prop.major, prop.minor, prop.multiProcessorCount);
  cudaStream_t s;
  CUDA_OK(cudaStreamCreate(&s));
  if (bench_kv_append(s)) return 1;
  if (bench_sampling(s)) return 1;
#ifdef TIDAR_HAVE_ATTENTION
  if (bench_attention(s, prop.multiProcessorCount)) return 1;
#else
  std::printf("tidar_attention: not in this build (csrc/tidar_attention.cu missing)\n");
#endif
  cudaStreamDestroy(s);
  std::printf(g_fail ? "tidar_bench: %d check(s) FAILED\n" : "tidar_bench: all checks passed\n", g_fail);
  return g_fail ? 1 : 0;
}
