/* Depthwise k x k convolution (one filter per channel, no bias) for float32 channels-last maps:
 * forward, input gradient at stride 1, and weight gradient; models/depthwise.py calls them.
 *
 * A channels-last map is N*H*W pixels of C contiguous channels, and a depthwise filter mixes
 * no channels, so every loop below runs over pixels with 16 channels per vector (one AVX-512
 * register, two AVX2 ones). The forward keeps OWB output pixels' sums in registers while it
 * walks the k x k taps, so each input vector loaded serves up to k outputs; the weight gradient
 * keeps a row of k taps' sums in registers. What they replace: oneDNN's depthwise kernels, which
 * for 5x5 filters compute the weight gradient several times slower than it needs to be
 * (docs/train_speed.md has the measurements).
 *
 * Channels come in blocks of 16; when C is not a multiple of 16 the last block starts at C - 16
 * and overlaps the one before it (C >= 16 is required). The forward then writes some channels
 * twice with the same value; the weight gradient adds each channel once.
 * Weights are laid out [k*k][C] (tap-major), so a tap's 16 channels are one vector. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));
static inline v16 ld(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, v16 v) { memcpy(p, &v, sizeof v); }
#define OWB 8 /* output pixels computed together by the forward */

static inline int64_t block_start(int64_t c0, int64_t C) { return c0 + 16 > C ? C - 16 : c0; }

/* One output row (image n, row oh), all channels: y[ow] = sum_ij x[oh*s+i-p][ow*s+j-p] * w[ij].
 * Inlined with constant k and s, so the tap loops unroll. */
static inline __attribute__((always_inline)) void forward_row(
    const float *restrict x, const float *restrict w, float *restrict y, int64_t H, int64_t W, int64_t C,
    int64_t OW, int64_t oh, const int k, const int s, const int p) {
    int64_t lo = (p + s - 1) / s;     /* first output column whose taps all fall inside the row */
    int64_t hi = (W - k + p) / s + 1; /* one past the last one */
    if (hi > OW) hi = OW;
    if (lo > hi) lo = hi;
    int64_t ow = 0;
    while (ow < OW) {
        if (ow >= lo && ow + OWB <= hi) { /* OWB outputs, taps unchecked */
            for (int64_t c = 0; c < C; c += 16) {
                int64_t c0 = block_start(c, C);
                v16 acc[OWB];
                for (int b = 0; b < OWB; b++) acc[b] = (v16){0};
                for (int i = 0; i < k; i++) {
                    int64_t h = oh * s + i - p;
                    if (h < 0 || h >= H) continue;
                    const float *xr = x + (h * W + ow * s - p) * C + c0;
                    for (int j = 0; j < k; j++) {
                        v16 wv = ld(w + (i * k + j) * C + c0);
                        for (int b = 0; b < OWB; b++) acc[b] += ld(xr + (b * s + j) * C) * wv;
                    }
                }
                for (int b = 0; b < OWB; b++) st(y + (ow + b) * C + c0, acc[b]);
            }
            ow += OWB;
        } else { /* one output near the border (or the remainder), taps checked */
            for (int64_t c = 0; c < C; c += 16) {
                int64_t c0 = block_start(c, C);
                v16 acc = {0};
                for (int i = 0; i < k; i++) {
                    int64_t h = oh * s + i - p;
                    if (h < 0 || h >= H) continue;
                    for (int j = 0; j < k; j++) {
                        int64_t col = ow * s + j - p;
                        if (col < 0 || col >= W) continue;
                        acc += ld(x + (h * W + col) * C + c0) * ld(w + (i * k + j) * C + c0);
                    }
                }
                st(y + ow * C + c0, acc);
            }
            ow++;
        }
    }
}

#define FORWARD_CASE(K, S) \
    if (k == K && s == S) { forward_row(xn, w, yr, H, W, C, OW, oh, K, S, p); continue; }

void depthwise_forward(const float *restrict x, const float *restrict w, float *restrict y, int64_t N, int64_t H,
                       int64_t W, int64_t C, int64_t OH, int64_t OW, int k, int s, int p, int nthreads) {
#pragma omp parallel for schedule(static) collapse(2) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++)
        for (int64_t oh = 0; oh < OH; oh++) {
            const float *xn = x + n * H * W * C;
            float *yr = y + (n * OH + oh) * OW * C;
            FORWARD_CASE(3, 1) FORWARD_CASE(3, 2) FORWARD_CASE(5, 1) FORWARD_CASE(5, 2)
            forward_row(xn, w, yr, H, W, C, OW, oh, k, s, p);
        }
}

/* At stride 1 the input gradient is a forward pass over the output gradient with the filter
 * turned 180 degrees (w_flipped, laid out as w) and padding k - 1 - p. */
void depthwise_backward_input(const float *restrict dy, const float *restrict w_flipped, float *restrict dx,
                              int64_t N, int64_t H, int64_t W, int64_t C, int64_t OH, int64_t OW, int k, int p,
                              int nthreads) {
    depthwise_forward(dy, w_flipped, dx, N, OH, OW, C, H, W, k, 1, k - 1 - p, nthreads);
}

/* Weight gradient of one output row, 16 channels: acc[ij] += dy[ow] * x[oh*s+i-p][ow*s+j-p]. */
static inline __attribute__((always_inline)) void weight_row(
    const float *restrict dy, const float *restrict x, v16 *restrict acc, int64_t H, int64_t W, int64_t C,
    int64_t OW, int64_t oh, int64_t c0, const int k, const int s, const int p) {
    for (int i = 0; i < k; i++) {
        int64_t h = oh * s + i - p;
        if (h < 0 || h >= H) continue;
        const float *xr = x + h * W * C + c0;
        v16 a[8]; /* k <= 8 taps of this filter row, in registers */
        for (int j = 0; j < k; j++) a[j] = acc[i * k + j];
        for (int64_t ow = 0; ow < OW; ow++) {
            v16 g = ld(dy + ow * C + c0);
            for (int j = 0; j < k; j++) {
                int64_t col = ow * s + j - p;
                if (col < 0 || col >= W) continue;
                a[j] += g * ld(xr + col * C);
            }
        }
        for (int j = 0; j < k; j++) acc[i * k + j] = a[j];
    }
}

#define WEIGHT_CASE(K, S) \
    if (k == K && s == S) weight_row(dyr, xn, acc, H, W, C, OW, oh, c0, K, S, p); else

/* dw[ij][c] = sum over n, oh, ow of dy[n][oh][ow][c] * x[n][oh*s+i-p][ow*s+j-p][c], for k <= 8.
 * Each image's sums are kept in float (at most OH*OW terms), images are added in double. */
void depthwise_backward_weight(const float *restrict dy, const float *restrict x, float *restrict dw, int64_t N,
                               int64_t H, int64_t W, int64_t C, int64_t OH, int64_t OW, int k, int s, int p,
                               int nthreads) {
    int64_t KK = (int64_t)k * k, blocks = (C + 15) / 16;
    double *total = calloc(KK * C, sizeof(double));
#pragma omp parallel num_threads(nthreads)
    {
        double *mine = calloc(KK * C, sizeof(double));
        v16 *img = aligned_alloc(64, blocks * KK * sizeof(v16)); /* [block][tap] vectors */
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            memset(img, 0, blocks * KK * sizeof(v16));
            const float *xn = x + n * H * W * C;
            for (int64_t oh = 0; oh < OH; oh++) {
                const float *dyr = dy + (n * OH + oh) * OW * C;
                for (int64_t b = 0; b < blocks; b++) {
                    int64_t c0 = block_start(b * 16, C);
                    v16 *acc = img + b * KK;
                    WEIGHT_CASE(3, 1) WEIGHT_CASE(3, 2) WEIGHT_CASE(5, 1) WEIGHT_CASE(5, 2)
                    weight_row(dyr, xn, acc, H, W, C, OW, oh, c0, k, s, p);
                }
            }
            for (int64_t b = 0; b < blocks; b++) {
                int64_t c0 = block_start(b * 16, C), skip = b * 16 - c0; /* lanes the block before already has */
                const float *f = (const float *)(img + b * KK);
                for (int64_t q = 0; q < KK; q++)
                    for (int64_t l = skip; l < 16; l++) mine[q * C + c0 + l] += f[q * 16 + l];
            }
        }
#pragma omp critical
        for (int64_t q = 0; q < KK * C; q++) total[q] += mine[q];
        free(mine);
        free(img);
    }
    for (int64_t q = 0; q < KK * C; q++) dw[q] = (float)total[q];
    free(total);
}
