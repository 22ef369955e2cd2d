/* Max pooling for training, channels-last float32 or bf16 maps with 16 channels or more;
 * models/pool.py calls it.
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
 * counts as -inf; no dilation, no ceil mode. Work is split over images. The forward takes the
 * channels 16 at a time in vector registers; a last block that would run past C starts at C - 16
 * and overlaps the block before, recomputing the same values. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

typedef float v16 __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));
typedef uint8_t v16b __attribute__((vector_size(16)));

static inline int64_t block_start(int64_t c0, int64_t C) { return c0 + 16 > C ? C - 16 : c0; }
static inline v16u bits(v16 v) { v16u u; memcpy(&u, &v, sizeof u); return u; }
static inline v16 as_float(v16u u) { v16 v; memcpy(&v, &u, sizeof v); return v; }
static inline v16u blend(v16u take, v16u a, v16u b) { return (a & take) | (b & ~take); }

/* 16 values as floats, and back (bf16: the upper half of a float's bits; rounded to nearest, ties
 * to even, a NaN kept a NaN, as bf16.h rounds one value) */
static inline v16 load_float(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }
static inline void store_float(float *p, v16 v) { memcpy(p, &v, sizeof v); }
static inline v16 load_bf16(const uint16_t *p) {
    v16h h;
    memcpy(&h, p, sizeof h);
    return as_float(__builtin_convertvector(h, v16u) << 16);
}
static inline void store_bf16(uint16_t *p, v16 v) {
    v16u u = bits(v), nan = (v16u)(v != v);
    v16u r = blend(nan, (v16u){0} + 0x7fc0u, (u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    v16h h = __builtin_convertvector(r, v16h);
    memcpy(p, &h, sizeof h);
}

#define AS_FLOAT(v) (v)
#define MAX_POOL(NAME, T, LOAD, STORE, LD, ST)                                                                  \
    void max_pool_forward##NAME(const T *restrict x, T *restrict y, uint8_t *restrict idx, int64_t N,   \
                                int64_t H, int64_t W, int64_t C, int64_t OH, int64_t OW, int k, int s, \
                                int p, int nthreads) {                                                 \
        _Pragma("omp parallel for schedule(static) num_threads(nthreads)")                             \
        for (int64_t n = 0; n < N; n++)                                                                \
            for (int64_t oh = 0; oh < OH; oh++)                                                        \
                for (int64_t ow = 0; ow < OW; ow++) {                                                  \
                    int64_t h0 = oh * s - p, w0 = ow * s - p;                                          \
                    int64_t i0 = h0 < 0 ? -h0 : 0, j0 = w0 < 0 ? -w0 : 0;                              \
                    int64_t i1 = h0 + k > H ? H - h0 : k, j1 = w0 + k > W ? W - w0 : k;                \
                    int64_t o = ((n * OH + oh) * OW + ow) * C;                                         \
                    for (int64_t cb = 0; cb < C; cb += 16) {                                           \
                        int64_t c0 = block_start(cb, C);                                               \
                        v16 m = (v16){0} - INFINITY;                                                   \
                        v16u id = (v16u){0} + (uint32_t)(i0 * k + j0);                                 \
                        for (int64_t i = i0; i < i1; i++)                                              \
                            for (int64_t j = j0; j < j1; j++) {                                        \
                                v16 v = LOAD(x + ((n * H + h0 + i) * W + w0 + j) * C + c0);            \
                                v16u take = (v16u)(v > m) | (v16u)(v != v);                            \
                                m = as_float(blend(take, bits(v), bits(m)));                          \
                                id = blend(take, (v16u){0} + (uint32_t)(i * k + j), id);              \
                            }                                                                          \
                        STORE(y + o + c0, m);                                                          \
                        v16b ib = __builtin_convertvector(id, v16b);                                   \
                        memcpy(idx + o + c0, &ib, sizeof ib);                                          \
                    }                                                                                  \
                }                                                                                      \
    }                                                                                                  \
                                                                                                       \
    /* dx[h][w] = sum of dy[oh][ow] over the windows holding (h, w) whose index points at it. (Plain     \
     * loops over the channels: blocks of 16 in registers measured 2.9x slower here.) */              \
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

MAX_POOL(, float, load_float, store_float, AS_FLOAT, AS_FLOAT)
MAX_POOL(_bf16, uint16_t, load_bf16, store_bf16, bf16_to_float, float_to_bf16)
