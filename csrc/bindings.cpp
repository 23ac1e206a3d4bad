// bindings.cpp: the one file that sees torch. Registers the CUDA ops of tidar_kernels with the libtorch
// stable ABI (torch/csrc/stable, STABLE_TORCH_LIBRARY), so one build keeps loading on later torch releases,
// and the ops are dispatcher ops torch.compile can see (fake impls live in tidar_kernels/cuda/__init__.py).
//
// Every op: validates devices, dtypes, shapes and strides with errors naming the argument (before any launch),
// sets the device (DeviceGuard), launches on the current CUDA stream, and turns a kernel status into an error.
//
//   torch.ops.tidar_cuda.kv_append(k_cache!, v_cache!, k_new, v_new, seg_start) -> ()
//   torch.ops.tidar_cuda.rejection_sample(ar_logits, block_logits, drafts, draft_probs?, uniforms?, seed?, offset?,
//                                         seed_value, offset_value, temperature, beta, thr_target?, thr_slots?)
//       -> (accepted, emitted, next_drafts, next_probs)      next_probs is [0] when greedy
//   torch.ops.tidar_cuda.draft_sample(ar_logits, block_logits, uniforms?, seed?, offset?, seed_value, offset_value,
//                                     temperature, beta, thr_target?, thr_slots?) -> (next_drafts, next_probs)
//   torch.ops.tidar_cuda.tidar_attention(q, k, v, local_limit, block_id, seg_start, scale, softcap=0.) -> (out, lse)
//   torch.ops.tidar_cuda.philox_uniform(seed, offset, b, j, draft_len) -> float   (host; tests the stream)
#include <Python.h>

#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <cuda_runtime_api.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "kv_append.h"
#include "rejection_sample.h"
#if __has_include("tidar_attention.h")
#include "tidar_attention.h"
#define TIDAR_HAVE_ATTENTION 1
#else
#define TIDAR_HAVE_ATTENTION 0
#endif

// From the AOTI C shim (stable C ABI, libtorch_cuda); declared here so the build needs no USE_CUDA define.
extern "C" int32_t aoti_torch_get_current_cuda_stream(int32_t device_index, void** ret_stream);

// `import tidar_kernels._C` loads this library (and so runs the registrations below).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "tidar_kernels CUDA ops (torch.ops.tidar_cuda)",
                                          -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}

namespace {

using torch::stable::Tensor;
using ST = torch::headeronly::ScalarType;

const char* dtype_name(ST t) {
  switch (t) {
    case ST::Half: return "float16";
    case ST::BFloat16: return "bfloat16";
    case ST::Float: return "float32";
    case ST::Double: return "float64";
    case ST::Int: return "int32";
    case ST::Long: return "int64";
    case ST::Bool: return "bool";
    default: return "another dtype";
  }
}

std::string device_str(const Tensor& t) {
  if (t.is_cuda()) return "cuda:" + std::to_string(t.get_device_index());
  if (t.is_cpu()) return "cpu";
  return "a non-CUDA device";
}

std::string shape_str(const Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + (t.dim() == 1 ? ",)" : ")");
}

// First tensor of an op fixes the device; every other one must be a CUDA tensor on the same device.
void check_cuda(const char* op, const char* name, const Tensor& t, int32_t device) {
  STD_TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got a tensor on ", device_str(t),
                  " (backend='cuda' runs on CUDA tensors only)");
  STD_TORCH_CHECK(device < 0 || t.get_device_index() == device, op, ": ", name, " must be on cuda:", device,
                  " like the other inputs, got ", device_str(t));
}

void check_dim(const char* op, const char* name, const Tensor& t, int64_t ndim) {
  STD_TORCH_CHECK(t.dim() == ndim, op, ": ", name, " must be ", ndim, "-D, got shape ", shape_str(t));
}

void check_shape(const char* op, const char* name, const Tensor& t, std::vector<int64_t> expected) {
  bool ok = t.dim() == static_cast<int64_t>(expected.size());
  for (size_t i = 0; ok && i < expected.size(); ++i) ok = t.size(static_cast<int64_t>(i)) == expected[i];
  std::string e = "(";
  for (size_t i = 0; i < expected.size(); ++i) e += (i ? ", " : "") + std::to_string(expected[i]);
  e += expected.size() == 1 ? ",)" : ")";
  STD_TORCH_CHECK(ok, op, ": ", name, " must have shape ", e, ", got ", shape_str(t));
}

int logit_code(const char* op, const char* name, const Tensor& t) {
  switch (t.scalar_type()) {
    case ST::Half: return 0;
    case ST::BFloat16: return 1;
    case ST::Float: return 2;
    case ST::Double: return 3;
    default: break;
  }
  STD_TORCH_CHECK(false, op, ": ", name, " must have dtype in (float16, bfloat16, float32, float64), got ",
                  dtype_name(t.scalar_type()));
  return -1;
}

void check_dtype(const char* op, const char* name, const Tensor& t, ST want) {
  STD_TORCH_CHECK(t.scalar_type() == want, op, ": ", name, " must have dtype ", dtype_name(want), ", got ",
                  dtype_name(t.scalar_type()));
}

cudaStream_t current_stream(int32_t device) {
  void* s = nullptr;
  STD_TORCH_CHECK(aoti_torch_get_current_cuda_stream(device, &s) == 0, "tidar_cuda: cannot get the current CUDA stream");
  return static_cast<cudaStream_t>(s);
}

void check_status(const char* op, int code, const char* what) {
  STD_TORCH_CHECK(code == 0, op, ": kernel launch failed (code ", code, "): ", what);
}

template <size_t N>
void strides_of(const Tensor& t, int64_t (&out)[N]) {
  for (size_t i = 0; i < N; ++i) out[i] = t.stride(static_cast<int64_t>(i));
}

// A tensor written by a kernel must not overlap itself: no zero stride on a dim longer than 1.
void check_writable(const char* op, const char* name, const Tensor& t) {
  for (int64_t i = 0; i < t.dim(); ++i)
    STD_TORCH_CHECK(t.size(i) <= 1 || t.stride(i) != 0, op, ": ", name,
                    " is an expanded (stride 0) view; it is written in place and needs its own memory");
}

// ---------------------------------------------------------------------------------------------
// kv_append
// ---------------------------------------------------------------------------------------------
// Returns std::tuple<> (the schema's "-> ()"): boxed by TORCH_BOX's multiple-returns path, which every stable-ABI
// release has (a plain void return needs a newer boxer).
std::tuple<> kv_append(Tensor k_cache, Tensor v_cache, Tensor k_new, Tensor v_new, Tensor seg_start) {
  const char* op = "tidar_cuda::kv_append";
  check_cuda(op, "k_cache", k_cache, -1);
  const int32_t dev = k_cache.get_device_index();
  check_cuda(op, "v_cache", v_cache, dev);
  check_cuda(op, "k_new", k_new, dev);
  check_cuda(op, "v_new", v_new, dev);
  check_cuda(op, "seg_start", seg_start, dev);
  check_dim(op, "k_cache", k_cache, 4);
  const int64_t B = k_cache.size(0), H = k_cache.size(1), Smax = k_cache.size(2), D = k_cache.size(3);
  check_shape(op, "v_cache", v_cache, {B, H, Smax, D});
  check_dim(op, "k_new", k_new, 4);
  const int64_t S = k_new.size(2);
  check_shape(op, "k_new", k_new, {B, H, S, D});
  check_shape(op, "v_new", v_new, {B, H, S, D});
  const ST dt = k_cache.scalar_type();
  check_dtype(op, "v_cache", v_cache, dt);
  check_dtype(op, "k_new", k_new, dt);
  check_dtype(op, "v_new", v_new, dt);
  check_dtype(op, "seg_start", seg_start, ST::Int);
  check_shape(op, "seg_start", seg_start, {B});
  STD_TORCH_CHECK(B <= 1 || seg_start.stride(0) == 1, op, ": seg_start must be contiguous");
  STD_TORCH_CHECK(S <= Smax, op, ": kv cache overflow: the segment has ", S, " tokens, the cache ", Smax, " slots");
  check_writable(op, "k_cache", k_cache);
  check_writable(op, "v_cache", v_cache);
  // Row bounds (0 <= seg_start[b], seg_start[b] + S <= Smax) are checked by the Python layer on the host before
  // this call; the kernel re-checks each row on the device and skips rows that would leave the cache.
  TidarKvAppendParams p{};
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.k_new = k_new.data_ptr();
  p.v_new = v_new.data_ptr();
  p.seg_start = static_cast<const int32_t*>(seg_start.data_ptr());
  strides_of(k_cache, p.kc_stride);
  strides_of(v_cache, p.vc_stride);
  strides_of(k_new, p.kn_stride);
  strides_of(v_new, p.vn_stride);
  p.B = B; p.H = H; p.S = S; p.D = D; p.Smax = Smax;
  p.elem_size = static_cast<int>(k_cache.element_size());
  if (B == 0 || H == 0 || S == 0 || D == 0) return {};
  torch::stable::accelerator::DeviceGuard guard(dev);
  const int st = tidar_kv_append(p, current_stream(dev));
  check_status(op, st, tidar_kv_append_error_string(st));
  return {};
}

// ---------------------------------------------------------------------------------------------
// rejection_sample / draft_sample
// ---------------------------------------------------------------------------------------------
TidarRandomness randomness(const char* op, int32_t dev, int64_t B, int64_t K, bool greedy,
                           const std::optional<Tensor>& uniforms, const std::optional<Tensor>& seed,
                           const std::optional<Tensor>& offset, int64_t seed_value, int64_t offset_value) {
  TidarRandomness g{};
  g.seed = seed_value;
  g.offset = offset_value;
  if (greedy) return g;
  if (uniforms.has_value()) {
    const Tensor& u = *uniforms;
    check_cuda(op, "uniforms", u, dev);
    check_dtype(op, "uniforms", u, ST::Float);
    check_shape(op, "uniforms", u, {B, 2 * K});
    g.uniforms = static_cast<const float*>(u.data_ptr());
    g.u_stride[0] = u.stride(0);
    g.u_stride[1] = u.stride(1);
    return g;
  }
  if (seed.has_value()) {
    check_cuda(op, "seed", *seed, dev);
    check_dtype(op, "seed", *seed, ST::Long);
    STD_TORCH_CHECK(seed->numel() == 1, op, ": seed must have one element, got shape ", shape_str(*seed));
    g.seed_ptr = static_cast<const int64_t*>(seed->data_ptr());
  }
  if (offset.has_value()) {
    check_cuda(op, "offset", *offset, dev);
    check_dtype(op, "offset", *offset, ST::Long);
    STD_TORCH_CHECK(offset->numel() == 1, op, ": offset must have one element, got shape ", shape_str(*offset));
    g.offset_ptr = static_cast<const int64_t*>(offset->data_ptr());
  }
  return g;
}

// Optional per-row top-k/top-p thresholds: contiguous float64 of the given shape on the op's device.
const double* thresholds(const char* op, const char* name, const std::optional<Tensor>& t, int32_t dev,
                         std::vector<int64_t> shape) {
  if (!t.has_value()) return nullptr;
  check_cuda(op, name, *t, dev);
  check_dtype(op, name, *t, ST::Double);
  check_shape(op, name, *t, shape);
  STD_TORCH_CHECK(t->is_contiguous(), op, ": ", name, " must be contiguous");
  return static_cast<const double*>(t->data_ptr());
}

void check_sampling(const char* op, double temperature, double beta) {
  STD_TORCH_CHECK(temperature >= 0.0, op, ": temperature must be >= 0 (0 = greedy), got ", temperature);
  STD_TORCH_CHECK(beta >= 0.0 && beta <= 1.0, op, ": beta must be in [0, 1], got ", beta);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> rejection_sample(Tensor ar_logits, Tensor block_logits, Tensor drafts,
                                                            std::optional<Tensor> draft_probs,
                                                            std::optional<Tensor> uniforms, std::optional<Tensor> seed,
                                                            std::optional<Tensor> offset, int64_t seed_value,
                                                            int64_t offset_value, double temperature, double beta,
                                                            std::optional<Tensor> thr_target,
                                                            std::optional<Tensor> thr_slots) {
  const char* op = "tidar_cuda::rejection_sample";
  check_cuda(op, "ar_logits", ar_logits, -1);
  const int32_t dev = ar_logits.get_device_index();
  check_cuda(op, "block_logits", block_logits, dev);
  check_cuda(op, "drafts", drafts, dev);
  check_dim(op, "ar_logits", ar_logits, 3);
  const int64_t B = ar_logits.size(0), K = ar_logits.size(1), V = ar_logits.size(2);
  STD_TORCH_CHECK(K >= 1 && V >= 1, op, ": ar_logits must be [B, K >= 1, V >= 1], got ", shape_str(ar_logits));
  STD_TORCH_CHECK(V <= INT32_MAX && B * K <= INT32_MAX, op, ": ar_logits is too large, got ", shape_str(ar_logits));
  check_shape(op, "block_logits", block_logits, {B, K, K, V});
  check_shape(op, "drafts", drafts, {B, K});
  check_dtype(op, "drafts", drafts, ST::Long);
  const int ar_code = logit_code(op, "ar_logits", ar_logits);
  const int blk_code = logit_code(op, "block_logits", block_logits);
  check_sampling(op, temperature, beta);
  const bool greedy = temperature == 0.0;
  TidarRejectionParams p{};
  if (!greedy && K > 1) {
    STD_TORCH_CHECK(draft_probs.has_value(), op, ": draft_probs [B, K-1, V] is required when temperature > 0");
    check_cuda(op, "draft_probs", *draft_probs, dev);
    check_dtype(op, "draft_probs", *draft_probs, ST::Float);
    check_shape(op, "draft_probs", *draft_probs, {B, K - 1, V});
    p.draft_probs = static_cast<const float*>(draft_probs->data_ptr());
    strides_of(*draft_probs, p.q_stride);
  }
  p.rng = randomness(op, dev, B, K, greedy, uniforms, seed, offset, seed_value, offset_value);
  if (!greedy) {
    p.thr_target = thresholds(op, "thr_target", thr_target, dev, {B, K});
    p.thr_slots = thresholds(op, "thr_slots", thr_slots, dev, {B, K, K});
  }
  Tensor accepted = torch::stable::new_empty(ar_logits, {B}, ST::Long);
  Tensor emitted = torch::stable::new_empty(ar_logits, {B, K}, ST::Long);
  Tensor next_drafts = torch::stable::new_empty(ar_logits, {B, K}, ST::Long);
  Tensor next_probs = greedy ? torch::stable::new_empty(ar_logits, {int64_t{0}}, ST::Float)
                             : torch::stable::new_empty(ar_logits, {B, K - 1, V}, ST::Float);
  if (B == 0) return {accepted, emitted, next_drafts, next_probs};
  torch::stable::accelerator::DeviceGuard guard(dev);  // the workspace size depends on the device's path choice
  const size_t ws_bytes = tidar_rejection_workspace_bytes_v(static_cast<int>(B), static_cast<int>(K), V);
  Tensor workspace = torch::stable::new_empty(ar_logits, {static_cast<int64_t>(ws_bytes / sizeof(double))}, ST::Double);
  p.workspace_bytes = ws_bytes;
  p.ar = ar_logits.data_ptr();
  p.ar_dtype = ar_code;
  strides_of(ar_logits, p.ar_stride);
  p.blk = block_logits.data_ptr();
  p.blk_dtype = blk_code;
  strides_of(block_logits, p.blk_stride);
  p.drafts = static_cast<const int64_t*>(drafts.data_ptr());
  strides_of(drafts, p.drafts_stride);
  p.accepted = static_cast<int64_t*>(accepted.data_ptr());
  p.emitted = static_cast<int64_t*>(emitted.data_ptr());
  p.next_drafts = static_cast<int64_t*>(next_drafts.data_ptr());
  p.next_probs = greedy || K == 1 ? nullptr : static_cast<float*>(next_probs.data_ptr());
  p.workspace = static_cast<double*>(workspace.data_ptr());
  p.B = static_cast<int>(B);
  p.K = static_cast<int>(K);
  p.V = V;
  p.temperature = temperature;
  p.beta = beta;
  const int st = tidar_rejection_sample(p, current_stream(dev));
  check_status(op, st, tidar_rejection_error_string(st));
  return {accepted, emitted, next_drafts, next_probs};
}

std::tuple<Tensor, Tensor> draft_sample(Tensor ar_logits, Tensor block_logits, std::optional<Tensor> uniforms,
                                        std::optional<Tensor> seed, std::optional<Tensor> offset, int64_t seed_value,
                                        int64_t offset_value, double temperature, double beta,
                                        std::optional<Tensor> thr_target, std::optional<Tensor> thr_slots) {
  const char* op = "tidar_cuda::draft_sample";
  check_cuda(op, "ar_logits", ar_logits, -1);
  const int32_t dev = ar_logits.get_device_index();
  check_cuda(op, "block_logits", block_logits, dev);
  check_dim(op, "ar_logits", ar_logits, 2);
  check_dim(op, "block_logits", block_logits, 3);
  const int64_t B = ar_logits.size(0), V = ar_logits.size(1), K = block_logits.size(1);
  STD_TORCH_CHECK(K >= 1 && V >= 1, op, ": block_logits must be [B, K >= 1, V >= 1], got ", shape_str(block_logits));
  STD_TORCH_CHECK(V <= INT32_MAX && B * K <= INT32_MAX, op, ": block_logits is too large, got ",
                  shape_str(block_logits));
  check_shape(op, "block_logits", block_logits, {B, K, V});
  const int ar_code = logit_code(op, "ar_logits", ar_logits);
  const int blk_code = logit_code(op, "block_logits", block_logits);
  check_sampling(op, temperature, beta);
  const bool greedy = temperature == 0.0;
  TidarDraftParams p{};
  p.rng = randomness(op, dev, B, K, greedy, uniforms, seed, offset, seed_value, offset_value);
  if (!greedy) {
    p.thr_target = thresholds(op, "thr_target", thr_target, dev, {B});
    p.thr_slots = thresholds(op, "thr_slots", thr_slots, dev, {B, K});
  }
  Tensor next_drafts = torch::stable::new_empty(ar_logits, {B, K}, ST::Long);
  Tensor next_probs = greedy ? torch::stable::new_empty(ar_logits, {int64_t{0}}, ST::Float)
                             : torch::stable::new_empty(ar_logits, {B, K - 1, V}, ST::Float);
  if (B == 0) return {next_drafts, next_probs};
  p.ar = ar_logits.data_ptr();
  p.ar_dtype = ar_code;
  strides_of(ar_logits, p.ar_stride);
  p.blk = block_logits.data_ptr();
  p.blk_dtype = blk_code;
  strides_of(block_logits, p.blk_stride);
  p.next_drafts = static_cast<int64_t*>(next_drafts.data_ptr());
  p.next_probs = greedy || K == 1 ? nullptr : static_cast<float*>(next_probs.data_ptr());
  p.B = static_cast<int>(B);
  p.K = static_cast<int>(K);
  p.V = V;
  p.temperature = temperature;
  p.beta = beta;
  torch::stable::accelerator::DeviceGuard guard(dev);
  const int st = tidar_draft_sample(p, current_stream(dev));
  check_status(op, st, tidar_rejection_error_string(st));
  return {next_drafts, next_probs};
}

double philox_uniform(int64_t seed, int64_t offset, int64_t b, int64_t j, int64_t draft_len) {
  return static_cast<double>(tidar_philox_uniform_host(seed, offset, b, j, draft_len));
}

// ---------------------------------------------------------------------------------------------
// tidar_attention (inference forward; kernels by csrc/tidar_attention.cu)
// ---------------------------------------------------------------------------------------------
int num_sms(int32_t dev) {
  static std::mutex mu;
  static std::array<int, 64> cache{};
  if (dev < 0 || dev >= 64) return 0;
  std::lock_guard<std::mutex> lock(mu);
  if (cache[dev] == 0) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
      (void)cudaGetLastError();
      n = 0;
    }
    cache[dev] = n;
  }
  return cache[dev];
}

std::tuple<Tensor, Tensor> tidar_attention(Tensor q, Tensor k, Tensor v, Tensor local_limit, Tensor block_id,
                                           Tensor seg_start, double scale, double softcap) {
  const char* op = "tidar_cuda::tidar_attention";
  check_cuda(op, "q", q, -1);
  const int32_t dev = q.get_device_index();
  check_cuda(op, "k", k, dev);
  check_cuda(op, "v", v, dev);
  check_cuda(op, "local_limit", local_limit, dev);
  check_cuda(op, "block_id", block_id, dev);
  check_cuda(op, "seg_start", seg_start, dev);
  check_dim(op, "q", q, 4);
  check_dim(op, "k", k, 4);
  const int64_t B = q.size(0), Hq = q.size(1), S = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Skv = k.size(2);
  check_shape(op, "k", k, {B, Hkv, Skv, D});
  check_shape(op, "v", v, {B, Hkv, Skv, D});
  STD_TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0, op, ": GQA needs q heads (", Hq, ") to be a multiple of k/v heads (",
                  Hkv, ")");
  STD_TORCH_CHECK(S >= 1, op, ": q must have at least one query (S >= 1)");
  STD_TORCH_CHECK(D == 64 || D == 128, op, ": head dim must be 64 or 128, got ", D);
  const ST dt = q.scalar_type();
  STD_TORCH_CHECK(dt == ST::Half || dt == ST::BFloat16, op, ": q must have dtype float16 or bfloat16, got ",
                  dtype_name(dt));
  check_dtype(op, "k", k, dt);
  check_dtype(op, "v", v, dt);
  for (const Tensor* t : {&q, &k, &v})
    STD_TORCH_CHECK(t->stride(3) == 1, op, ": q, k and v need a contiguous last (head) dimension");
  check_dtype(op, "local_limit", local_limit, ST::Int);
  check_dtype(op, "block_id", block_id, ST::Int);
  check_dtype(op, "seg_start", seg_start, ST::Int);
  check_shape(op, "local_limit", local_limit, {S});
  check_shape(op, "block_id", block_id, {S});
  check_shape(op, "seg_start", seg_start, {B});
  STD_TORCH_CHECK(local_limit.is_contiguous() && block_id.is_contiguous() && seg_start.is_contiguous(), op,
                  ": local_limit, block_id and seg_start must be contiguous");
  STD_TORCH_CHECK(B <= INT32_MAX && Hq <= INT32_MAX && S <= INT32_MAX && Skv <= INT32_MAX, op, ": sizes too large");
  STD_TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  STD_TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, op, ": softcap must be 0 (none) or a finite float > 0, got ",
                  softcap);
  Tensor out = torch::stable::new_empty(q, {B, Hq, S, D});
  Tensor lse = torch::stable::new_empty(q, {B, Hq, S}, ST::Float);
#if TIDAR_HAVE_ATTENTION
  if (B == 0 || Hq == 0) return {out, lse};
  TidarAttentionParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = static_cast<float*>(lse.data_ptr());
  p.local_limit = static_cast<const int32_t*>(local_limit.data_ptr());
  p.block_id = static_cast<const int32_t*>(block_id.data_ptr());
  p.seg_start = static_cast<const int32_t*>(seg_start.data_ptr());
  strides_of(q, p.q_stride);
  strides_of(k, p.k_stride);
  strides_of(v, p.v_stride);
  strides_of(out, p.o_stride);
  p.B = static_cast<int>(B);
  p.Hq = static_cast<int>(Hq);
  p.Hkv = static_cast<int>(Hkv);
  p.S = static_cast<int>(S);
  p.Skv = static_cast<int>(Skv);
  p.D = static_cast<int>(D);
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.dtype = dt == ST::Half ? 0 : 1;
  torch::stable::accelerator::DeviceGuard guard(dev);
  p.num_sms = num_sms(dev);
  const size_t ws_bytes = tidar_attention_workspace_bytes(p);
  Tensor workspace = torch::stable::new_empty(q, {static_cast<int64_t>(ws_bytes > 0 ? ws_bytes : 1)}, ST::Byte);
  p.workspace = workspace.data_ptr();
  const int st = tidar_attention_forward(p, current_stream(dev));
  check_status(op, st, tidar_attention_error_string(st));
  return {out, lse};
#else
  (void)scale;
  (void)softcap;
  STD_TORCH_CHECK(false, op, ": this build has no attention kernel (csrc/tidar_attention.cu was missing at build time)");
  return {out, lse};
#endif
}

bool has_attention() { return TIDAR_HAVE_ATTENTION != 0; }

}  // namespace

STABLE_TORCH_LIBRARY(tidar_cuda, m) {
  m.def("kv_append(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k_new, Tensor v_new, Tensor seg_start) -> ()");
  m.def(
      "rejection_sample(Tensor ar_logits, Tensor block_logits, Tensor drafts, Tensor? draft_probs, Tensor? uniforms, "
      "Tensor? seed, Tensor? offset, int seed_value, int offset_value, float temperature, float beta, "
      "Tensor? thr_target=None, Tensor? thr_slots=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "draft_sample(Tensor ar_logits, Tensor block_logits, Tensor? uniforms, Tensor? seed, Tensor? offset, "
      "int seed_value, int offset_value, float temperature, float beta, Tensor? thr_target=None, "
      "Tensor? thr_slots=None) -> (Tensor, Tensor)");
  m.def(
      "tidar_attention(Tensor q, Tensor k, Tensor v, Tensor local_limit, Tensor block_id, Tensor seg_start, "
      "float scale, float softcap=0.0) -> (Tensor, Tensor)");
  m.def("philox_uniform(int seed, int offset, int b, int j, int draft_len) -> float");
  m.def("has_attention() -> bool");
}

STABLE_TORCH_LIBRARY_IMPL(tidar_cuda, CUDA, m) {
  m.impl("kv_append", TORCH_BOX(&kv_append));
  m.impl("rejection_sample", TORCH_BOX(&rejection_sample));
  m.impl("draft_sample", TORCH_BOX(&draft_sample));
  m.impl("tidar_attention", TORCH_BOX(&tidar_attention));
}

// CPU tensors reach the same functions, whose first check names the device: a clear error instead of
// "no kernel for CPU". Scalar-only ops are CompositeExplicitAutograd (no tensor to dispatch on).
STABLE_TORCH_LIBRARY_IMPL(tidar_cuda, CPU, m) {
  m.impl("kv_append", TORCH_BOX(&kv_append));
  m.impl("rejection_sample", TORCH_BOX(&rejection_sample));
  m.impl("draft_sample", TORCH_BOX(&draft_sample));
  m.impl("tidar_attention", TORCH_BOX(&tidar_attention));
}

STABLE_TORCH_LIBRARY_IMPL(tidar_cuda, CompositeExplicitAutograd, m) {
  m.impl("philox_uniform", TORCH_BOX(&philox_uniform));
  m.impl("has_attention", TORCH_BOX(&has_attention));
}
