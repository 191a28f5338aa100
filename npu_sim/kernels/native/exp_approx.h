/* exp_approx: the fp32 exp of the softmaxes and SiLU, shared by cpu_kernels.c and attention.c. */
#ifndef XY_EXP_APPROX_H
#define XY_EXP_APPROX_H
#include <stdint.h>
#include <string.h>

/* exp(x) in fp32 within ~1 ulp where softmax and SiLU use it; vectorisable (no libm call).
 * exp(x) = 2^n 2^f with n = round(x log2 e) and f in [-0.5, 0.5]; 2^f by its degree-7 Taylor
 * polynomial (truncation error < 1e-8). Adding and subtracting 1.5 * 2^23 rounds to nearest. */
static inline float exp_approx(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float t = x * 1.44269504088896341f;
    float n = (t + 12582912.0f) - 12582912.0f;
    float f = t - n;
    float p = 1.5252734e-5f;
    p = p * f + 1.5403530e-4f;
    p = p * f + 1.3333558e-3f;
    p = p * f + 9.6181291e-3f;
    p = p * f + 5.5504109e-2f;
    p = p * f + 2.4022651e-1f;
    p = p * f + 6.9314718e-1f;
    p = p * f + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

#endif
