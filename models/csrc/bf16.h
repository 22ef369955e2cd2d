/* bfloat16 <-> float for the kernels that read or write bf16 maps (training under CPU autocast):
 * a bf16 value is the upper half of a float's bits. Rounding to bf16 is to nearest, ties to even,
 * and a NaN stays a NaN, as PyTorch's own conversion (c10::BFloat16) does, so a kernel's bf16
 * output equals its float output converted by PyTorch. */
#ifndef POINTWISE_ZOO_BF16_H
#define POINTWISE_ZOO_BF16_H
#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return f != f ? (uint16_t)0x7fc0 : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
#endif
