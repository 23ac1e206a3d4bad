// GPU run of the tidar_attention checks (the emulator test's cases, on device memory) plus a decode-step benchmark.
//   nvcc -std=c++17 -O3 -arch=sm_90a -I csrc csrc/tests/test_tidar_attention_gpu.cu -o /tmp/tidar_attention_gpu
//   /tmp/tidar_attention_gpu            # correctness (exit 1 on a failure)
//   /tmp/tidar_attention_gpu --bench    # + timings: decode step K=16 (S=272) over 1k..32k cached keys
//   compute-sanitizer --tool memcheck /tmp/tidar_attention_gpu ; compute-sanitizer --tool racecheck ...
#define TIDAR_ATTN_GPU_TEST 1
#include "test_tidar_attention_emu.cpp"

namespace {
__global__ void fill_random_16(uint16_t* p, size_t n, uint32_t seed, int dtype) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t x = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    x ^= x >> 13; x *= 0x5bd1e995u; x ^= x >> 15;
    const float f = (static_cast<float>(x & 0xffffff) / 16777216.f - 0.5f) * 3.4f;  // ~unit variance
    uint16_t b;
    if (dtype == 0) { const __half h = __float2half_rn(f); b = *reinterpret_cast<const uint16_t*>(&h); }
    else { const __nv_bfloat16 h = __float2bfloat16_rn(f); b = *reinterpret_cast<const uint16_t*>(&h); }
    p[i] = b;
  }
}
}  // namespace

// Decode step of docs/design.md §3.3 at K=16 (S=272), B=1, Hq=32, Hkv=8, D=128, bf16, prefixes 1k..32k.
// TFLOP/s counts the visible (row, key) pairs only (4 * D flops each); GB/s counts one read of the K/V rows
// the step can see plus q/out.
void benchmark() {
  const int K = 16, S = K + K * K, B = 1, Hq = 32, Hkv = 8, D = 128, dtype = 1;
  std::vector<int> llv, bidv;
  decode_layout(K, llv, bidv);
  long seg_pairs = 0;  // visible pairs inside the segment, per head
  for (int i = 0; i < S; ++i)
    for (int j = 0; j < S; ++j) seg_pairs += (j < llv[i]) || (bidv[i] >= 0 && bidv[j] == bidv[i]);
  int32_t *ll, *bid, *seg;
  CUDA_OK(cudaMalloc(&ll, S * 4)); CUDA_OK(cudaMalloc(&bid, S * 4)); CUDA_OK(cudaMalloc(&seg, 4));
  std::vector<int32_t> llh(llv.begin(), llv.end()), bidh(bidv.begin(), bidv.end());
  CUDA_OK(cudaMemcpy(ll, llh.data(), S * 4, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(bid, bidh.data(), S * 4, cudaMemcpyHostToDevice));
  std::printf("\nbenchmark: decode step K=%d (S=%d), B=%d, Hq=%d, Hkv=%d, D=%d, bf16\n", K, S, B, Hq, Hkv, D);
  std::printf("  %8s %7s %10s %10s %10s\n", "prefix", "splits", "time_us", "TFLOP/s", "GB/s");
  for (int prefix : {1024, 4096, 8192, 16384, 32768}) {
    const int Skv = prefix + S;
    uint16_t *q, *k, *v, *out;
    float* lse;
    const size_t nq = size_t(B) * Hq * S * D, nk = size_t(B) * Hkv * Skv * D;
    CUDA_OK(cudaMalloc(&q, nq * 2)); CUDA_OK(cudaMalloc(&out, nq * 2));
    CUDA_OK(cudaMalloc(&k, nk * 2)); CUDA_OK(cudaMalloc(&v, nk * 2));
    CUDA_OK(cudaMalloc(&lse, size_t(B) * Hq * S * 4));
    fill_random_16<<<1024, 256>>>(q, nq, 1, dtype);
    fill_random_16<<<1024, 256>>>(k, nk, 2, dtype);
    fill_random_16<<<1024, 256>>>(v, nk, 3, dtype);
    CUDA_OK(cudaMemcpy(seg, &prefix, 4, cudaMemcpyHostToDevice));
    TidarAttentionParams p{};
    p.q = q; p.k = k; p.v = v; p.out = out; p.lse = lse;
    p.local_limit = ll; p.block_id = bid; p.seg_start = seg;
    const int64_t qs[4] = {int64_t(Hq) * S * D, int64_t(S) * D, D, 1}, ks[4] = {int64_t(Hkv) * Skv * D, int64_t(Skv) * D, D, 1};
    for (int i = 0; i < 4; ++i) { p.q_stride[i] = p.o_stride[i] = qs[i]; p.k_stride[i] = p.v_stride[i] = ks[i]; }
    p.B = B; p.Hq = Hq; p.Hkv = Hkv; p.S = S; p.Skv = Skv; p.D = D;
    p.scale = 1.f / std::sqrt(float(D)); p.dtype = dtype; p.num_sms = 0;
    void* ws = nullptr;
    const size_t wsb = tidar_attention_workspace_bytes(p);
    if (wsb) CUDA_OK(cudaMalloc(&ws, wsb));
    p.workspace = ws;
    for (int w = 0; w < 5; ++w)
      if (tidar_attention_forward(p, nullptr) != 0) { std::printf("launch failed\n"); std::exit(2); }
    CUDA_OK(cudaDeviceSynchronize());
    cudaEvent_t e0, e1;
    CUDA_OK(cudaEventCreate(&e0)); CUDA_OK(cudaEventCreate(&e1));
    std::vector<float> ms;
    for (int r = 0; r < 30; ++r) {
      CUDA_OK(cudaEventRecord(e0));
      for (int i = 0; i < 10; ++i) tidar_attention_forward(p, nullptr);
      CUDA_OK(cudaEventRecord(e1));
      CUDA_OK(cudaEventSynchronize(e1));
      float t;
      CUDA_OK(cudaEventElapsedTime(&t, e0, e1));
      ms.push_back(t / 10);
    }
    std::sort(ms.begin(), ms.end());
    const double t = ms[ms.size() / 2] * 1e-3;
    const double pairs = double(B) * Hq * (double(S) * prefix + seg_pairs);
    const double bytes = double(B) * Hkv * Skv * D * 2 * 2 + 2.0 * nq * 2;
    std::printf("  %8d %7d %10.1f %10.1f %10.1f\n", prefix, tidar_attention_num_splits(p), t * 1e6,
                pairs * 4 * D / t * 1e-12, bytes / t * 1e-9);
    cudaFree(q); cudaFree(k); cudaFree(v); cudaFree(out); cudaFree(lse); if (ws) cudaFree(ws);
  }
  cudaFree(ll); cudaFree(bid); cudaFree(seg);
}
