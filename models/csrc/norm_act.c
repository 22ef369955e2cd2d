/* Batch norm (training mode) fused with its activation, for float32 and bf16 channels-last maps.
 *
 * Seen as M = N*H*W rows of C channels, a channels-last map is a row-major matrix, so every loop
 * below runs over rows in parallel and over channels with SIMD. What the fusion saves is memory
 * traffic: PyTorch's batch_norm then activation reads or writes a full map 12 times per training
 * step (norm forward 3, activation forward 2, activation backward 3, norm backward 4) and keeps
 * two maps for the backward (the norm's input and the activation's input); here it is 8 times
 * (forward: statistics 1, normalise + activate 2; backward: sums 2, input gradient 3) and one map
 * is kept (the norm's input x; the normalised value and the activation's derivative are
 * recomputed from it, which costs arithmetic the memory-bound loops have spare).
 *
 * Compiled on first use by models/native.py with OpenMP; linked by soname to the libgomp that
 * PyTorch has already loaded, so both share one thread pool. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define BLOCK 64 /* rows summed in float before adding to the double totals */
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define CLAMP(v, lo, hi) ((v) < (lo) ? (lo) : ((v) > (hi) ? (hi) : (v)))

/* Per-channel totals s1 += F1, s2 += F2 over all rows, F1 and F2 expressions of row r, channel c
 * and element index i. Each thread sums blocks of rows in float (vectorised over channels), then
 * in double across blocks; the threads' totals are added at the end. */
#define CHANNEL_SUMS(F1, F2)                                                                       \
    memset(s1, 0, C * sizeof(double));                                                             \
    memset(s2, 0, C * sizeof(double));                                                             \
    _Pragma("omp parallel num_threads(nthreads)") {                                                \
        double *d1 = calloc(C, sizeof(double)), *d2 = calloc(C, sizeof(double));                   \
        float *f1 = malloc(C * sizeof(float)), *f2 = malloc(C * sizeof(float));                    \
        _Pragma("omp for schedule(static)") for (int64_t r0 = 0; r0 < M; r0 += BLOCK) {            \
            memset(f1, 0, C * sizeof(float));                                                      \
            memset(f2, 0, C * sizeof(float));                                                      \
            for (int64_t r = r0; r < MIN(r0 + BLOCK, M); r++) {                                    \
                _Pragma("omp simd") for (int64_t c = 0; c < C; c++) {                              \
                    int64_t i = r * C + c;                                                         \
                    f1[c] += F1;                                                                   \
                    f2[c] += F2;                                                                   \
                }                                                                                  \
            }                                                                                      \
            for (int64_t c = 0; c < C; c++) { d1[c] += f1[c]; d2[c] += f2[c]; }                    \
        }                                                                                          \
        _Pragma("omp critical") for (int64_t c = 0; c < C; c++) { s1[c] += d1[c]; s2[c] += d2[c]; } \
        free(d1); free(d2); free(f1); free(f2);                                                    \
    }

#define ROWS(BODY)                                                                                 \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads)") for (int64_t r = 0; r < M; r++) { \
        _Pragma("omp simd") for (int64_t c = 0; c < C; c++) { int64_t i = r * C + c; BODY; }       \
    }

/* Batch statistics, the scale they give (y = (x - mean) * a + beta), and the running averages as
 * nn.BatchNorm2d keeps them (the running variance unbiased). Sums are of x minus its first row,
 * which keeps them small when a channel's mean is large against its spread. XT is x's element type
 * and X(i) its i-th value as a float: norm_act_stats reads a float map, norm_act_stats_bf16 a bf16
 * one (models/norm_act_depthwise.py, under autocast). */
#define NORM_ACT_STATS(NAME, XT, X)                                                                \
    void NAME(const XT *restrict x, int64_t M, int64_t C, const float *restrict gamma, double eps,  \
              double momentum, float *running_mean, float *running_var, float *mean, float *invstd, \
              float *a, int nthreads) {                                                            \
        double *s1 = malloc(C * sizeof(double)), *s2 = malloc(C * sizeof(double));                 \
        CHANNEL_SUMS(X(i) - X(c), (X(i) - X(c)) * (X(i) - X(c)))                                   \
        for (int64_t c = 0; c < C; c++) {                                                          \
            double m1 = s1[c] / M, var = s2[c] / M - m1 * m1;                                      \
            var = var < 0 ? 0 : var; /* written so that a NaN stays NaN, as in PyTorch */          \
            double mu = X(c) + m1, is = 1.0 / sqrt(var + eps);                                     \
            running_mean[c] = (float)((1 - momentum) * running_mean[c] + momentum * mu);           \
            running_var[c] = (float)((1 - momentum) * running_var[c] + momentum * var * M / (M > 1 ? M - 1 : 1)); \
            mean[c] = (float)mu;                                                                   \
            invstd[c] = (float)is;                                                                 \
            a[c] = (float)(gamma[c] * is);                                                         \
        }                                                                                          \
        free(s1); free(s2);                                                                        \
    }
#define FLOAT_AT(i) x[i]
#define BF16_AT(i) bf16_to_float(x[i])
NORM_ACT_STATS(norm_act_stats, float, FLOAT_AT)
NORM_ACT_STATS(norm_act_stats_bf16, uint16_t, BF16_AT)

/* The norm's gradients from the two per-channel totals of its output gradient dy (activation
 * derivative applied): s1 = sum dy, s2 = sum dy * (x - mean). dbeta = s1, dgamma = s2 * invstd, and
 * the input gradient dx = (dy - k1) * scale - (x - mean) * k2. Shared with norm_act_depthwise.c. */
void norm_grad_coefficients(const double *s1, const double *s2, int64_t M, int64_t C, const float *gamma,
                            const float *invstd, float *dgamma, float *dbeta, float *k1, float *k2, float *scale) {
    for (int64_t c = 0; c < C; c++) {
        dbeta[c] = (float)s1[c];
        dgamma[c] = (float)(s2[c] * invstd[c]);
        scale[c] = gamma[c] * invstd[c];
        k1[c] = (float)(s1[c] / M);
        k2[c] = (float)(scale[c] * invstd[c] * invstd[c] * s2[c] / M);
    }
}

/* For each activation: ACT(y), and GRAD(y), its derivative; a NaN goes through ACT as through PyTorch's
 * activations (a diverged run's loss must become NaN to be caught). Forward: z = ACT(y), y = (x - mean) * a + beta
 * (not x * a + (beta - mean * a), which cancels when the mean is large against the spread).
 * Backward, with dy = dz * GRAD(y) and xhat = (x - mean) * invstd:
 *   dbeta = sum dy, dgamma = sum dy * xhat,
 *   dx = gamma * invstd * (dy - dbeta / M - xhat * dgamma / M). */
#define KERNELS(NAME, ACT, GRAD)                                                                   \
    KERNELS_T(NAME, float, AS_FLOAT, AS_FLOAT, ACT, GRAD)                                          \
    KERNELS_T(NAME##_bf16, uint16_t, bf16_to_float, float_to_bf16, ACT, GRAD)
/* T is the element type of x, z and their gradients; LX(v) reads one as a float and SX(f) rounds a
 * float to one. The float kernels, and the _bf16 ones for bf16 maps (under CPU autocast a conv's
 * output and its gradient are bf16): the arithmetic is float32 in both, rounded to bf16 once per
 * value written, so a bf16 kernel's output is its float twin's on the same values, converted. */
#define AS_FLOAT(v) (v)
#define KERNELS_T(NAME, T, LX, SX, ACT, GRAD)                                                      \
    void norm_act_forward_##NAME(const T *restrict x, T *restrict z, int64_t M, int64_t C,         \
                                 const float *restrict mean, const float *restrict a,             \
                                 const float *restrict beta, int nthreads) {                      \
        ROWS(float y = (LX(x[i]) - mean[c]) * a[c] + beta[c]; z[i] = SX(ACT))                      \
    }                                                                                              \
    void norm_act_backward_##NAME(const T *restrict dz, const T *restrict x,                       \
                                  T *restrict dx, int64_t M, int64_t C,                            \
                                  const float *restrict gamma, const float *restrict mean,         \
                                  const float *restrict invstd, const float *restrict a,           \
                                  const float *restrict beta, float *dgamma, float *dbeta,         \
                                  int nthreads) {                                                  \
        double *s1 = malloc(C * sizeof(double)), *s2 = malloc(C * sizeof(double));                 \
        CHANNEL_SUMS(LX(dz[i]) * ({ float y = (LX(x[i]) - mean[c]) * a[c] + beta[c]; GRAD; }),      \
                     LX(dz[i]) * ({ float y = (LX(x[i]) - mean[c]) * a[c] + beta[c]; GRAD; }) *     \
                         (LX(x[i]) - mean[c]))                                                     \
        float *k1 = malloc(C * sizeof(float)), *k2 = malloc(C * sizeof(float));                    \
        float *scale = malloc(C * sizeof(float));                                                  \
        norm_grad_coefficients(s1, s2, M, C, gamma, invstd, dgamma, dbeta, k1, k2, scale);        \
        ROWS(float xv = LX(x[i]); float y = (xv - mean[c]) * a[c] + beta[c];                       \
             float dy = LX(dz[i]) * (GRAD); dx[i] = SX((dy - k1[c]) * scale[c] - (xv - mean[c]) * k2[c])) \
        free(s1); free(s2); free(k1); free(k2); free(scale);                                       \
    }

KERNELS(identity, y, ((void)y, 1.f))
KERNELS(relu, (y < 0.f ? 0.f : y), (y > 0.f ? 1.f : 0.f)) /* relu(NaN) is NaN, as in PyTorch */
KERNELS(relu6, CLAMP(y, 0.f, 6.f), ((y > 0.f && y < 6.f) ? 1.f : 0.f))
KERNELS(hardswish, (y * CLAMP(y + 3.f, 0.f, 6.f) * (1.f / 6.f)),
        (y < -3.f ? 0.f : (y > 3.f ? 1.f : (2.f * y + 3.f) * (1.f / 6.f))))

/* The last norm of a residual block with the sum and the ReLU after it: z = relu(y + r), y the norm's
 * output as above, r (`res`) the shortcut. Forward: read x and r, write z (PyTorch's norm, sum and ReLU read or
 * write a map 7 times). The backward works from z, which the next layer keeps anyway: du = dz where
 * z > 0 (else 0; PyTorch's rule, so a NaN passes the gradient as there) is the gradient of both the
 * norm's output and r. One pass sums du and du * (x - mean) and writes dr = du; a second writes dx.
 *
 * The linear end of an inverted residual (MobileNetV2/V3): z = y + r with no activation after the sum.
 * Forward: read x and r, write z, after the statistics' pass: 4 map passes, where PyTorch's norm then sum
 * make 6. The backward needs no kernel of its own: r's gradient is dz itself, and x's is
 * norm_act_backward_identity's.
 *
 * SUFFIX, T, LX, SX as in KERNELS_T: float maps, and bf16 ones (_bf16; du is dz or 0, so dr is exact). */
#define NORM_ADD(SUFFIX, T, LX, SX)                                                                \
    void norm_add_relu_forward##SUFFIX(const T *restrict x, const T *restrict res, T *restrict z, int64_t M, \
                                       int64_t C, const float *restrict mean, const float *restrict a, \
                                       const float *restrict beta, int nthreads) {                 \
        ROWS(float u = (LX(x[i]) - mean[c]) * a[c] + beta[c] + LX(res[i]); z[i] = SX(u < 0.f ? 0.f : u)) \
    }                                                                                              \
    void norm_add_relu_backward##SUFFIX(const T *restrict dz, const T *restrict z, const T *restrict x, \
                                        T *restrict dx, T *restrict dr, int64_t M, int64_t C,      \
                                        const float *restrict gamma, const float *restrict mean,   \
                                        const float *restrict invstd, float *dgamma, float *dbeta, \
                                        int nthreads) {                                            \
        double *s1 = malloc(C * sizeof(double)), *s2 = malloc(C * sizeof(double));                 \
        CHANNEL_SUMS(({ float du = LX(z[i]) <= 0.f ? 0.f : LX(dz[i]); dr[i] = SX(du); du; }),       \
                     LX(dr[i]) * (LX(x[i]) - mean[c]))                                             \
        float *k1 = malloc(C * sizeof(float)), *k2 = malloc(C * sizeof(float));                    \
        float *scale = malloc(C * sizeof(float));                                                  \
        norm_grad_coefficients(s1, s2, M, C, gamma, invstd, dgamma, dbeta, k1, k2, scale);        \
        ROWS(dx[i] = SX((LX(dr[i]) - k1[c]) * scale[c] - (LX(x[i]) - mean[c]) * k2[c]))             \
        free(s1); free(s2); free(k1); free(k2); free(scale);                                       \
    }                                                                                              \
    void norm_add_identity_forward##SUFFIX(const T *restrict x, const T *restrict res, T *restrict z, \
                                           int64_t M, int64_t C, const float *restrict mean,       \
                                           const float *restrict a, const float *restrict beta,    \
                                           int nthreads) {                                         \
        ROWS(z[i] = SX((LX(x[i]) - mean[c]) * a[c] + beta[c] + LX(res[i])))                        \
    }

NORM_ADD(, float, AS_FLOAT, AS_FLOAT)
NORM_ADD(_bf16, uint16_t, bf16_to_float, float_to_bf16)
