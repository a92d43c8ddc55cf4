// Fused guided DDIM step: CFG combine + feedback combine + DDIM update (eq. 12 of DDIM, Song et al. 2021).
//
// Formula: fgds_engine/ops/formulas.py::guided_ddim_step. Key from code names to paper symbols:
//   x  x_t        a  alpha-bar_t        ap  alpha-bar_{t-1}        w  CFG scale        g  feedback gradient
// With a gradient, two launches: sumsq_kernel writes per-block partial sums of x^2 and g^2, and
// step_kernel reduces its sample's partials in a fixed order (deterministic, no atomics) before the
// elementwise update. IEEE sqrt and division (no fast-math), fp32 accumulation for fp16 / bf16.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "fgds_kernels.h"

namespace {

constexpr int kThreads = 256;
constexpr int kItems = 4;
constexpr int kBlockElems = kThreads * kItems;

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Sum over the thread block, same tree every launch (deterministic). Result valid in thread 0.
__device__ __forceinline__ float block_sum(float v, float* shared) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // shared may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? shared[threadIdx.x] : 0.f;
  if (warp == 0)
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

template <typename T, typename G>
__global__ void sumsq_kernel(const T* __restrict__ x, const G* __restrict__ g, float* __restrict__ part,
                             int64_t numel, int64_t nblk) {
  __shared__ float shared[kThreads / 32];
  const int64_t b = blockIdx.y, j = blockIdx.x, row = b * numel;
  float sx = 0.f, sg = 0.f;
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int64_t i = j * kBlockElems + k * kThreads + threadIdx.x;
    if (i < numel) {
      const float xv = to_f32(x[row + i]), gv = to_f32(g[row + i]);
      sx += xv * xv;
      sg += gv * gv;
    }
  }
  sx = block_sum(sx, shared);
  sg = block_sum(sg, shared);
  if (threadIdx.x == 0) {
    part[(b * nblk + j) * 2] = sx;
    part[(b * nblk + j) * 2 + 1] = sg;
  }
}

template <typename T, typename G>
__global__ void step_kernel(const T* __restrict__ eps_u, const T* __restrict__ eps_c, const T* __restrict__ x,
                            const G* __restrict__ grad, const T* __restrict__ noise, T* __restrict__ x_prev,
                            T* __restrict__ x0_out, const float* __restrict__ a_t,
                            const float* __restrict__ a_prev, const float* __restrict__ w_scale,
                            const float* __restrict__ fb_scale, const float* __restrict__ part, int64_t numel,
                            int64_t nblk, int pred, int flags, float eta, float clip_range) {
  __shared__ float shared[kThreads / 32];
  __shared__ float fac_shared;
  const int64_t b = blockIdx.y, j = blockIdx.x, row = b * numel;
  const float a = a_t[b], ap = a_prev[b];
  const float sa = sqrtf(a), s1a = sqrtf(1.f - a);
  const bool score = flags & FGDS_SCORE;

  // feedback factor ||x_t|| / (||grad|| + 1e-8) * scale, from this sample's partial sums
  float fac = 0.f;
  if (grad != nullptr) {
    float sx = 0.f, sg = 0.f;
    for (int64_t p = threadIdx.x; p < nblk; p += kThreads) {
      sx += part[(b * nblk + p) * 2];
      sg += part[(b * nblk + p) * 2 + 1];
    }
    sx = block_sum(sx, shared);
    sg = block_sum(sg, shared);
    if (threadIdx.x == 0) fac_shared = sqrtf(sx) / (sqrtf(sg) + 1e-8f) * fb_scale[b];
    __syncthreads();
    fac = fac_shared;
  }
  // eq. 16 of DDIM: sigma = eta sqrt((1 - a_prev) / (1 - a)) sqrt(1 - a / a_prev)
  const float std = eta * sqrtf((1.f - ap) / (1.f - a) * (1.f - a / ap));
  const float c_x0 = sqrtf(ap), c_eps = sqrtf(1.f - ap - std * std);
  const float w = eps_u != nullptr ? w_scale[b] : 0.f;

#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int64_t i = j * kBlockElems + k * kThreads + threadIdx.x;
    if (i >= numel) continue;
    // classifier-free guidance: out = eps_u + w (eps_c - eps_u)
    float out = to_f32(eps_c[row + i]);
    if (eps_u != nullptr) {
      const float eu = to_f32(eps_u[row + i]);
      out = eu + w * (out - eu);
    }
    float xv = to_f32(x[row + i]), g = 0.f;
    if (grad != nullptr) {
      g = to_f32(grad[row + i]) * fac;
      if (!score) xv = to_f32(from_f32<T>(xv + g));  // shift form, x_t + g stored in x's dtype
    }
    float x0, eps;
    if (pred == FGDS_EPSILON) {
      x0 = (xv - s1a * out) / sa;
      eps = out;
    } else if (pred == FGDS_SAMPLE) {
      x0 = out;
      eps = (xv - sa * out) / s1a;
    } else {  // v_prediction
      x0 = sa * xv - s1a * out;
      eps = sa * out + s1a * xv;
    }
    if (grad != nullptr && score) {  // score form: eps' = eps - sqrt(1 - a) g, x0 re-derived
      eps = eps - s1a * g;
      x0 = (xv - s1a * eps) / sa;
    }
    if (flags & FGDS_CLIP) x0 = fminf(fmaxf(x0, -clip_range), clip_range);
    if (flags & FGDS_USE_CLIPPED) eps = (xv - sa * x0) / s1a;
    // eq. 12 of DDIM: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z
    float xp = c_x0 * x0 + c_eps * eps;
    if (noise != nullptr) xp += std * to_f32(noise[row + i]);
    x_prev[row + i] = from_f32<T>(xp);
    if (x0_out != nullptr) x0_out[row + i] = from_f32<T>(x0);
  }
}

template <typename T, typename G>
int launch(const void* eps_u, const void* eps_c, const void* x, const void* grad, const void* noise, void* x_prev,
           void* x0, const float* a_t, const float* a_prev, const float* w, const float* fs, float* ws,
           int64_t batch, int64_t numel, int pred, int flags, float eta, float clip_range, cudaStream_t stream) {
  const int64_t nblk = fgds_blocks_per_sample(numel);
  if (batch > 65535) return cudaErrorInvalidValue;  // grid.y limit
  const dim3 grid(static_cast<unsigned>(nblk), static_cast<unsigned>(batch));
  if (grad != nullptr) {
    sumsq_kernel<T, G><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(x), static_cast<const G*>(grad), ws,
                                                       numel, nblk);
  }
  step_kernel<T, G><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(eps_u), static_cast<const T*>(eps_c), static_cast<const T*>(x),
      static_cast<const G*>(grad), static_cast<const T*>(noise), static_cast<T*>(x_prev), static_cast<T*>(x0),
      a_t, a_prev, w, fs, ws, numel, nblk, pred, flags, eta, clip_range);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_t(int grad_dtype, const void* eps_u, const void* eps_c, const void* x, const void* grad,
             const void* noise, void* x_prev, void* x0, const float* a_t, const float* a_prev, const float* w,
             const float* fs, float* ws, int64_t batch, int64_t numel, int pred, int flags, float eta,
             float clip_range, cudaStream_t stream) {
  switch (grad_dtype) {
    case FGDS_FLOAT32:
      return launch<T, float>(eps_u, eps_c, x, grad, noise, x_prev, x0, a_t, a_prev, w, fs, ws, batch, numel,
                              pred, flags, eta, clip_range, stream);
    case FGDS_FLOAT16:
      return launch<T, __half>(eps_u, eps_c, x, grad, noise, x_prev, x0, a_t, a_prev, w, fs, ws, batch, numel,
                               pred, flags, eta, clip_range, stream);
    case FGDS_BFLOAT16:
      return launch<T, __nv_bfloat16>(eps_u, eps_c, x, grad, noise, x_prev, x0, a_t, a_prev, w, fs, ws, batch,
                                      numel, pred, flags, eta, clip_range, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

extern "C" {

int fgds_abi_version(void) { return FGDS_ABI_VERSION; }

int fgds_block_elems(void) { return kBlockElems; }

int64_t fgds_blocks_per_sample(int64_t numel) { return (numel + kBlockElems - 1) / kBlockElems; }

int fgds_guided_ddim_step(const void* eps_u, const void* eps_c, const void* x, const void* grad,
                          const void* noise, void* x_prev, void* x0, const float* a_t, const float* a_prev,
                          const float* guidance_scale, const float* feedback_scale, float* workspace,
                          int64_t batch, int64_t numel, int dtype, int grad_dtype, int prediction_type,
                          int flags, float eta, float clip_range, void* stream) {
  if (batch <= 0 || numel <= 0 || prediction_type < 0 || prediction_type > 2) return cudaErrorInvalidValue;
  if (grad != nullptr && workspace == nullptr) return cudaErrorInvalidValue;
  const auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case FGDS_FLOAT32:
      return launch_t<float>(grad_dtype, eps_u, eps_c, x, grad, noise, x_prev, x0, a_t, a_prev, guidance_scale,
                             feedback_scale, workspace, batch, numel, prediction_type, flags, eta, clip_range, s);
    case FGDS_FLOAT16:
      return launch_t<__half>(grad_dtype, eps_u, eps_c, x, grad, noise, x_prev, x0, a_t, a_prev, guidance_scale,
                              feedback_scale, workspace, batch, numel, prediction_type, flags, eta, clip_range,
                              s);
    case FGDS_BFLOAT16:
      return launch_t<__nv_bfloat16>(grad_dtype, eps_u, eps_c, x, grad, noise, x_prev, x0, a_t, a_prev,
                                     guidance_scale, feedback_scale, workspace, batch, numel, prediction_type,
                                     flags, eta, clip_range, s);
    default:
      return cudaErrorInvalidValue;
  }
}

const char* fgds_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // extern "C"
