/* Native kernels of the MZI tile engine (astraora/devices/mesh_tiles.py; loaded by native.py, whose
 * typed wrappers check every argument before it reaches these functions).
 *
 * Block build (TiledMesh._blocks in one pass): for every tile of a group and every setting, the
 * identity pushed through the tile's 2L - 1 local columns, written straight into the
 * (settings, tiles, 2L, 2L) layout of the products. The cells' entries T00, T01, T10, T11 come
 * either from given entries (astraora_blocks_from_entries_*: `coef`, complex (4, L*L, tiles, K),
 * empty slots already the identity) or from the phases (astraora_blocks_from_phases_*: `theta_t`
 * (2 * cells, K) with strides (cs, ks) holds θ (row 2c) and φ (row 2c + 1) of cell c, `slot_cell`
 * (L*L, tiles) the cell of each slot (-1: empty, the identity), and `cell` picks the formula,
 * CELL_PAPER or CELL_CLASSICAL). steps: per local column (s0, s1, r0, c0, c1): its slots [s0, s1),
 * the first row r0 of its wire pairs (r0 + 2j, r0 + 2j + 1) and the block columns [c0, c1) that can
 * be non-zero there. Only tiles [t_begin, t_end) are built (callers split the tiles between
 * threads). Complex numbers are (re, im) pairs.
 *
 * Settings are processed CHUNK at a time with real and imaginary parts in separate arrays, so the
 * innermost loops run over settings and vectorise; a tile's blocks for a chunk stay in L1.
 *
 * Same bits on every CPU: every loop is elementwise over settings (or columns) or sums in a fixed
 * order, and native.py compiles without contraction (-ffp-contract=off, no -ffast-math), so the
 * vector width (SSE2, AVX2, AVX-512) changes how many lanes run at once but not what each computes.
 *
 * Layout of this file: the definitions shared by both precisions, then the per-precision part
 * (after the #else at the end), which this file includes twice, once with T = float (names ending
 * in _f32) and once with T = double (_f64): plain static inline functions, so that compiler
 * messages point at their own lines.
 */
#ifndef T /* ---------------------------------------------------------------- shared definitions */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define CHUNK 16
enum { CELL_PAPER = 0, CELL_CLASSICAL = 1 }; /* native.CELL_PAPER, native.CELL_CLASSICAL */
#define CONCAT2(a, b) a##b
#define CONCAT(a, b) CONCAT2(a, b)
#define FN(name) CONCAT(name, SUFFIX) /* name_f32 or name_f64 */

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

/* Vectors for the products (whatever width the CPU has; 64 bytes is what AVX-512 holds). */
typedef float vec_f32 __attribute__((vector_size(64)));
typedef double vec_f64 __attribute__((vector_size(64)));
typedef int32_t ivec_f32 __attribute__((vector_size(64)));
typedef int64_t ivec_f64 __attribute__((vector_size(64)));
static const vec_f32 conj_sign_f32 = {-1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1};
static const vec_f64 conj_sign_f64 = {-1, 1, -1, 1, -1, 1, -1, 1};

/* (re, im, re, im, …) → (im, re, im, re, …) */
static inline vec_f32 swap_f32(vec_f32 v) {
#if defined(__clang__)
    return __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
#else
    return __builtin_shuffle(v, (ivec_f32){1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
#endif
}

static inline vec_f64 swap_f64(vec_f64 v) {
#if defined(__clang__)
    return __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6);
#else
    return __builtin_shuffle(v, (ivec_f64){1, 0, 3, 2, 5, 4, 7, 6});
#endif
}

#define T float
#define SUFFIX _f32
#include "tile_blocks.c" /* this file again, for the part after #else */
#undef T
#undef SUFFIX
#define T double
#define SUFFIX _f64
#include "tile_blocks.c" /* this file again, for the part after #else */
#undef T
#undef SUFFIX

#else /* ------------------------------------------------- one precision: T is float or double */

/* The entries T00, T01, T10, T11 of one cell, real and imaginary parts. */
struct FN(entries) {
    T re[4], im[4];
};

/* The paper's cell; mirrors astraora.devices.mzi.paper_cell_entries (tests/test_native.py compares
 * them). T = e^{iβ}/√2 [[sin α + i sin β, −cos α + i cos β], [cos α + i cos β, sin α − i sin β]],
 * α = (θ − φ)/2, β = (θ + φ)/2, multiplied out with c = cos β/√2, s = sin β/√2 (a product by 1/√2
 * here, a quotient by √2 there: the two agree to round-off). */
static inline struct FN(entries) FN(paper_cell)(T theta, T phi) {
    const T half_sqrt2 = (T)0.70710678118654752440;
    T sa, ca, sb, cb;
    FN(sincos)((theta - phi) / 2, &sa, &ca);
    FN(sincos)((theta + phi) / 2, &sb, &cb);
    const T c = cb * half_sqrt2, s = sb * half_sqrt2;
    struct FN(entries) e;
    e.re[0] = c * sa - s * sb;
    e.im[0] = s * (sa + cb);
    e.re[1] = -c * (ca + sb);
    e.im[1] = c * cb - s * ca;
    e.re[2] = c * (ca - sb);
    e.im[2] = s * ca + c * cb;
    e.re[3] = c * sa + s * sb;
    e.im[3] = s * (sa - cb);
    return e;
}

/* The classical cell, splitting angle θ first, external phase φ second; mirrors
 * astraora.devices.mzi.classical_cell_entries: [[e^{iφ} sin θ, e^{iφ} cos θ], [cos θ, −sin θ]]. */
static inline struct FN(entries) FN(classical_cell)(T theta, T phi) {
    T st, ct, sp, cp;
    FN(sincos)(theta, &st, &ct);
    FN(sincos)(phi, &sp, &cp);
    struct FN(entries) e;
    e.re[0] = cp * st;
    e.im[0] = sp * st;
    e.re[1] = cp * ct;
    e.im[1] = sp * ct;
    e.re[2] = ct;
    e.im[2] = 0;
    e.re[3] = -st;
    e.im[3] = 0;
    return e;
}

static inline void FN(store_entries)(struct FN(entries) e, int64_t k, T cr[4][CHUNK], T ci[4][CHUNK]) {
    cr[0][k] = e.re[0], cr[1][k] = e.re[1], cr[2][k] = e.re[2], cr[3][k] = e.re[3];
    ci[0][k] = e.im[0], ci[1][k] = e.im[1], ci[2][k] = e.im[2], ci[3][k] = e.im[3];
}

/* A slot's entries for the chunk of settings [k0, k0 + kc) from the given entries `coef`. */
static inline void FN(copy_entries)(const T *coef, int64_t plane, int64_t index, int64_t kc, T cr[4][CHUNK],
                                    T ci[4][CHUNK]) {
    memset(cr, 0, 4 * CHUNK * sizeof(T));
    memset(ci, 0, 4 * CHUNK * sizeof(T));
    for (int e = 0; e < 4; e++) {
        const T *src = coef + 2 * (e * plane + index);
        for (int64_t k = 0; k < kc; k++) {
            cr[e][k] = src[2 * k];
            ci[e][k] = src[2 * k + 1];
        }
    }
}

/* A slot's entries for the chunk of settings from cell `index`'s phases (-1: the identity). All CHUNK
 * lanes are computed, the last setting repeated past kc: every setting goes through the same (vector)
 * code, so its result does not depend on how many settings share the call. */
static inline void FN(cell_entries)(const T *theta_t, int64_t cs, int64_t ks, int64_t index, int cell, int64_t k0,
                                    int64_t kc, T cr[4][CHUNK], T ci[4][CHUNK]) {
    memset(cr, 0, 4 * CHUNK * sizeof(T));
    memset(ci, 0, 4 * CHUNK * sizeof(T));
    if (index < 0) { /* empty slot: the identity */
        for (int64_t k = 0; k < CHUNK; k++) cr[0][k] = cr[3][k] = 1;
        return;
    }
    const T *th = theta_t + 2 * index * cs + k0 * ks, *ph = th + cs;
    T tv[CHUNK], pv[CHUNK];
    for (int64_t k = 0; k < CHUNK; k++) {
        tv[k] = th[(k < kc ? k : kc - 1) * ks];
        pv[k] = ph[(k < kc ? k : kc - 1) * ks];
    }
    if (cell == CELL_PAPER) /* one loop per formula: each vectorises over the settings */
        for (int64_t k = 0; k < CHUNK; k++) FN(store_entries)(FN(paper_cell)(tv[k], pv[k]), k, cr, ci);
    else
        for (int64_t k = 0; k < CHUNK; k++) FN(store_entries)(FN(classical_cell)(tv[k], pv[k]), k, cr, ci);
}

/* One cell applied to rows r, r + 1 of a chunk's blocks (real parts bre, imaginary bim, each
 * (W, W, CHUNK)), in the block columns [c0, c1). */
static inline void FN(mix_rows)(T *bre, T *bim, int64_t W, int64_t r, int64_t c0, int64_t c1, T cr[4][CHUNK],
                                T ci[4][CHUNK]) {
    for (int64_t c = c0; c < c1; c++) {
        T *ur = bre + (r * W + c) * CHUNK, *ui = bim + (r * W + c) * CHUNK;
        T *lr = bre + ((r + 1) * W + c) * CHUNK, *li = bim + ((r + 1) * W + c) * CHUNK;
        for (int64_t k = 0; k < CHUNK; k++) {
            const T xr = ur[k], xi = ui[k], yr = lr[k], yi = li[k];
            ur[k] = cr[0][k] * xr - ci[0][k] * xi + cr[1][k] * yr - ci[1][k] * yi;
            ui[k] = cr[0][k] * xi + ci[0][k] * xr + cr[1][k] * yi + ci[1][k] * yr;
            lr[k] = cr[2][k] * xr - ci[2][k] * xi + cr[3][k] * yr - ci[3][k] * yi;
            li[k] = cr[2][k] * xi + ci[2][k] * xr + cr[3][k] * yi + ci[3][k] * yr;
        }
    }
}

/* The block build; `coef` NULL: the entries from the phases (see the top of this file). */
static inline __attribute__((always_inline)) void FN(build)(const T *coef, const T *theta_t, int64_t cs, int64_t ks,
                                                            const int64_t *slot_cell, int cell, T *out, int64_t K,
                                                            int64_t tiles, int64_t t_begin, int64_t t_end, int64_t L,
                                                            const int32_t *steps, int64_t nsteps) {
    const int64_t W = 2 * L, plane = L * L * tiles * K;
    T bre[W * W * CHUNK], bim[W * W * CHUNK];
    T cr[4][CHUNK], ci[4][CHUNK];
    for (int64_t t = t_begin; t < t_end; t++) { /* a range of the tiles: threads split them */
        for (int64_t k0 = 0; k0 < K; k0 += CHUNK) {
            const int64_t kc = K - k0 < CHUNK ? K - k0 : CHUNK;
            memset(bre, 0, sizeof(bre));
            memset(bim, 0, sizeof(bim));
            for (int64_t i = 0; i < W; i++)
                for (int64_t k = 0; k < CHUNK; k++) bre[(i * W + i) * CHUNK + k] = 1;
            for (int64_t s = 0; s < nsteps; s++) {
                const int32_t *st = steps + 5 * s;
                for (int64_t j = 0; j < st[1] - st[0]; j++) {
                    const int64_t slot = st[0] + j;
                    if (coef)
                        FN(copy_entries)(coef, plane, (slot * tiles + t) * K + k0, kc, cr, ci);
                    else
                        FN(cell_entries)(theta_t, cs, ks, slot_cell[slot * tiles + t], cell, k0, kc, cr, ci);
                    FN(mix_rows)(bre, bim, W, st[2] + 2 * j, st[3], st[4], cr, ci);
                }
            }
            for (int64_t k = 0; k < kc; k++) {
                T *dst = out + 2 * ((k0 + k) * tiles + t) * W * W;
                for (int64_t i = 0; i < W * W; i++) {
                    dst[2 * i] = bre[i * CHUNK + k];
                    dst[2 * i + 1] = bim[i * CHUNK + k];
                }
            }
        }
    }
}

/* Blocks (K, tiles, 2L, 2L) from given cell entries coef (4, L*L, tiles, K); native.tile_blocks. */
void FN(astraora_blocks_from_entries)(const T *coef, T *out, int64_t K, int64_t tiles, int64_t t_begin, int64_t t_end,
                                      int64_t L, const int32_t *steps, int64_t nsteps) {
    FN(build)(coef, NULL, 0, 0, NULL, 0, out, K, tiles, t_begin, t_end, L, steps, nsteps);
}

/* Blocks (K, tiles, 2L, 2L) with the entries of a built-in cell from the phases; native.cell_blocks. */
void FN(astraora_blocks_from_phases)(const T *theta_t, int64_t cs, int64_t ks, const int64_t *slot_cell, int32_t cell,
                                     T *out, int64_t K, int64_t tiles, int64_t t_begin, int64_t t_end, int64_t L,
                                     const int32_t *steps, int64_t nsteps) {
    FN(build)(NULL, theta_t, cs, ks, slot_cell, cell, out, K, tiles, t_begin, t_end, L, steps, nsteps);
}

/* The tile engine's products: out[i] = A[i] X[i] for i < count, complex, A[i] (W, W) at
 * a + i * astride (complex elements: the blocks of one factor are strided in a group's block
 * tensor), X[i] and out[i] (W, B) contiguous one after the other. Vectorised over B with the
 * compiler's vector extensions: a complex row x = (re, im, re, im…) times a complex scalar is
 * ar·x + ai·x̃ with x̃ = (−im, re, …), so each product is two multiply-adds per vector and the rows
 * of X stay in registers across the W rows of A. The columns left over after the last whole vector
 * go through the same vector code on a zero-padded copy: a scalar loop there was turned into fused
 * complex multiply-adds (vfmaddsub) by GCC 12's vectoriser even with -ffp-contract=off, and gave
 * other bits with AVX2 than with SSE2. */
#define V ((int64_t)(sizeof(FN(vec)) / sizeof(T) / 2)) /* complex numbers per vector */

/* Rows [0, W) of one product for the V columns from b0 held in xs (and x̃ in xw); `bytes` of each
 * output row written (fewer for the columns left over). */
static inline __attribute__((always_inline)) void FN(gemm_panel)(const T *A, const FN(vec) *xs, const FN(vec) *xw,
                                                                 T *O, int64_t W, int64_t B, int64_t b0, size_t bytes) {
    for (int64_t i = 0; i < W; i++) {
        FN(vec) acc = {0};
        for (int64_t j = 0; j < W; j++) acc += A[2 * (i * W + j)] * xs[j] + A[2 * (i * W + j) + 1] * xw[j];
        memcpy(O + 2 * (i * B + b0), &acc, bytes);
    }
}

static inline __attribute__((always_inline)) void FN(gemm_w)(const T *a, int64_t astride, const T *x, T *out,
                                                             int64_t count, const int64_t W, int64_t B) {
    for (int64_t m = 0; m < count; m++) {
        const T *A = a + 2 * m * astride, *X = x + 2 * m * W * B;
        T *O = out + 2 * m * W * B;
        FN(vec) xs[16], xw[16];
        int64_t b0 = 0;
        for (; b0 + V <= B; b0 += V) {
            for (int64_t j = 0; j < W; j++) {
                memcpy(&xs[j], X + 2 * (j * B + b0), sizeof(FN(vec)));
                xw[j] = FN(swap)(xs[j]) * FN(conj_sign);
            }
            FN(gemm_panel)(A, xs, xw, O, W, B, b0, sizeof(FN(vec)));
        }
        if (b0 < B) { /* the columns left over: the same vector code on a zero-padded copy */
            const int64_t n = B - b0;
            for (int64_t j = 0; j < W; j++) {
                memset(&xs[j], 0, sizeof(FN(vec)));
                memcpy(&xs[j], X + 2 * (j * B + b0), 2 * n * sizeof(T));
                xw[j] = FN(swap)(xs[j]) * FN(conj_sign);
            }
            FN(gemm_panel)(A, xs, xw, O, W, B, b0, 2 * n * sizeof(T));
        }
    }
}
#undef V

/* out[i] = A[i] X[i]; native.tile_gemm. W ≤ 16 (tiles of up to 8 × 8 cells); the usual widths get
 * their own unrolled copy. */
void FN(astraora_tile_gemm)(const T *a, int64_t astride, const T *x, T *out, int64_t count, int64_t W, int64_t B) {
    if (W == 8)
        FN(gemm_w)(a, astride, x, out, count, 8, B);
    else if (W == 16)
        FN(gemm_w)(a, astride, x, out, count, 16, B);
    else if (W == 4)
        FN(gemm_w)(a, astride, x, out, count, 4, B);
    else
        FN(gemm_w)(a, astride, x, out, count, W, B);
}

#endif
