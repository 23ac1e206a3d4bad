// CPU build of csrc/rejection_sample.cu (and, with kv_append_emu.cpp, csrc/kv_append.cu) under the fiber emulator, as a shared library with a flat C API for
// tests/test_cuda_emu.py (ctypes): the real kernels, every CUDA thread a fiber, on host memory.
//   g++ -std=c++17 -O1 -shared -fPIC -DTIDAR_EMULATE -I csrc/tests/emu -I csrc/tests -I csrc \
//       csrc/tests/sampling_emu_lib.cpp csrc/tests/kv_append_emu.cpp -o libtidar_sampling_emu.so
#include "../rejection_sample.cu"

namespace {
// Self-test of the shared-memory race checker: 64 threads store to one field in the same barrier interval.
struct RaceProbe { TIDAR_SH(int) x; };
struct ProbeArgs { int unused; };
void race_probe_kernel(ProbeArgs) {
  TIDAR_SHARED(RaceProbe, sm);
  sm.x = static_cast<int>(threadIdx.x);
  __syncthreads();
}
}  // namespace

extern "C" {

int emu_rejection_sample(const void* ar, int ar_dtype, const int64_t* ar_stride, const void* blk, int blk_dtype,
                         const int64_t* blk_stride, const int64_t* drafts, const int64_t* drafts_stride,
                         const float* q, const int64_t* q_stride, const float* uniforms, const int64_t* u_stride,
                         const int64_t* seed_ptr, const int64_t* offset_ptr, int64_t seed, int64_t offset,
                         int64_t* accepted, int64_t* emitted, int64_t* next_drafts, float* next_probs,
                         double* workspace, int64_t workspace_bytes, const double* thr_target,
                         const double* thr_slots, int B, int K,
                         int64_t V, double temperature, double beta) {
  TidarRejectionParams p{};
  p.ar = ar; p.ar_dtype = ar_dtype;
  for (int i = 0; i < 3; ++i) p.ar_stride[i] = ar_stride[i];
  p.blk = blk; p.blk_dtype = blk_dtype;
  for (int i = 0; i < 4; ++i) p.blk_stride[i] = blk_stride[i];
  p.drafts = drafts; p.drafts_stride[0] = drafts_stride[0]; p.drafts_stride[1] = drafts_stride[1];
  p.draft_probs = q;
  if (q) for (int i = 0; i < 3; ++i) p.q_stride[i] = q_stride[i];
  p.rng.uniforms = uniforms;
  if (uniforms) { p.rng.u_stride[0] = u_stride[0]; p.rng.u_stride[1] = u_stride[1]; }
  p.rng.seed_ptr = seed_ptr; p.rng.offset_ptr = offset_ptr; p.rng.seed = seed; p.rng.offset = offset;
  p.accepted = accepted; p.emitted = emitted; p.next_drafts = next_drafts; p.next_probs = next_probs;
  p.workspace = workspace; p.workspace_bytes = static_cast<size_t>(workspace_bytes);
  p.thr_target = thr_target; p.thr_slots = thr_slots;
  p.B = B; p.K = K; p.V = V; p.temperature = temperature; p.beta = beta;
  return tidar_rejection_sample(p, nullptr);
}

int emu_draft_sample(const void* ar, int ar_dtype, const int64_t* ar_stride, const void* blk, int blk_dtype,
                     const int64_t* blk_stride, const float* uniforms, const int64_t* u_stride, int64_t seed,
                     int64_t offset, int64_t* next_drafts, float* next_probs, const double* thr_target,
                     const double* thr_slots, int B, int K, int64_t V, double temperature, double beta) {
  TidarDraftParams p{};
  p.ar = ar; p.ar_dtype = ar_dtype; p.ar_stride[0] = ar_stride[0]; p.ar_stride[1] = ar_stride[1];
  p.blk = blk; p.blk_dtype = blk_dtype;
  for (int i = 0; i < 3; ++i) p.blk_stride[i] = blk_stride[i];
  p.rng.uniforms = uniforms;
  if (uniforms) { p.rng.u_stride[0] = u_stride[0]; p.rng.u_stride[1] = u_stride[1]; }
  p.rng.seed = seed; p.rng.offset = offset;
  p.next_drafts = next_drafts; p.next_probs = next_probs; p.thr_target = thr_target; p.thr_slots = thr_slots;
  p.B = B; p.K = K; p.V = V; p.temperature = temperature; p.beta = beta;
  return tidar_draft_sample(p, nullptr);
}

// Workspace bytes and path of a [B, K, V] step (TIDAR_CUDA_VOCAB_PARALLEL / TIDAR_CUDA_VOCAB_CHUNK apply).
int64_t emu_rejection_workspace_bytes(int B, int K, int64_t V) {
  return static_cast<int64_t>(tidar_rejection_workspace_bytes_v(B, K, V));
}
int emu_rejection_uses_vocab_parallel(int B, int K, int64_t V) { return tidar_rejection_uses_vocab_parallel(B, K, V); }

// Shared-memory races the checker counted since the last call (then reset).
long emu_sampling_races() {
  const long n = tidar_emu::st().races;
  tidar_emu::st().races = 0;
  return n;
}

long emu_race_selftest() {
  tidar_emu::st().races = 0;
  TIDAR_LAUNCH(race_probe_kernel, 1, 64, nullptr, ProbeArgs{0});
  return emu_sampling_races();
}

float emu_philox_uniform(int64_t seed, int64_t offset, int64_t b, int64_t j, int64_t K) {
  return tidar_philox_uniform_host(seed, offset, b, j, K);
}

}  // extern "C"
