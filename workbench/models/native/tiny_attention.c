/* Causal self-attention over short blocks on a CPU, forward and backward, in plain C.
 *
 * Loaded by workbench/models/native/__init__.py, which compiles it on first use with the
 * machine's C compiler (one shared library per head size: HEAD is fixed at compile time so the
 * inner loops over it vectorize fully). The math is TinyCausalAttention's in
 * workbench/models/attention.py; tests hold the two to each other and to SDPA. What this saves is not arithmetic but dispatch: at 8 positions a
 * head is a few hundred multiply-adds, and one call here replaces two permute copies, six batched
 * matmuls and the softmax's eight elementwise ops, each a separate PyTorch call.
 *
 * Layouts are the model's rows, read and written in place (no permutes):
 *   qkv  (batch * block, 3 * n_head * HEAD): per row q of every head, then k, then v
 *   out  (batch * block, n_head * HEAD): the heads concatenated
 *   probs (batch * n_head, block, block): the attention weights, saved for the backward;
 *         zero above the diagonal. May be NULL in the forward when no backward follows.
 *
 * Compiled without -ffast-math (which would also flush denormals for the whole process): only
 * reassociation is allowed, so NaN and inf still propagate as they do in PyTorch.
 */
#include <stdint.h>
#include <string.h>

#ifndef HEAD
#error "compile with -DHEAD=<head size>"
#endif
#define MAX_BLOCK 32 /* workbench.models.TINY_BLOCK */

/* e^x for x <= 0 (Cephes' polynomial after reduction by ln 2); 0 below -87, where expf's result
   is denormal or zero; NaN for NaN. Branch-free, so loops over it vectorize. The exponent comes
   from x clamped to [-87, 0] (NaN counts as -87), so the integer conversion is always defined;
   the remainder from x itself, which carries a NaN through. The reduction subtracts ln 2 in two
   parts with explicit fused multiply-adds where the CPU has them, which -fassociative-math leaves
   alone (it merges a plain x - n * a + n * b into one rounded ln 2: 3 ulp on [-4, 0], up to 61
   toward -87). Measured against exp in float64 with FMA: a relative 7.5e-8 at most on
   [-87, 0], under 1 ulp; without FMA, 2.7e-7 on [-4, 0] and 3.7e-6 below. */
static inline float exp_nonpositive(float x)
{
    float clamped = x > -87.0f ? x : -87.0f;
    clamped = clamped < 0.0f ? clamped : 0.0f;
    const float n = __builtin_roundf(clamped * 1.44269504088896341f);
#ifdef __FMA__
    const float r = __builtin_fmaf(n, 2.12194440e-4f, __builtin_fmaf(n, -0.693359375f, x));
#else
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
#endif
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) * (1 << 23);
    float two_to_n;
    memcpy(&two_to_n, &bits, sizeof two_to_n);
    return x < -87.0f ? 0.0f : p * two_to_n;
}

void tiny_attention_forward(const float *qkv, float *out, float *probs, long batch, long block,
                            long n_head, float scale)
{
    const long width = 3 * n_head * HEAD, out_width = n_head * HEAD;
    float scratch[MAX_BLOCK * MAX_BLOCK];
    for (long b = 0; b < batch; b++) {
        const float *rows = qkv + b * block * width;
        for (long h = 0; h < n_head; h++) {
            const float *q = rows + h * HEAD, *k = q + out_width, *v = k + out_width;
            float *p = probs ? probs + (b * n_head + h) * block * block : scratch;
            for (long t = 0; t < block; t++) {
                float *pt = p + t * block, top = -__builtin_inff(), sum = 0.0f;
                for (long s = 0; s <= t; s++) { /* scores = q . k * scale, causal */
                    float dot = 0.0f;
                    for (int d = 0; d < HEAD; d++) dot += q[t * width + d] * k[s * width + d];
                    pt[s] = dot * scale;
                    top = pt[s] > top ? pt[s] : top; /* a NaN score: NaN from exp below */
                }
                for (long s = 0; s <= t; s++) {
                    pt[s] = exp_nonpositive(pt[s] - top);
                    sum += pt[s];
                }
                const float inverse = 1.0f / sum;
                for (long s = 0; s <= t; s++) pt[s] *= inverse;
                for (long s = t + 1; s < block; s++) pt[s] = 0.0f;
                float y[HEAD];
                memset(y, 0, sizeof y);
                for (long s = 0; s <= t; s++)
                    for (int d = 0; d < HEAD; d++) y[d] += pt[s] * v[s * width + d];
                memcpy(out + (b * block + t) * out_width + h * HEAD, y, sizeof y);
            }
        }
    }
}

void tiny_attention_backward(const float *qkv, const float *probs, const float *dout,
                             float *dqkv, long batch, long block, long n_head, float scale)
{
    const long width = 3 * n_head * HEAD, out_width = n_head * HEAD;
    float dscores[MAX_BLOCK * MAX_BLOCK];
    for (long b = 0; b < batch; b++) {
        const float *rows = qkv + b * block * width;
        float *drows = dqkv + b * block * width;
        for (long h = 0; h < n_head; h++) {
            const float *q = rows + h * HEAD, *k = q + out_width, *v = k + out_width;
            const float *dy = dout + b * block * out_width + h * HEAD;
            float *dq = drows + h * HEAD, *dk = dq + out_width, *dv = dk + out_width;
            const float *p = probs + (b * n_head + h) * block * block;
            for (long t = 0; t < block; t++) {
                /* softmax backward with the scale folded in: p * (dp - sum(p * dp)) * scale */
                const float *pt = p + t * block;
                float *dst = dscores + t * block, along = 0.0f;
                for (long s = 0; s <= t; s++) {
                    float dot = 0.0f; /* dp = dy . v */
                    for (int d = 0; d < HEAD; d++) dot += dy[t * out_width + d] * v[s * width + d];
                    dst[s] = dot;
                    along += dot * pt[s];
                }
                for (long s = 0; s <= t; s++) dst[s] = pt[s] * (dst[s] - along) * scale;
                float g[HEAD]; /* dq = dscores @ k */
                memset(g, 0, sizeof g);
                for (long s = 0; s <= t; s++)
                    for (int d = 0; d < HEAD; d++) g[d] += dst[s] * k[s * width + d];
                memcpy(dq + t * width, g, sizeof g);
            }
            for (long s = 0; s < block; s++) { /* dk = dscores^T @ q, dv = p^T @ dy */
                float gk[HEAD], gv[HEAD];
                memset(gk, 0, sizeof gk);
                memset(gv, 0, sizeof gv);
                for (long t = s; t < block; t++) {
                    const float ds = dscores[t * block + s], pts = p[t * block + s];
                    for (int d = 0; d < HEAD; d++) {
                        gk[d] += ds * q[t * width + d];
                        gv[d] += pts * dy[t * out_width + d];
                    }
                }
                memcpy(dk + s * width, gk, sizeof gk);
                memcpy(dv + s * width, gv, sizeof gv);
            }
        }
    }
}
