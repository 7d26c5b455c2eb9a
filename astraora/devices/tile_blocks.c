/* Native kernels of the MZI tile engine (astraora/devices/mesh_tiles.py; loaded by native.py).
 *
 * Block build (TiledMesh._blocks in one pass): for every tile of a group and every setting, the
 * identity pushed through the tile's 2L - 1 local columns, written straight into the
 * (settings, tiles, 2L, 2L) layout of the products. The cells' entries T00, T01, T10, T11 come
 * either from `coef`, complex (4, L*L, tiles, K) with empty slots already the identity, or, when
 * `coef` is NULL, from the phases: `theta_t` (2 * cells, K), with strides (cs, ks), holds θ (row 2c) and
 * φ (row 2c + 1) of cell c, `slot_cell` (L*L, tiles) the cell of each slot (-1: empty, the identity), and `cell`
 * picks the formula, CELL_PAPER or CELL_CLASSICAL, the same as MZIMesh.cell_entries and
 * MZIClassical.cell_entries. steps: per local column (s0, s1, r0, c0, c1): its slots [s0, s1), the
 * first row r0 of its wire pairs (r0 + 2j, r0 + 2j + 1) and the block columns [c0, c1) that can be
 * non-zero there. Only tiles [t_begin, t_end) are built (callers split the tiles between threads).
 * Complex numbers are (re, im) pairs.
 *
 * Settings are processed CHUNK at a time with real and imaginary parts in separate arrays, so the
 * innermost loops run over settings and vectorise; a tile's blocks for a chunk stay in L1.
 *
 * Same bits on every CPU: every loop is elementwise over settings (or columns) or sums in a fixed
 * order, and native.py compiles without contraction (-ffp-contract=off, no -ffast-math), so the
 * vector width (SSE2, AVX2, AVX-512) changes how many lanes run at once but not what each computes.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define CHUNK 16
#define CELL_PAPER 0
#define CELL_CLASSICAL 1

/* sin and cos of a float32 phase without a library call, so that loops over settings vectorise:
 * reduction by multiples of π/4 in three parts, then the minimax polynomials of the single-
 * precision sine and cosine on [-π/4, π/4] (the classical Cephes coefficients); ≈ 1 ulp for
 * |x| < 8192, far beyond any phase a device is programmed with. */
static inline void sincos_f32(float x, float *sp, float *cp) {
    const float ax = fabsf(x);
    const int j = ((int)(ax * 1.27323954473516f) + 1) & ~1;
    const float y = (float)j;
    const float z = ((ax - y * 0.78515625f) - y * 2.4187564849853515625e-4f) - y * 3.77489497744594108e-8f;
    const float zz = z * z;
    const float ps = ((-1.9515295891e-4f * zz + 8.3321608736e-3f) * zz - 1.6666654611e-1f) * zz * z + z;
    const float pc = ((2.443315711809948e-5f * zz - 1.388731625493765e-3f) * zz + 4.166664568298827e-2f) * zz * zz
                     - 0.5f * zz + 1.0f;
    const int q = j & 7; /* 0, 2, 4 or 6: the multiple of π/4 taken off, modulo 2π */
    float s = (q == 2 || q == 6) ? pc : ps, c = (q == 2 || q == 6) ? ps : pc;
    s = q >= 4 ? -s : s;
    c = (q == 2 || q == 4) ? -c : c;
    *sp = x < 0 ? -s : s;
    *cp = c;
}

static inline void sincos_f64(double x, double *sp, double *cp) {
    *sp = sin(x);
    *cp = cos(x);
}

#define DEFINE_BUILD(NAME, T, SINCOS)                                                              \
void NAME(const T *coef, const T *theta_t, int64_t cs, int64_t ks, const int64_t *slot_cell, int cell, \
          T *out, int64_t K, int64_t tiles, int64_t t_begin, int64_t t_end, int64_t L,             \
          const int32_t *steps, int64_t nsteps) {                                                  \
    const int64_t W = 2 * L, L2 = L * L, plane = L2 * tiles * K;                                   \
    const T half_sqrt2 = (T)0.70710678118654752440;                                                \
    T bre[W * W * CHUNK], bim[W * W * CHUNK];                                                      \
    T cr[4][CHUNK], ci[4][CHUNK];                                                                  \
    for (int64_t t = t_begin; t < t_end; t++) { /* a range of the tiles: threads split them */     \
        for (int64_t k0 = 0; k0 < K; k0 += CHUNK) {                                                \
            const int64_t kc = K - k0 < CHUNK ? K - k0 : CHUNK;                                    \
            memset(bre, 0, sizeof(bre));                                                           \
            memset(bim, 0, sizeof(bim));                                                           \
            for (int64_t i = 0; i < W; i++)                                                        \
                for (int64_t k = 0; k < CHUNK; k++) bre[(i * W + i) * CHUNK + k] = 1;              \
            for (int64_t s = 0; s < nsteps; s++) {                                                 \
                const int32_t *st = steps + 5 * s;                                                 \
                for (int64_t j = 0; j < st[1] - st[0]; j++) {                                      \
                    const int64_t slot = st[0] + j, r = st[2] + 2 * j;                             \
                    memset(cr, 0, sizeof(cr));                                                     \
                    memset(ci, 0, sizeof(ci));                                                     \
                    if (coef) {                                                                    \
                        for (int e = 0; e < 4; e++) {                                              \
                            const T *src = coef + 2 * (e * plane + (slot * tiles + t) * K + k0);   \
                            for (int64_t k = 0; k < kc; k++) {                                     \
                                cr[e][k] = src[2 * k];                                             \
                                ci[e][k] = src[2 * k + 1];                                         \
                            }                                                                      \
                        }                                                                          \
                    } else if (slot_cell[slot * tiles + t] < 0) { /* empty slot: the identity */   \
                        for (int64_t k = 0; k < CHUNK; k++) cr[0][k] = cr[3][k] = 1;               \
                    } else {                                                                       \
                        /* all CHUNK lanes, the last setting repeated past K: every setting goes   \
                         * through the same (vector) code, so its result does not depend on how    \
                         * many settings share the call */                                         \
                        const T *th = theta_t + 2 * slot_cell[slot * tiles + t] * cs + k0 * ks;    \
                        const T *ph = th + cs;                                                     \
                        T tv[CHUNK], pv[CHUNK];                                                    \
                        for (int64_t k = 0; k < CHUNK; k++) {                                      \
                            tv[k] = th[(k < kc ? k : kc - 1) * ks];                                \
                            pv[k] = ph[(k < kc ? k : kc - 1) * ks];                                \
                        }                                                                          \
                        if (cell == CELL_PAPER)                                                    \
                            for (int64_t k = 0; k < CHUNK; k++) {                                  \
                                T sa, ca, sb, cb;                                                  \
                                SINCOS((tv[k] - pv[k]) / 2, &sa, &ca);                             \
                                SINCOS((tv[k] + pv[k]) / 2, &sb, &cb);                             \
                                const T c = cb * half_sqrt2, s = sb * half_sqrt2;                  \
                                cr[0][k] = c * sa - s * sb;   ci[0][k] = s * (sa + cb);            \
                                cr[1][k] = -c * (ca + sb);    ci[1][k] = c * cb - s * ca;          \
                                cr[2][k] = c * (ca - sb);     ci[2][k] = s * ca + c * cb;          \
                                cr[3][k] = c * sa + s * sb;   ci[3][k] = s * (sa - cb);            \
                            }                                                                      \
                        else                                                                       \
                            for (int64_t k = 0; k < CHUNK; k++) {                                  \
                                T st_, ct, sp, cp;                                                 \
                                SINCOS(tv[k], &st_, &ct);                                          \
                                SINCOS(pv[k], &sp, &cp);                                           \
                                cr[0][k] = cp * st_;  ci[0][k] = sp * st_;                         \
                                cr[1][k] = cp * ct;   ci[1][k] = sp * ct;                          \
                                cr[2][k] = ct;                                                     \
                                cr[3][k] = -st_;                                                   \
                            }                                                                      \
                    }                                                                              \
                    for (int64_t c = st[3]; c < st[4]; c++) {                                      \
                        T *ur = bre + (r * W + c) * CHUNK, *ui = bim + (r * W + c) * CHUNK;        \
                        T *lr = bre + ((r + 1) * W + c) * CHUNK, *li = bim + ((r + 1) * W + c) * CHUNK; \
                        for (int64_t k = 0; k < CHUNK; k++) {                                      \
                            const T xr = ur[k], xi = ui[k], yr = lr[k], yi = li[k];                \
                            ur[k] = cr[0][k] * xr - ci[0][k] * xi + cr[1][k] * yr - ci[1][k] * yi; \
                            ui[k] = cr[0][k] * xi + ci[0][k] * xr + cr[1][k] * yi + ci[1][k] * yr; \
                            lr[k] = cr[2][k] * xr - ci[2][k] * xi + cr[3][k] * yr - ci[3][k] * yi; \
                            li[k] = cr[2][k] * xi + ci[2][k] * xr + cr[3][k] * yi + ci[3][k] * yr; \
                        }                                                                          \
                    }                                                                              \
                }                                                                                  \
            }                                                                                      \
            for (int64_t k = 0; k < kc; k++) {                                                     \
                T *dst = out + 2 * ((k0 + k) * tiles + t) * W * W;                                 \
                for (int64_t i = 0; i < W * W; i++) {                                              \
                    dst[2 * i] = bre[i * CHUNK + k];                                               \
                    dst[2 * i + 1] = bim[i * CHUNK + k];                                           \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
}

DEFINE_BUILD(astraora_tile_blocks_f32, float, sincos_f32)
DEFINE_BUILD(astraora_tile_blocks_f64, double, sincos_f64)

/* The tile engine's products: out[i] = A[i] X[i] for i < count, complex, A[i] (W, W) at
 * a + i * astride (complex elements: the blocks of one factor are strided in a group's block
 * tensor), X[i] and out[i] (W, B) contiguous one after the other. Vectorised over B with the
 * compiler's vector extensions (whatever width the CPU has): a complex row x = (re, im, re, im…)
 * times a complex scalar is ar·x + ai·x̃ with x̃ = (−im, re, …), so each product is two
 * multiply-adds per vector and the rows of X stay in registers across the W rows of A. The columns
 * left over after the last whole vector go through the same vector code on a zero-padded copy: a
 * scalar loop there was turned into fused complex multiply-adds (vfmaddsub) by GCC 12's vectoriser
 * even with -ffp-contract=off, and gave other bits with AVX2 than with SSE2. */
#define DEFINE_GEMM(NAME, T, VEC, SWAP, SIGN)                                                    \
static inline __attribute__((always_inline)) void NAME##_w(const T *a, int64_t astride, const T *x, \
        T *out, int64_t count, const int64_t W, int64_t B) {                                       \
    const int64_t V = sizeof(VEC) / sizeof(T) / 2; /* complex numbers per vector */               \
    const VEC sign = SIGN;                                                                         \
    for (int64_t m = 0; m < count; m++) {                                                          \
        const T *A = a + 2 * m * astride, *X = x + 2 * m * W * B;                                  \
        T *O = out + 2 * m * W * B;                                                                \
        int64_t b0 = 0;                                                                            \
        for (; b0 + V <= B; b0 += V) {                                                             \
            VEC xs[16], xw[16];                                                                    \
            for (int64_t j = 0; j < W; j++) {                                                      \
                memcpy(&xs[j], X + 2 * (j * B + b0), sizeof(VEC));                                 \
                xw[j] = SWAP(xs[j]) * sign;                                                        \
            }                                                                                      \
            for (int64_t i = 0; i < W; i++) {                                                      \
                VEC acc = {0};                                                                     \
                for (int64_t j = 0; j < W; j++)                                                    \
                    acc += A[2 * (i * W + j)] * xs[j] + A[2 * (i * W + j) + 1] * xw[j];            \
                memcpy(O + 2 * (i * B + b0), &acc, sizeof(acc));                                   \
            }                                                                                      \
        }                                                                                          \
        if (b0 < B) { /* the columns left over: the same vector code on a zero-padded copy */      \
            const int64_t n = B - b0;                                                              \
            VEC xs[16], xw[16];                                                                    \
            for (int64_t j = 0; j < W; j++) {                                                      \
                memset(&xs[j], 0, sizeof(VEC));                                                    \
                memcpy(&xs[j], X + 2 * (j * B + b0), 2 * n * sizeof(T));                           \
                xw[j] = SWAP(xs[j]) * sign;                                                        \
            }                                                                                      \
            for (int64_t i = 0; i < W; i++) {                                                      \
                VEC acc = {0};                                                                     \
                for (int64_t j = 0; j < W; j++)                                                    \
                    acc += A[2 * (i * W + j)] * xs[j] + A[2 * (i * W + j) + 1] * xw[j];            \
                memcpy(O + 2 * (i * B + b0), &acc, 2 * n * sizeof(T));                             \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
}                                                                                                  \
void NAME(const T *a, int64_t astride, const T *x, T *out, int64_t count, int64_t W, int64_t B) {  \
    /* W ≤ 16 (tiles of up to 8 × 8 cells); the usual widths get their own unrolled copy */        \
    if (W == 8) NAME##_w(a, astride, x, out, count, 8, B);                                         \
    else if (W == 16) NAME##_w(a, astride, x, out, count, 16, B);                                  \
    else if (W == 4) NAME##_w(a, astride, x, out, count, 4, B);                                    \
    else NAME##_w(a, astride, x, out, count, W, B);                                                \
}

typedef float astraora_f32x16 __attribute__((vector_size(64)));
typedef double astraora_f64x8 __attribute__((vector_size(64)));
typedef int32_t astraora_i32x16 __attribute__((vector_size(64)));
typedef int64_t astraora_i64x8 __attribute__((vector_size(64)));

/* (re, im, re, im, …) → (im, re, im, re, …) */
static inline astraora_f32x16 swap_f32(astraora_f32x16 v) {
#if defined(__clang__)
    return __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
#else
    return __builtin_shuffle(v, (astraora_i32x16){1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
#endif
}

static inline astraora_f64x8 swap_f64(astraora_f64x8 v) {
#if defined(__clang__)
    return __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6);
#else
    return __builtin_shuffle(v, (astraora_i64x8){1, 0, 3, 2, 5, 4, 7, 6});
#endif
}

DEFINE_GEMM(astraora_tile_gemm_f32, float, astraora_f32x16, swap_f32,
            ((astraora_f32x16){-1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1}))
DEFINE_GEMM(astraora_tile_gemm_f64, double, astraora_f64x8, swap_f64, ((astraora_f64x8){-1, 1, -1, 1, -1, 1, -1, 1}))
