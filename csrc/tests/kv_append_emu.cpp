// CPU build of csrc/kv_append.cu under the fiber emulator (see sampling_emu_lib.cpp; same library).
#include "../kv_append.cu"

extern "C" {

int emu_kv_append(void* kc, void* vc, const void* kn, const void* vn, const int32_t* seg_start,
                  const int64_t* kc_stride, const int64_t* vc_stride, const int64_t* kn_stride,
                  const int64_t* vn_stride, int64_t B, int64_t H, int64_t S, int64_t D, int64_t Smax, int elem_size) {
  TidarKvAppendParams p{};
  p.k_cache = kc; p.v_cache = vc; p.k_new = kn; p.v_new = vn; p.seg_start = seg_start;
  for (int i = 0; i < 4; ++i) {
    p.kc_stride[i] = kc_stride[i]; p.vc_stride[i] = vc_stride[i];
    p.kn_stride[i] = kn_stride[i]; p.vn_stride[i] = vn_stride[i];
  }
  p.B = B; p.H = H; p.S = S; p.D = D; p.Smax = Smax; p.elem_size = elem_size;
  return tidar_kv_append(p, nullptr);
}

}  // extern "C"
