/* Batch norm + activation fused into the depthwise conv that reads them: z = dwconv(act(bn(x))),
 * for float32 channels-last maps in training mode; models/norm_act_depthwise.py calls it.
 *
 * In an inverted residual the expanded map goes norm -> activation -> depthwise conv, and it is
 * the largest map of the block. Run as two layers (the fused norm kernel, then the conv) it is
 * written once as y = act(bn(x)) and read back by the conv, kept for the conv's weight gradient,
 * and in the backward the conv writes dy, which the norm's backward reads twice. Here y never
 * reaches memory: each task takes one image, normalises and activates it into a zero-bordered
 * tile that stays in cache (a whole image, all channels, so x is read and z written in contiguous
 * rows: tiles of 16 channels read 64 bytes in every C * 4 and measured slower than the two
 * layers), and convolves the tile. The backward rebuilds the
 * tile, and in one sweep over the output gradient adds up the weight gradient and scatters the
 * input gradient into a second tile, which it multiplies by the activation's derivative while
 * summing the norm's two per-channel totals; only then can the norm's input gradient be formed,
 * in place, in one more pass. Passes over the expanded map per step: 7 instead of 11 (forward:
 * statistics, conv; backward: tile, gradient written, gradient and x read, dx written), and the
 * map kept for the backward is x alone.
 *
 * The statistics (and the running averages) come from norm_act_stats (norm_act.c) before the
 * forward, and the norm's gradients from its norm_grad_coefficients. With no norm before the
 * activation (an Xception block's opening ReLU) the caller passes mean 0 and scale 1, which give x
 * back exactly, and the backward's `norm` 0: the activation's gradient is then x's gradient.
 * Channels come in blocks of 16 as in depthwise.c (C >= 16; a last block that would run past C
 * starts at C - 16 and overlaps the block before: values it writes twice are equal, and totals
 * skip the lanes the block before already counted). Weights are [k*k][C] (tap-major). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

typedef float v16 __attribute__((vector_size(64)));
static inline v16 ld(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, v16 v) { memcpy(p, &v, sizeof v); }
#define OWB 8 /* output pixels computed together by the forward */
#define CLAMP(v, lo, hi) ((v) < (lo) ? (lo) : ((v) > (hi) ? (hi) : (v)))

void norm_grad_coefficients(const double *s1, const double *s2, int64_t M, int64_t C, const float *gamma,
                            const float *invstd, float *dgamma, float *dbeta, float *k1, float *k2, float *scale);

static inline int64_t block_start(int64_t c0, int64_t C) { return c0 + 16 > C ? C - 16 : c0; }

/* The tile's border (p pixels of zeros around H x W, C channels each): the conv's zero padding
 * applies to act(bn(x)). */
static void zero_border(float *tile, int64_t H, int64_t W, int64_t C, int p) {
    int64_t Wp = W + 2 * p;
    memset(tile, 0, p * Wp * C * sizeof(float));
    memset(tile + (H + p) * Wp * C, 0, p * Wp * C * sizeof(float));
    for (int64_t h = p; h < H + p; h++) {
        memset(tile + h * Wp * C, 0, p * C * sizeof(float));
        memset(tile + (h * Wp + W + p) * C, 0, p * C * sizeof(float));
    }
}

/* The conv over one image's tile: z[oh][ow] = sum_ij tile[oh*s+i][ow*s+j] * w[ij], OWB outputs of
 * 16 channels at a time so each weight vector loaded serves OWB sums held in registers. Inlined
 * with constant k and s. */
static inline __attribute__((always_inline)) void conv_tile(
    const float *restrict tile, const float *restrict w, float *restrict z, int64_t Wp, int64_t C,
    int64_t OH, int64_t OW, const int k, const int s) {
    for (int64_t oh = 0; oh < OH; oh++) {
        float *zr = z + oh * OW * C;
        int64_t ow = 0;
        for (; ow + OWB <= OW; ow += OWB)
            for (int64_t c = 0; c < C; c += 16) {
                int64_t c0 = block_start(c, C);
                v16 acc[OWB];
                for (int b = 0; b < OWB; b++) acc[b] = (v16){0};
                for (int i = 0; i < k; i++) {
                    const float *tr = tile + ((oh * s + i) * Wp + ow * s) * C + c0;
                    for (int j = 0; j < k; j++) {
                        v16 wv = ld(w + (i * k + j) * C + c0);
                        for (int b = 0; b < OWB; b++) acc[b] += ld(tr + (b * s + j) * C) * wv;
                    }
                }
                for (int b = 0; b < OWB; b++) st(zr + (ow + b) * C + c0, acc[b]);
            }
        for (; ow < OW; ow++)
            for (int64_t c = 0; c < C; c += 16) {
                int64_t c0 = block_start(c, C);
                v16 acc = {0};
                for (int i = 0; i < k; i++)
                    for (int j = 0; j < k; j++)
                        acc += ld(tile + ((oh * s + i) * Wp + ow * s + j) * C + c0) * ld(w + (i * k + j) * C + c0);
                st(zr + ow * C + c0, acc);
            }
    }
}

/* One image's output gradient, one 16-channel block at a time: wacc[ij] += dz * y (tile), and the
 * input gradient dtile[oh*s+i][ow*s+j] += dz * w[ij] (scattered; dtile starts at zero). A block's
 * k*k weight-gradient sums stay in registers over the whole image. */
static inline __attribute__((always_inline)) void grad_tile(
    const float *restrict tile, float *restrict dtile, const float *restrict dz, const float *restrict w,
    float *restrict wacc, int64_t Wp, int64_t C, int64_t OH, int64_t OW, const int k, const int s) {
    for (int64_t c = 0; c < C; c += 16) {
        int64_t c0 = block_start(c, C), skip = c - c0; /* lanes the block before already has */
        v16 wv[49], a[49]; /* k <= 7 */
        float lanes[16];   /* an overlapping block scatters only the lanes the block before did not */
        for (int l = 0; l < 16; l++) lanes[l] = l < skip ? 0.f : 1.f;
        for (int q = 0; q < k * k; q++) { wv[q] = ld(w + q * C + c0) * ld(lanes); a[q] = (v16){0}; }
        for (int64_t oh = 0; oh < OH; oh++)
            for (int64_t ow = 0; ow < OW; ow++) {
                v16 g = ld(dz + (oh * OW + ow) * C + c0);
                for (int i = 0; i < k; i++) {
                    int64_t base = ((oh * s + i) * Wp + ow * s) * C + c0;
                    for (int j = 0; j < k; j++) {
                        a[i * k + j] += g * ld(tile + base + j * C);
                        st(dtile + base + j * C, ld(dtile + base + j * C) + g * wv[i * k + j]);
                    }
                }
            }
        for (int q = 0; q < k * k; q++) {
            const float *f = (const float *)&a[q];
            for (int64_t l = skip; l < 16; l++) wacc[q * C + c0 + l] = f[l];
        }
    }
}

/* The weight gradient alone (stride 1, whose input gradient is gathered instead), one output row
 * at a time so the tile rows it reads stay in cache; adds to wacc[k*k][C]. */
static inline __attribute__((always_inline)) void weight_tile(
    const float *restrict tile, const float *restrict dz, float *restrict wacc, int64_t Wp, int64_t C,
    int64_t OH, int64_t OW, const int k) {
    for (int64_t oh = 0; oh < OH; oh++)
        for (int64_t c = 0; c < C; c += 16) {
            int64_t c0 = block_start(c, C), skip = c - c0; /* lanes the block before already has */
            v16 a[49];
            for (int q = 0; q < k * k; q++) a[q] = (v16){0};
            for (int64_t ow = 0; ow < OW; ow++) {
                v16 g = ld(dz + (oh * OW + ow) * C + c0);
                for (int i = 0; i < k; i++) {
                    const float *tr = tile + ((oh + i) * Wp + ow) * C + c0;
                    for (int j = 0; j < k; j++) a[i * k + j] += g * ld(tr + j * C);
                }
            }
            for (int q = 0; q < k * k; q++) {
                if (!skip) { st(wacc + q * C + c0, ld(wacc + q * C + c0) + a[q]); continue; }
                const float *f = (const float *)&a[q];
                for (int64_t l = skip; l < 16; l++) wacc[q * C + c0 + l] += f[l];
            }
        }
}

#define CONV_CASE(K, S) \
    if (k == K && s == S) conv_tile(tile, w, zn, Wp, C, OH, OW, K, S); else
#define GRAD_CASE(K, S) \
    if (k == K && s == S) grad_tile(tile, dtile, dzn, w, wacc, Wp, C, OH, OW, K, S); else
#define WEIGHT_CASE(K) \
    if (k == K) weight_tile(tile, dzn, wacc, Wp, C, OH, OW, K); else
/* stride 1: input-gradient row h = the forward over the dz tile's rows h..h+k-1 with flipped taps */
#define DY_ROW_CASE(K) \
    if (k == K) conv_tile(dztile + h * Wp * C, wflip, dyrow, Wp, C, 1, W, K, 1); else

/* act(bn(x)) of image n into the tile's interior: y = (x - mean) * a + beta as norm_act.c computes
 * it, so both paths round alike. XT: x's element type, LX(v): an element as a float. */
#define FILL_TILE(ACT, XT, LX)                                                                         \
    for (int64_t h = 0; h < H; h++)                                                                \
        for (int64_t ww = 0; ww < W; ww++) {                                                       \
            const XT *xp = xn + (h * W + ww) * C;                                                  \
            float *tp = tile + ((h + p) * Wp + ww + p) * C;                                        \
            _Pragma("omp simd") for (int64_t c = 0; c < C; c++) {                                  \
                float y = (LX(xp[c]) - mean[c]) * a[c] + beta[c];                                  \
                tp[c] = ACT;                                                                       \
            }                                                                                      \
        }

/* ACT(y) and its derivative GRAD(y), as in norm_act.c (a NaN goes through ACT as through PyTorch's).
 * XT is the element type of x and dx, LX reads one as a float and SX rounds a float to one; ZT the
 * element type of z and dz (float or bf16, read and rounded the same way). Three sets: the float
 * kernels; the _bf16 ones, which read a bf16 x and write its gradient in bf16 but keep z float
 * (under CPU autocast the expanded map comes from a bf16 1x1 conv, and where the conv computes in
 * float32 its output stays float32: models/depthwise.py); and the _bf16z ones, bf16 on both sides,
 * for the stride-1 convs whose neighbours all run in bf16 (a float z would cost a cast pass each
 * way). A bf16 z is convolved into a float image buffer in cache and rounded once when written, so
 * it equals the float kernel's z rounded; a bf16 dz is widened an image at a time into a float
 * buffer. The float backward forms g (GT) in dx itself; the _bf16 one in a float buffer of its own,
 * and the _bf16z one in a bf16 buffer: g is written once and read once more after the norm's totals
 * (summed from the float g), and at half the bytes that pass costs half (the two bf16 layers it
 * replaces hand the norm a bf16 gradient too). */
#define KERNELS(NAME, ACT, GRAD)                                                                   \
    KERNELS_T(NAME, float, float, float, ACT, GRAD, AS_FLOAT, AS_FLOAT, AS_FLOAT, AS_FLOAT,        \
              (float *)dx, (void)0)                                                                \
    KERNELS_T(NAME##_bf16, uint16_t, float, float, ACT, GRAD, bf16_to_float, float_to_bf16,        \
              AS_FLOAT, AS_FLOAT, G_BUFFER(float), free(g))                                        \
    KERNELS_T(NAME##_bf16z, uint16_t, uint16_t, uint16_t, ACT, GRAD, bf16_to_float, float_to_bf16, \
              bf16_to_float, float_to_bf16, G_BUFFER(uint16_t), free(g))
#define G_BUFFER(GT) (GT *)aligned_alloc(64, ((M * C * sizeof(GT) + 63) / 64) * 64)
#define AS_FLOAT(v) (v)
/* Z_FLOAT: z and dz are float, read and written in place (no image buffer) */
#define Z_FLOAT(ZT) (sizeof(ZT) == sizeof(float))
#define KERNELS_T(NAME, XT, ZT, GT, ACT, GRAD, LX, SX, LG, SG, G_ALLOC, G_FREE)                    \
    void norm_act_dw_forward_##NAME(const XT *restrict x, const float *restrict mean,              \
                                    const float *restrict a, const float *restrict beta,           \
                                    const float *restrict w, ZT *restrict z, int64_t N,            \
                                    int64_t H, int64_t W, int64_t C, int64_t OH, int64_t OW, int k, \
                                    int s, int nthreads) {                                         \
        int p = k / 2;                                                                             \
        int64_t Wp = W + 2 * p;                                                                    \
        _Pragma("omp parallel num_threads(nthreads)") {                                           \
            float *tile = aligned_alloc(64, (H + 2 * p) * Wp * C * sizeof(float));                 \
            float *zbuf = Z_FLOAT(ZT) ? NULL : malloc(OH * OW * C * sizeof(float));                \
            zero_border(tile, H, W, C, p);                                                         \
            _Pragma("omp for schedule(static)") for (int64_t n = 0; n < N; n++) {                  \
                const XT *xn = x + n * H * W * C;                                                  \
                ZT *zout = z + n * OH * OW * C;                                                    \
                float *zn = Z_FLOAT(ZT) ? (float *)zout : zbuf;                                    \
                FILL_TILE(ACT, XT, LX)                                                             \
                CONV_CASE(3, 1) CONV_CASE(3, 2) CONV_CASE(5, 1) CONV_CASE(5, 2)                    \
                conv_tile(tile, w, zn, Wp, C, OH, OW, k, s);                                       \
                if (!Z_FLOAT(ZT))                                                                  \
                    _Pragma("omp simd") for (int64_t i = 0; i < OH * OW * C; i++)                  \
                        zout[i] = (ZT)float_to_bf16(zn[i]);                                        \
            }                                                                                      \
            free(tile); free(zbuf);                                                                \
        }                                                                                          \
    }                                                                                              \
                                                                                                   \
    /* dx (the norm's input gradient), dw[k*k][C], dgamma, dbeta from dz; invstd and gamma as the  \
     * norm had them. */                                                                           \
    void norm_act_dw_backward_##NAME(const XT *restrict x, const float *restrict mean,             \
                                     const float *restrict a, const float *restrict beta,          \
                                     const float *restrict invstd, const float *restrict gamma,    \
                                     const float *restrict w, const ZT *restrict dz,               \
                                     XT *restrict dx, float *restrict dw, float *restrict dgamma,  \
                                     float *restrict dbeta, int64_t N, int64_t H, int64_t W,       \
                                     int64_t C, int64_t OH, int64_t OW, int k, int s, int norm,    \
                                     int nthreads) {                                               \
        int p = k / 2;                                                                             \
        int64_t Wp = W + 2 * p, KK = (int64_t)k * k, M = N * H * W;                                \
        GT *g = G_ALLOC; /* the activation's output gradient, dy * act'(y) */                      \
        double *tw = calloc(KK * C, sizeof(double)), *s1 = calloc(C, sizeof(double)),             \
               *s2 = calloc(C, sizeof(double));                                                    \
        float *wflip = malloc(KK * C * sizeof(float)); /* the taps turned 180 degrees */          \
        for (int64_t q = 0; q < KK; q++) memcpy(wflip + (KK - 1 - q) * C, w + q * C, C * sizeof(float)); \
        _Pragma("omp parallel num_threads(nthreads)") {                                           \
            int64_t tsize = (H + 2 * p) * Wp * C;                                                  \
            float *tile = aligned_alloc(64, tsize * sizeof(float));                                \
            float *dtile = aligned_alloc(64, tsize * sizeof(float));                               \
            float *wacc = malloc(KK * C * sizeof(float));                                          \
            float *f1 = malloc(C * sizeof(float)), *f2 = malloc(C * sizeof(float));                \
            double *mw = calloc(KK * C, sizeof(double)), *m1 = calloc(C, sizeof(double)),         \
                   *m2 = calloc(C, sizeof(double));                                                \
            float *dztile = dtile, *dyrow = malloc(W * C * sizeof(float));                        \
            float *dzbuf = Z_FLOAT(ZT) ? NULL : malloc(OH * OW * C * sizeof(float));               \
            zero_border(tile, H, W, C, p);                                                         \
            if (s == 1) zero_border(dztile, H, W, C, p);                                           \
            _Pragma("omp for schedule(static)") for (int64_t n = 0; n < N; n++) {                  \
                const XT *xn = x + n * H * W * C;                                                  \
                const ZT *dzin = dz + n * OH * OW * C;                                             \
                const float *dzn = Z_FLOAT(ZT) ? (const float *)dzin : dzbuf;                      \
                if (!Z_FLOAT(ZT))                                                                  \
                    _Pragma("omp simd") for (int64_t i = 0; i < OH * OW * C; i++)                  \
                        dzbuf[i] = bf16_to_float((uint16_t)dzin[i]);                               \
                GT *gn = g + n * H * W * C;                                                        \
                FILL_TILE(ACT, XT, LX)                                                             \
                if (s == 1) { /* gather: dz into a bordered tile, read by the flipped forward */   \
                    for (int64_t h = 0; h < H; h++)                                                \
                        memcpy(dztile + ((h + p) * Wp + p) * C, dzn + h * W * C, W * C * sizeof(float)); \
                    memset(wacc, 0, KK * C * sizeof(float));                                       \
                    WEIGHT_CASE(3) WEIGHT_CASE(5) weight_tile(tile, dzn, wacc, Wp, C, OH, OW, k);   \
                } else { /* scatter into dtile */                                                  \
                    memset(dtile, 0, tsize * sizeof(float));                                       \
                    GRAD_CASE(3, 2) GRAD_CASE(5, 2)                                                \
                    grad_tile(tile, dtile, dzn, w, wacc, Wp, C, OH, OW, k, s);                     \
                }                                                                                  \
                for (int64_t q = 0; q < KK * C; q++) mw[q] += wacc[q];                             \
                /* g = dy * act'(y), written where dx will be; the norm's totals of g and          \
                 * g * (x - mean), in float along a row, in double across rows */                  \
                for (int64_t h = 0; h < H; h++) {                                                  \
                    memset(f1, 0, C * sizeof(float));                                              \
                    memset(f2, 0, C * sizeof(float));                                              \
                    if (s == 1) { DY_ROW_CASE(3) DY_ROW_CASE(5)                                    \
                                  conv_tile(dztile + h * Wp * C, wflip, dyrow, Wp, C, 1, W, k, 1); } \
                    for (int64_t ww = 0; ww < W; ww++) {                                           \
                        const XT *xp = xn + (h * W + ww) * C;                                      \
                        const float *dp = s == 1 ? dyrow + ww * C : dtile + ((h + p) * Wp + ww + p) * C; \
                        GT *gp = gn + (h * W + ww) * C;                                            \
                        _Pragma("omp simd") for (int64_t c = 0; c < C; c++) {                      \
                            float d = LX(xp[c]) - mean[c];                                         \
                            float y = d * a[c] + beta[c];                                          \
                            float g = dp[c] * (GRAD);                                              \
                            gp[c] = SG(g);                                                         \
                            f1[c] += g;                                                            \
                            f2[c] += g * d;                                                        \
                        }                                                                          \
                    }                                                                              \
                    for (int64_t c = 0; c < C; c++) { m1[c] += f1[c]; m2[c] += f2[c]; }            \
                }                                                                                  \
            }                                                                                      \
            _Pragma("omp critical") {                                                              \
                for (int64_t q = 0; q < KK * C; q++) tw[q] += mw[q];                               \
                for (int64_t c = 0; c < C; c++) { s1[c] += m1[c]; s2[c] += m2[c]; }                \
            }                                                                                      \
            free(tile); free(dtile); free(dyrow); free(dzbuf); free(wacc); free(f1); free(f2); free(mw); free(m1); free(m2); \
        }                                                                                          \
        for (int64_t q = 0; q < KK * C; q++) dw[q] = (float)tw[q];                                 \
        /* dx = gamma * invstd * (g - sum g / M - xhat * sum(g * xhat) / M) (float: in place over g); \
         * without a norm (norm == 0: z = dwconv(act(x)), mean 0 and a 1) dx is g itself */        \
        float *k1 = malloc(C * sizeof(float)), *k2 = malloc(C * sizeof(float)),                   \
              *scale = malloc(C * sizeof(float));                                                  \
        if (norm) norm_grad_coefficients(s1, s2, M, C, gamma, invstd, dgamma, dbeta, k1, k2, scale); \
        _Pragma("omp parallel for schedule(static) num_threads(nthreads)") for (int64_t r = 0; r < M; r++) { \
            if (!norm) {                                                                           \
                if ((void *)dx != (void *)g)                                                       \
                    _Pragma("omp simd") for (int64_t c = 0; c < C; c++) dx[r * C + c] = SX(LG(g[r * C + c])); \
                continue;                                                                          \
            }                                                                                      \
            _Pragma("omp simd") for (int64_t c = 0; c < C; c++) {                                  \
                int64_t i = r * C + c;                                                             \
                dx[i] = SX((LG(g[i]) - k1[c]) * scale[c] - (LX(x[i]) - mean[c]) * k2[c]);           \
            }                                                                                      \
        }                                                                                          \
        free(tw); free(s1); free(s2); free(k1); free(k2); free(scale); free(wflip);                \
        G_FREE;                                                                                    \
    }

KERNELS(identity, y, ((void)y, 1.f))
KERNELS(relu, (y < 0.f ? 0.f : y), (y > 0.f ? 1.f : 0.f))
KERNELS(relu6, CLAMP(y, 0.f, 6.f), ((y > 0.f && y < 6.f) ? 1.f : 0.f))
KERNELS(hardswish, (y * CLAMP(y + 3.f, 0.f, 6.f) * (1.f / 6.f)),
        (y < -3.f ? 0.f : (y > 3.f ? 1.f : (2.f * y + 3.f) * (1.f / 6.f))))
