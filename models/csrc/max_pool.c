/* Max pooling for training, channels-last float32 or bf16 maps; models/pool.py calls it.
 *
 * PyTorch's CPU max-pool keeps an int64 index per output value for the backward, and its backward
 * zero-fills the whole input gradient and then scatters the output gradient into it: for a 3x3
 * stride-2 pool that is two passes over the input-sized gradient and an index four times the size
 * of a bf16 output. Here the index is one byte, the window position of the maximum (k*k <= 255), and
 * the backward gathers instead: each input value's gradient is written once, the sum of the output
 * gradients of the windows (at most ceil(k/s)^2) whose maximum it was.
 *
 * The maximum is PyTorch's: the window is scanned row by row, a value replaces the running maximum
 * when it is greater or NaN (so a NaN wins, the last one seen), and the index starts at the window's
 * first position inside the map. A gradient gathered from several windows is summed in float in
 * the order PyTorch's scatter adds it (windows in output order) and, for bf16, rounded once. Padding
 * counts as -inf; no dilation, no ceil mode. Work is split over images; within an image, output
 * rows. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define AS_FLOAT(v) (v)
#define MAX_POOL(NAME, T, LD, ST)                                                                       \
    void max_pool_forward##NAME(const T *restrict x, T *restrict y, uint8_t *restrict idx, int64_t N,   \
                                int64_t H, int64_t W, int64_t C, int64_t OH, int64_t OW, int k, int s, \
                                int p, int nthreads) {                                                 \
        _Pragma("omp parallel num_threads(nthreads)") {                                               \
            float *m = malloc(C * sizeof(float));                                                      \
            _Pragma("omp for schedule(static)") for (int64_t n = 0; n < N; n++) {                      \
                const T *xn = x + n * H * W * C;                                                       \
                for (int64_t oh = 0; oh < OH; oh++)                                                    \
                    for (int64_t ow = 0; ow < OW; ow++) {                                              \
                        int64_t h0 = oh * s - p, w0 = ow * s - p;                                      \
                        int64_t i0 = h0 < 0 ? -h0 : 0, j0 = w0 < 0 ? -w0 : 0;                          \
                        int64_t i1 = h0 + k > H ? H - h0 : k, j1 = w0 + k > W ? W - w0 : k;            \
                        uint8_t *id = idx + ((n * OH + oh) * OW + ow) * C;                             \
                        uint8_t first = (uint8_t)(i0 * k + j0);                                        \
                        _Pragma("omp simd") for (int64_t c = 0; c < C; c++) {                          \
                            m[c] = -INFINITY;                                                          \
                            id[c] = first;                                                             \
                        }                                                                              \
                        for (int64_t i = i0; i < i1; i++)                                              \
                            for (int64_t j = j0; j < j1; j++) {                                        \
                                const T *xp = xn + ((h0 + i) * W + w0 + j) * C;                        \
                                uint8_t q = (uint8_t)(i * k + j);                                      \
                                _Pragma("omp simd") for (int64_t c = 0; c < C; c++) {                  \
                                    float v = LD(xp[c]);                                               \
                                    int take = v > m[c] || v != v;                                     \
                                    m[c] = take ? v : m[c];                                            \
                                    id[c] = take ? q : id[c];                                          \
                                }                                                                      \
                            }                                                                          \
                        T *yp = y + ((n * OH + oh) * OW + ow) * C;                                     \
                        _Pragma("omp simd") for (int64_t c = 0; c < C; c++) yp[c] = ST(m[c]);          \
                    }                                                                                  \
            }                                                                                          \
            free(m);                                                                                   \
        }                                                                                              \
    }                                                                                                  \
                                                                                                       \
    /* dx[h][w] = sum of dy[oh][ow] over the windows holding (h, w) whose index points at it */       \
    void max_pool_backward##NAME(const T *restrict dy, const uint8_t *restrict idx, T *restrict dx,    \
                                 int64_t N, int64_t H, int64_t W, int64_t C, int64_t OH, int64_t OW,  \
                                 int k, int s, int p, int nthreads) {                                  \
        _Pragma("omp parallel num_threads(nthreads)") {                                               \
            float *g = malloc(C * sizeof(float));                                                      \
            _Pragma("omp for schedule(static)") for (int64_t n = 0; n < N; n++)                        \
                for (int64_t h = 0; h < H; h++) {                                                      \
                    /* output rows whose window holds row h: oh * s - p <= h < oh * s - p + k */       \
                    int64_t oh0 = h + p - k + 1 <= 0 ? 0 : (h + p - k + s) / s;                        \
                    int64_t oh1 = (h + p) / s < OH - 1 ? (h + p) / s : OH - 1;                         \
                    for (int64_t w = 0; w < W; w++) {                                                  \
                        int64_t ow0 = w + p - k + 1 <= 0 ? 0 : (w + p - k + s) / s;                    \
                        int64_t ow1 = (w + p) / s < OW - 1 ? (w + p) / s : OW - 1;                     \
                        memset(g, 0, C * sizeof(float));                                               \
                        for (int64_t oh = oh0; oh <= oh1; oh++)                                        \
                            for (int64_t ow = ow0; ow <= ow1; ow++) {                                  \
                                uint8_t q = (uint8_t)((h - (oh * s - p)) * k + (w - (ow * s - p)));    \
                                int64_t o = ((n * OH + oh) * OW + ow) * C;                             \
                                const uint8_t *id = idx + o;                                           \
                                const T *dp = dy + o;                                                  \
                                _Pragma("omp simd") for (int64_t c = 0; c < C; c++)                    \
                                    g[c] += id[c] == q ? LD(dp[c]) : 0.f;                              \
                            }                                                                          \
                        T *dxp = dx + ((n * H + h) * W + w) * C;                                       \
                        _Pragma("omp simd") for (int64_t c = 0; c < C; c++) dxp[c] = ST(g[c]);         \
                    }                                                                                  \
                }                                                                                      \
            free(g);                                                                                   \
        }                                                                                              \
    }

MAX_POOL(, float, AS_FLOAT, AS_FLOAT)
MAX_POOL(_bf16, uint16_t, bf16_to_float, float_to_bf16)
