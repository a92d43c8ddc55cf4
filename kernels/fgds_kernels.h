/* C ABI of the fgds-engine CUDA library: the fused guided DDIM step.
 *
 * Formula: fgds_engine/ops/formulas.py::guided_ddim_step (the single source of truth). Every latent is
 * `batch` rows of `numel` elements in storage order (NCHW or NHWC alike); all pointers are device pointers;
 * per-sample scalars are fp32 device arrays of length `batch`, so a launch needs no host sync and can be
 * captured in a CUDA graph. All arithmetic is fp32.
 */
#ifndef FGDS_KERNELS_H
#define FGDS_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FGDS_ABI_VERSION 1

/* dtype codes of the latents (and of the gradient) */
#define FGDS_FLOAT32 0
#define FGDS_FLOAT16 1
#define FGDS_BFLOAT16 2

/* prediction_type codes */
#define FGDS_EPSILON 0
#define FGDS_SAMPLE 1
#define FGDS_V_PREDICTION 2

/* flags */
#define FGDS_SCORE 1       /* feedback in the score form (eps -= sqrt(1 - a_t) g); else the shift form */
#define FGDS_CLIP 2        /* clamp x0 to [-clip_range, clip_range] */
#define FGDS_USE_CLIPPED 4 /* re-derive eps from the clipped x0 */

int fgds_abi_version(void);

/* Elements per thread block, and the number of blocks per sample (the workspace holds batch*blocks*2 fp32). */
int fgds_block_elems(void);
int64_t fgds_blocks_per_sample(int64_t numel);

/* x_prev, x0 <- guided DDIM step. eps_u == NULL: no CFG; grad == NULL: no feedback (workspace unused);
 * noise == NULL: no eta noise (eta > 0 needs it); x0 == NULL: the predicted x0 is not written. Returns 0 or a cudaError_t code; the launch is
 * asynchronous on `stream` (a cudaStream_t; NULL for the legacy default stream). */
int fgds_guided_ddim_step(const void* eps_u, const void* eps_c, const void* x, const void* grad,
                          const void* noise, void* x_prev, void* x0, const float* a_t, const float* a_prev,
                          const float* guidance_scale, const float* feedback_scale, float* workspace,
                          int64_t batch, int64_t numel, int dtype, int grad_dtype, int prediction_type,
                          int flags, float eta, float clip_range, void* stream);

/* The message of a code returned above. */
const char* fgds_error_string(int code);

#ifdef __cplusplus
}
#endif

#endif /* FGDS_KERNELS_H */
