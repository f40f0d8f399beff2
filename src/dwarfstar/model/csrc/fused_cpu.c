/* Fused CPU operations for a decode step: the small work between the matrix products.
 *
 * At one token, each of these moves a few kilobytes, so in torch its cost is the dozens of
 * operator calls it takes (the hyper-connections' Sinkhorn projection alone is about 80), not
 * the arithmetic. Here each is one call on raw float32 buffers, on the calling thread (these
 * are far too small to share out). They compute what the torch code in model/ computes, with
 * the same float32 operations; only the order of the sums differs (and libm's exp, sin, cos
 * against torch's vectorised ones, within an ulp or two).
 *
 * Addresses come as integers (tensor.data_ptr()); the Python side (model/fused_cpu.py) checks
 * shapes, dtypes and contiguity. The dot products and scaled row sums (attention, norms,
 * hyper-connections) have AVX2 and AVX-512 versions, SwiGLU and attention's softmax an AVX2 exp
 * (a polynomial within 2 ulp of libm's), chosen at run time on x86-64; everything has a portable C
 * path.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define HAVE_X86 1
#define AVX2 __attribute__((target("avx2,fma")))
#define AVX512 __attribute__((target("avx512f,avx2,fma")))
#endif

#include "../../quant/csrc/float_dot.h"

#define PTR(type, address) ((type *)(uintptr_t)(address))

/* ---------------------------------------------------------------- dot and axpy */

/* y += alpha * x */
static void axpy_portable(float *y, float alpha, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += alpha * x[i];
}

#ifdef HAVE_X86
AVX2 static void axpy_avx2(float *y, float alpha, const float *x, int64_t n) {
    __m256 a = _mm256_set1_ps(alpha);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(a, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += alpha * x[i];
}

AVX512 static float dot_avx512(const float *a, const float *b, int64_t n) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
    }
    for (; i + 16 <= n; i += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    float total = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
    for (; i < n; i++) total += a[i] * b[i];
    return total;
}

AVX512 static void axpy_avx512(float *y, float alpha, const float *x, int64_t n) {
    __m512 a = _mm512_set1_ps(alpha);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(a, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += alpha * x[i];
}

/* Four dot products of a with b[0..3] (a loaded once for the four). */
AVX2 static void dot4_avx2(const float *a, const float *const *b, int64_t n, float *out) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(a + i);
        s0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(b[0] + i), s0);
        s1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(b[1] + i), s1);
        s2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(b[2] + i), s2);
        s3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(b[3] + i), s3);
    }
    __m256 sums[4] = {s0, s1, s2, s3};
    for (int j = 0; j < 4; j++) {
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(sums[j]), _mm256_extractf128_ps(sums[j], 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_movehdup_ps(h));
        out[j] = _mm_cvtss_f32(h);
        for (int64_t t = i; t < n; t++) out[j] += a[t] * b[j][t];
    }
}

/* y += Σ_j alpha[j] · x[j] over four rows x[0..3] (y loaded and stored once for the four). */
AVX2 static void axpy4_avx2(float *y, const float *alpha, const float *const *x, int64_t n) {
    __m256 a0 = _mm256_set1_ps(alpha[0]), a1 = _mm256_set1_ps(alpha[1]);
    __m256 a2 = _mm256_set1_ps(alpha[2]), a3 = _mm256_set1_ps(alpha[3]);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(y + i);
        v = _mm256_fmadd_ps(a0, _mm256_loadu_ps(x[0] + i), v);
        v = _mm256_fmadd_ps(a1, _mm256_loadu_ps(x[1] + i), v);
        v = _mm256_fmadd_ps(a2, _mm256_loadu_ps(x[2] + i), v);
        v = _mm256_fmadd_ps(a3, _mm256_loadu_ps(x[3] + i), v);
        _mm256_storeu_ps(y + i, v);
    }
    for (; i < n; i++) y[i] += alpha[0] * x[0][i] + alpha[1] * x[1][i] + alpha[2] * x[2][i] + alpha[3] * x[3][i];
}

AVX512 static void dot4_avx512(const float *a, const float *const *b, int64_t n, float *out) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 x = _mm512_loadu_ps(a + i);
        s0 = _mm512_fmadd_ps(x, _mm512_loadu_ps(b[0] + i), s0);
        s1 = _mm512_fmadd_ps(x, _mm512_loadu_ps(b[1] + i), s1);
        s2 = _mm512_fmadd_ps(x, _mm512_loadu_ps(b[2] + i), s2);
        s3 = _mm512_fmadd_ps(x, _mm512_loadu_ps(b[3] + i), s3);
    }
    out[0] = _mm512_reduce_add_ps(s0), out[1] = _mm512_reduce_add_ps(s1);
    out[2] = _mm512_reduce_add_ps(s2), out[3] = _mm512_reduce_add_ps(s3);
    for (; i < n; i++)
        for (int j = 0; j < 4; j++) out[j] += a[i] * b[j][i];
}

AVX512 static void axpy4_avx512(float *y, const float *alpha, const float *const *x, int64_t n) {
    __m512 a0 = _mm512_set1_ps(alpha[0]), a1 = _mm512_set1_ps(alpha[1]);
    __m512 a2 = _mm512_set1_ps(alpha[2]), a3 = _mm512_set1_ps(alpha[3]);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 v = _mm512_loadu_ps(y + i);
        v = _mm512_fmadd_ps(a0, _mm512_loadu_ps(x[0] + i), v);
        v = _mm512_fmadd_ps(a1, _mm512_loadu_ps(x[1] + i), v);
        v = _mm512_fmadd_ps(a2, _mm512_loadu_ps(x[2] + i), v);
        v = _mm512_fmadd_ps(a3, _mm512_loadu_ps(x[3] + i), v);
        _mm512_storeu_ps(y + i, v);
    }
    for (; i < n; i++) y[i] += alpha[0] * x[0][i] + alpha[1] * x[1][i] + alpha[2] * x[2][i] + alpha[3] * x[3][i];
}

/* Two heads (a, a + stride) against four keys b[0..3]: out[0..3] for the first, out[4..7] for
 * the second; each key value loaded once for both heads. */
AVX512 static void dot4x2_avx512(const float *a, int64_t stride, const float *const *b, int64_t n, float *out) {
    __m512 s[8];
    for (int j = 0; j < 8; j++) s[j] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 x0 = _mm512_loadu_ps(a + i), x1 = _mm512_loadu_ps(a + stride + i);
        for (int j = 0; j < 4; j++) {
            __m512 key = _mm512_loadu_ps(b[j] + i);
            s[j] = _mm512_fmadd_ps(x0, key, s[j]);
            s[4 + j] = _mm512_fmadd_ps(x1, key, s[4 + j]);
        }
    }
    for (int j = 0; j < 8; j++) out[j] = _mm512_reduce_add_ps(s[j]);
    for (; i < n; i++)
        for (int j = 0; j < 4; j++) out[j] += a[i] * b[j][i], out[4 + j] += a[stride + i] * b[j][i];
}

/* Two heads' outputs y, y + stride += Σ_j alpha[j] · x[j] and Σ_j alpha[alpha_stride + j] · x[j]. */
AVX512 static void axpy4x2_avx512(float *y, int64_t stride, const float *alpha, int64_t alpha_stride,
                                  const float *const *x, int64_t n) {
    __m512 a[8];
    for (int j = 0; j < 4; j++) a[j] = _mm512_set1_ps(alpha[j]), a[4 + j] = _mm512_set1_ps(alpha[alpha_stride + j]);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 v0 = _mm512_loadu_ps(y + i), v1 = _mm512_loadu_ps(y + stride + i);
        for (int j = 0; j < 4; j++) {
            __m512 key = _mm512_loadu_ps(x[j] + i);
            v0 = _mm512_fmadd_ps(a[j], key, v0);
            v1 = _mm512_fmadd_ps(a[4 + j], key, v1);
        }
        _mm512_storeu_ps(y + i, v0);
        _mm512_storeu_ps(y + stride + i, v1);
    }
    for (; i < n; i++)
        for (int j = 0; j < 4; j++) y[i] += alpha[j] * x[j][i], y[stride + i] += alpha[alpha_stride + j] * x[j][i];
}

/* exp(x) for 8 floats: x = k ln2 + r, |r| <= ln2 / 2, Cephes' degree-6 polynomial for exp(r),
 * times 2^k from the exponent bits (within 2 ulp of expf; x clamped to [-87.3, 88.3]). */
AVX2 static inline __m256 exp_avx2(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i two_k = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(two_k));
}

/* s[k] = exp(s[k] - top) for k < n; returns their sum. */
AVX2 static float exp_sum_avx2(float *s, int64_t n, float top) {
    __m256 shift = _mm256_set1_ps(top), total = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) {
        __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + k), shift));
        _mm256_storeu_ps(s + k, e);
        total = _mm256_add_ps(total, e);
    }
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(total), _mm256_extractf128_ps(total, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    float sum = _mm_cvtss_f32(h);
    for (; k < n; k++) sum += s[k] = expf(s[k] - top);
    return sum;
}

/* s[k] *= scale for k < n; returns the largest of top and the scaled values. */
AVX2 static float scale_max_avx2(float *s, int64_t n, float scale, float top) {
    __m256 factor = _mm256_set1_ps(scale), most = _mm256_set1_ps(top);
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) {
        __m256 v = _mm256_mul_ps(_mm256_loadu_ps(s + k), factor);
        _mm256_storeu_ps(s + k, v);
        most = _mm256_max_ps(most, v);
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(most), _mm256_extractf128_ps(most, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    top = _mm_cvtss_f32(h);
    for (; k < n; k++) {
        s[k] *= scale;
        top = s[k] > top ? s[k] : top;
    }
    return top;
}

/* SwiGLU of one row, 8 values at a time (the portable loop below finishes it). */
AVX2 static int64_t swiglu_avx2(const float *gate, const float *up, float limit, float *out, int64_t width) {
    __m256 high = _mm256_set1_ps(limit), low = _mm256_set1_ps(-limit), one = _mm256_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + 8 <= width; i += 8) {
        __m256 g = _mm256_min_ps(_mm256_loadu_ps(gate + i), high);
        __m256 u = _mm256_max_ps(_mm256_min_ps(_mm256_loadu_ps(up + i), high), low);
        __m256 e = exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), g));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), u));
    }
    return i;
}
#endif

static int64_t swiglu_portable(const float *gate, const float *up, float limit, float *out, int64_t width) {
    (void)gate, (void)up, (void)limit, (void)out, (void)width;
    return 0;
}

static void dot4_portable(const float *a, const float *const *b, int64_t n, float *out) {
    for (int j = 0; j < 4; j++) out[j] = dot_portable(a, b[j], n);
}

static void axpy4_portable(float *y, const float *alpha, const float *const *x, int64_t n) {
    for (int j = 0; j < 4; j++) axpy_portable(y, alpha[j], x[j], n);
}

static float exp_sum_portable(float *s, int64_t n, float top) {
    float sum = 0.0f;
    for (int64_t k = 0; k < n; k++) sum += s[k] = expf(s[k] - top);
    return sum;
}

static float scale_max_portable(float *s, int64_t n, float scale, float top) {
    for (int64_t k = 0; k < n; k++) {
        s[k] *= scale;
        top = s[k] > top ? s[k] : top;
    }
    return top;
}

static void dot4x2_portable(const float *a, int64_t stride, const float *const *b, int64_t n, float *out);
static void axpy4x2_portable(float *y, int64_t stride, const float *alpha, int64_t alpha_stride,
                             const float *const *x, int64_t n);

static float (*exp_sum)(float *, int64_t, float) = exp_sum_portable;
static float (*scale_max)(float *, int64_t, float, float) = scale_max_portable;
static void (*dot4x2)(const float *, int64_t, const float *const *, int64_t, float *) = dot4x2_portable;
static void (*axpy4x2)(float *, int64_t, const float *, int64_t, const float *const *, int64_t) = axpy4x2_portable;
static void (*dot4)(const float *, const float *const *, int64_t, float *) = dot4_portable;
static void (*axpy4)(float *, const float *, const float *const *, int64_t) = axpy4_portable;
static void dot4x2_portable(const float *a, int64_t stride, const float *const *b, int64_t n, float *out) {
    dot4(a, b, n, out);
    dot4(a + stride, b, n, out + 4);
}

static void axpy4x2_portable(float *y, int64_t stride, const float *alpha, int64_t alpha_stride,
                             const float *const *x, int64_t n) {
    axpy4(y, alpha, x, n);
    axpy4(y + stride, alpha + alpha_stride, x, n);
}

static int64_t (*swiglu_start)(const float *, const float *, float, float *, int64_t) = swiglu_portable;
static float (*dot)(const float *, const float *, int64_t) = dot_portable;
static void (*axpy)(float *, float, const float *, int64_t) = axpy_portable;

static inline float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

/* ---------------------------------------------------------------- norms and rope */

/* out[r] = x[r] / sqrt(mean(x[r]²) + eps) (* weight): norm.rms_norm. out may be x. */
static void rms_norm_rows(const float *x, const float *weight, int64_t rows, int64_t width, float eps, float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * width;
        float scale = 1.0f / sqrtf(dot(row, row, width) / (float)width + eps);
        float *o = out + r * width;
        if (weight)
            for (int64_t i = 0; i < width; i++) o[i] = row[i] * scale * weight[i];
        else
            for (int64_t i = 0; i < width; i++) o[i] = row[i] * scale;
    }
}

/* rms_norm(x, weight or 0, rows, width, eps, out) */
static PyObject *py_rms_norm(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long x, weight, out;
    long long rows, width;
    float eps;
    if (!PyArg_ParseTuple(args, "KKLLfK", &x, &weight, &rows, &width, &eps, &out)) return NULL;
    rms_norm_rows(PTR(const float, x), PTR(const float, weight), rows, width, eps, PTR(float, out));
    Py_RETURN_NONE;
}

/* rope(x, positions (int64), freqs, tokens, rows_per_token, width, pairs, inverse, out): Rope.apply.
 * The last 2·pairs values of each row rotate in pairs (2k, 2k+1) by position · freqs[k] (its
 * negative when inverse); the others are copied. out may be x. */
static PyObject *py_rope(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long x_address, positions_address, freqs_address, out_address;
    long long tokens, rows_per_token, width, pairs;
    int inverse;
    if (!PyArg_ParseTuple(args, "KKKLLLLpK", &x_address, &positions_address, &freqs_address, &tokens,
                          &rows_per_token, &width, &pairs, &inverse, &out_address))
        return NULL;
    const float *x = PTR(const float, x_address), *freqs = PTR(const float, freqs_address);
    const int64_t *positions = PTR(const int64_t, positions_address);
    float *out = PTR(float, out_address);
    float *cos_sin = malloc(sizeof(float) * 2 * (size_t)(pairs ? pairs : 1));
    if (cos_sin == NULL) return PyErr_NoMemory();
    int64_t kept = width - 2 * pairs;
    for (int64_t t = 0; t < tokens; t++) {
        float position = (float)positions[t];
        for (int64_t k = 0; k < pairs; k++) {
            float angle = position * freqs[k];
            cos_sin[2 * k] = cosf(angle);
            cos_sin[2 * k + 1] = inverse ? -sinf(angle) : sinf(angle);
        }
        for (int64_t r = t * rows_per_token; r < (t + 1) * rows_per_token; r++) {
            const float *row = x + r * width;
            float *o = out + r * width;
            if (o != row) memcpy(o, row, sizeof(float) * (size_t)kept);
            for (int64_t k = 0; k < pairs; k++) {
                float even = row[kept + 2 * k], odd = row[kept + 2 * k + 1];
                float c = cos_sin[2 * k], s = cos_sin[2 * k + 1];
                o[kept + 2 * k] = even * c - odd * s;
                o[kept + 2 * k + 1] = even * s + odd * c;
            }
        }
    }
    free(cos_sin);
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------- hyper-connections */

/* hyper.sinkhorn on one (n, n) matrix in place: softmax along rows, + eps, then columns,
 * then (rows, columns) iters - 1 more times, each divided by its sum + eps. */
static void sinkhorn_matrix(float *m, int n, int iters, float eps) {
    for (int i = 0; i < n; i++) {
        float *row = m + i * n, top = row[0], total = 0.0f;
        for (int j = 1; j < n; j++) top = row[j] > top ? row[j] : top;
        for (int j = 0; j < n; j++) total += row[j] = expf(row[j] - top);
        for (int j = 0; j < n; j++) row[j] = row[j] / total + eps;
    }
    for (int iter = 0; iter < iters; iter++) {
        if (iter > 0)
            for (int i = 0; i < n; i++) {
                float total = 0.0f;
                for (int j = 0; j < n; j++) total += m[i * n + j];
                for (int j = 0; j < n; j++) m[i * n + j] /= total + eps;
            }
        for (int j = 0; j < n; j++) {
            float total = 0.0f;
            for (int i = 0; i < n; i++) total += m[i * n + j];
            for (int i = 0; i < n; i++) m[i * n + j] /= total + eps;
        }
    }
}

/* sinkhorn(logits, out, matrices, n, iters, eps) */
static PyObject *py_sinkhorn(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long logits, out;
    long long matrices;
    int n, iters;
    float eps;
    if (!PyArg_ParseTuple(args, "KKLiif", &logits, &out, &matrices, &n, &iters, &eps)) return NULL;
    if (out != logits) memcpy(PTR(float, out), PTR(float, logits), sizeof(float) * (size_t)(matrices * n * n));
    for (int64_t t = 0; t < matrices; t++) sinkhorn_matrix(PTR(float, out) + t * n * n, n, iters, eps);
    Py_RETURN_NONE;
}

/* hc_pre(streams, token_stride, stream_stride, mixes, scale, base, tokens, n, width, iters,
 *        hc_eps, collapsed, post, comb): hyper.hc_pre after its projection. For each token:
 * pre = sigmoid(mix_pre · scale[0] + base_pre) + hc_eps, post = 2 sigmoid(mix_post · scale[1] +
 * base_post), comb = sinkhorn(mix_comb · scale[2] + base_comb), collapsed = Σ_i pre[i] streams[i].
 * Strides in floats (a stream stride of 0: one state broadcast to every stream). */
static PyObject *py_hc_pre(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long streams_address, mixes_address, scale_address, base_address, collapsed_address,
        post_address, comb_address;
    long long token_stride, stream_stride, tokens, width;
    int n, iters;
    float hc_eps;
    if (!PyArg_ParseTuple(args, "KLLKKKLiLifKKK", &streams_address, &token_stride, &stream_stride,
                          &mixes_address, &scale_address, &base_address, &tokens, &n, &width, &iters, &hc_eps,
                          &collapsed_address, &post_address, &comb_address))
        return NULL;
    const float *scale = PTR(const float, scale_address), *base = PTR(const float, base_address);
    int mix = 2 * n + n * n;
    for (int64_t t = 0; t < tokens; t++) {
        const float *m = PTR(const float, mixes_address) + t * mix;
        const float *streams = PTR(const float, streams_address) + t * token_stride;
        float *post = PTR(float, post_address) + t * n, *comb = PTR(float, comb_address) + t * n * n;
        float *collapsed = PTR(float, collapsed_address) + t * width;
        for (int i = 0; i < n; i++) post[i] = 2.0f * sigmoid(m[n + i] * scale[1] + base[n + i]);
        for (int i = 0; i < n * n; i++) comb[i] = m[2 * n + i] * scale[2] + base[2 * n + i];
        sinkhorn_matrix(comb, n, iters, hc_eps);
        memset(collapsed, 0, sizeof(float) * (size_t)width);
        for (int i = 0; i < n; i++) {
            float pre = sigmoid(m[i] * scale[0] + base[i]) + hc_eps;
            axpy(collapsed, pre, streams + i * stream_stride, width);
        }
    }
    Py_RETURN_NONE;
}

/* hc_head(streams, token_stride, stream_stride, mixes, scale, base, tokens, n, width, hc_eps,
 * out): hyper.hc_head after its projection, out[t] = Σ_i (sigmoid(mix_i · scale[0] + base_i) +
 * hc_eps) · streams[t, i]. */
static PyObject *py_hc_head(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long streams_address, mixes_address, scale_address, base_address, out_address;
    long long token_stride, stream_stride, tokens, width;
    int n;
    float hc_eps;
    if (!PyArg_ParseTuple(args, "KLLKKKLiLfK", &streams_address, &token_stride, &stream_stride, &mixes_address,
                          &scale_address, &base_address, &tokens, &n, &width, &hc_eps, &out_address))
        return NULL;
    const float *scale = PTR(const float, scale_address), *base = PTR(const float, base_address);
    for (int64_t t = 0; t < tokens; t++) {
        const float *m = PTR(const float, mixes_address) + t * n;
        const float *streams = PTR(const float, streams_address) + t * token_stride;
        float *out = PTR(float, out_address) + t * width;
        memset(out, 0, sizeof(float) * (size_t)width);
        for (int i = 0; i < n; i++) axpy(out, sigmoid(m[i] * scale[0] + base[i]) + hc_eps, streams + i * stream_stride, width);
    }
    Py_RETURN_NONE;
}

/* hc_post(output, streams, token_stride, stream_stride, post, comb, tokens, n, width, out):
 * out[t, j] = post[t, j] · output[t] + Σ_i comb[t, i, j] · streams[t, i]. */
static PyObject *py_hc_post(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long output_address, streams_address, post_address, comb_address, out_address;
    long long token_stride, stream_stride, tokens, width;
    int n;
    if (!PyArg_ParseTuple(args, "KKLLKKLiLK", &output_address, &streams_address, &token_stride, &stream_stride,
                          &post_address, &comb_address, &tokens, &n, &width, &out_address))
        return NULL;
    for (int64_t t = 0; t < tokens; t++) {
        const float *output = PTR(const float, output_address) + t * width;
        const float *streams = PTR(const float, streams_address) + t * token_stride;
        const float *post = PTR(const float, post_address) + t * n, *comb = PTR(const float, comb_address) + t * n * n;
        for (int j = 0; j < n; j++) {
            float *o = PTR(float, out_address) + (t * n + j) * width;
            for (int64_t d = 0; d < width; d++) o[d] = post[j] * output[d];
            for (int i = 0; i < n; i++) axpy(o, comb[i * n + j], streams + i * stream_stride, width);
        }
    }
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------- attention of one query */

#define KEY_BLOCK 32

/* attend(q, heads, dim, raw, n_raw, rows, picks or 0, valid or 0, n_rows, sinks, scale, out): the
 * softmax attention of one query's heads (heads, dim) over its keys = values: the raw rows,
 * then the compressed rows (rows[picks[j]] for the picks whose valid byte is set, when picks
 * are given, else rows[j]), and one sink logit per head. Keys are taken a block at a time for
 * every head while they are in cache. */
static PyObject *py_attend(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long q_address, raw_address, rows_address, picks_address, valid_address, sinks_address,
        out_address;
    long long heads, dim, n_raw, n_rows;
    float scale;
    if (!PyArg_ParseTuple(args, "KLLKLKKKLKfK", &q_address, &heads, &dim, &raw_address, &n_raw, &rows_address,
                          &picks_address, &valid_address, &n_rows, &sinks_address, &scale, &out_address))
        return NULL;
    const float *q = PTR(const float, q_address), *raw = PTR(const float, raw_address);
    const float *rows = PTR(const float, rows_address), *sinks = PTR(const float, sinks_address);
    const int64_t *picks = PTR(const int64_t, picks_address);
    const uint8_t *valid = PTR(const uint8_t, valid_address);
    float *out = PTR(float, out_address);
    int64_t keys = n_raw + n_rows;
    float *scores = malloc(sizeof(float) * (size_t)(heads * (keys ? keys : 1)));
    const float **key = malloc(sizeof(float *) * (size_t)(keys ? keys : 1));
    if (scores == NULL || key == NULL) {
        free(scores);
        free(key);
        return PyErr_NoMemory();
    }
    for (int64_t k = 0; k < n_raw; k++) key[k] = raw + k * dim;
    int64_t keys_used = n_raw;
    for (int64_t k = 0; k < n_rows; k++)
        if (!picks || !valid || valid[k]) key[keys_used++] = rows + (picks ? picks[k] : k) * dim;
    keys = keys_used;
    for (int64_t first = 0; first < keys; first += KEY_BLOCK) {
        int64_t last = first + KEY_BLOCK < keys ? first + KEY_BLOCK : keys;
        int64_t h = 0;
        for (; h + 2 <= heads; h += 2) { /* two heads and four keys at a time */
            float *s = scores + h * keys, pair[8];
            int64_t k = first;
            for (; k + 4 <= last; k += 4) {
                dot4x2(q + h * dim, dim, key + k, dim, pair);
                for (int j = 0; j < 4; j++) s[k + j] = pair[j] * scale, s[keys + k + j] = pair[4 + j] * scale;
            }
            for (; k < last; k++)
                s[k] = dot(q + h * dim, key[k], dim) * scale, s[keys + k] = dot(q + (h + 1) * dim, key[k], dim) * scale;
        }
        for (; h < heads; h++) {
            float *s = scores + h * keys;
            int64_t k = first;
            for (; k + 4 <= last; k += 4) {
                dot4(q + h * dim, key + k, dim, s + k);
                for (int j = 0; j < 4; j++) s[k + j] *= scale;
            }
            for (; k < last; k++) s[k] = dot(q + h * dim, key[k], dim) * scale;
        }
    }
    for (int64_t h = 0; h < heads; h++) {
        float *s = scores + h * keys, top = sinks[h], total = 0.0f;
        for (int64_t k = 0; k < keys; k++) top = s[k] > top ? s[k] : top;
        total = exp_sum(s, keys, top) + expf(sinks[h] - top);
        for (int64_t k = 0; k < keys; k++) s[k] /= total;
    }
    memset(out, 0, sizeof(float) * (size_t)(heads * dim));
    for (int64_t first = 0; first < keys; first += KEY_BLOCK) {
        int64_t last = first + KEY_BLOCK < keys ? first + KEY_BLOCK : keys;
        int64_t h = 0;
        for (; h + 2 <= heads; h += 2) {
            int64_t k = first;
            for (; k + 4 <= last; k += 4) axpy4x2(out + h * dim, dim, scores + h * keys + k, keys, key + k, dim);
            for (; k < last; k++) {
                axpy(out + h * dim, scores[h * keys + k], key[k], dim);
                axpy(out + (h + 1) * dim, scores[(h + 1) * keys + k], key[k], dim);
            }
        }
        for (; h < heads; h++) {
            int64_t k = first;
            for (; k + 4 <= last; k += 4) axpy4(out + h * dim, scores + h * keys + k, key + k, dim);
            for (; k < last; k++) axpy(out + h * dim, scores[h * keys + k], key[k], dim);
        }
    }
    free(scores);
    free(key);
    Py_RETURN_NONE;
}

/* window_softmax(scores, queries, heads, n_raw, n_rows, offset, window, first, ratio, valid, sinks,
 * scale): the softmax of a block of consecutive queries' attention, in place over their scores
 * (queries, heads, n_raw + n_rows), each the product of a query head and a key. Query t (at
 * position first + t) sees raw key j when 0 <= offset + t - j < window (offset: the first
 * query's position less the first raw key's) and compressed row r (score n_raw + r) when its
 * byte valid[t, r] is set (valid: queries x n_rows) or, without valid, when
 * r < (first + t + 1) / ratio (none when ratio is 0). Scores seen are scaled, and share the
 * softmax with a sink logit per head; the others become 0. */
static PyObject *py_window_softmax(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long scores_address, valid_address, sinks_address;
    long long queries, heads, n_raw, n_rows, offset, window, first, ratio;
    float scale;
    if (!PyArg_ParseTuple(args, "KLLLLLLLLKKf", &scores_address, &queries, &heads, &n_raw, &n_rows, &offset,
                          &window, &first, &ratio, &valid_address, &sinks_address, &scale))
        return NULL;
    float *scores = PTR(float, scores_address);
    const float *sinks = PTR(const float, sinks_address);
    const uint8_t *valid = PTR(const uint8_t, valid_address);
    int64_t keys = n_raw + n_rows;
    Py_BEGIN_ALLOW_THREADS;
    for (int64_t t = 0; t < queries; t++) {
        int64_t lo = offset + t - window + 1, hi = offset + t + 1;
        lo = lo < 0 ? 0 : (lo > n_raw ? n_raw : lo);
        hi = hi > n_raw ? n_raw : (hi < lo ? lo : hi);
        int64_t seen_rows = valid ? n_rows : (ratio > 0 ? (first + t + 1) / ratio : 0);
        seen_rows = seen_rows < 0 ? 0 : (seen_rows > n_rows ? n_rows : seen_rows);
        const uint8_t *picked = valid ? valid + t * n_rows : NULL;
        for (int64_t h = 0; h < heads; h++) {
            float *s = scores + (t * heads + h) * keys, *rows = s + n_raw;
            if (picked) /* rows not picked: -inf through the softmax (exp gives ~0), 0 after it */
                for (int64_t k = 0; k < n_rows; k++) rows[k] = picked[k] ? rows[k] : -INFINITY;
            float top = scale_max(rows, seen_rows, scale, scale_max(s + lo, hi - lo, scale, sinks[h]));
            float total = exp_sum(s + lo, hi - lo, top) + exp_sum(rows, seen_rows, top) + expf(sinks[h] - top);
            float inverse = 1.0f / total;
            for (int64_t k = lo; k < hi; k++) s[k] *= inverse;
            for (int64_t k = 0; k < seen_rows; k++) rows[k] = picked && !picked[k] ? 0.0f : rows[k] * inverse;
            memset(s, 0, sizeof(float) * (size_t)lo);
            memset(s + hi, 0, sizeof(float) * (size_t)(n_raw - hi));
            memset(rows + seen_rows, 0, sizeof(float) * (size_t)(n_rows - seen_rows));
        }
    }
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}

/* pool(kv, gate, windows, slots, width, out): a compressor's gated pooling,
 * out[w, j] = Σ_s kv[w, s, j] · softmax_s(gate[w, :, j]) (a slot with gate -inf weighs 0). */
static PyObject *py_pool(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long kv_address, gate_address, out_address;
    long long windows, slots, width;
    if (!PyArg_ParseTuple(args, "KKLLLK", &kv_address, &gate_address, &windows, &slots, &width, &out_address))
        return NULL;
    for (int64_t w = 0; w < windows; w++) {
        const float *kv = PTR(const float, kv_address) + w * slots * width;
        const float *gate = PTR(const float, gate_address) + w * slots * width;
        float *out = PTR(float, out_address) + w * width;
        for (int64_t j = 0; j < width; j++) {
            float top = gate[j], total = 0.0f, sum = 0.0f;
            for (int64_t s = 1; s < slots; s++) top = gate[s * width + j] > top ? gate[s * width + j] : top;
            for (int64_t s = 0; s < slots; s++) {
                float e = expf(gate[s * width + j] - top);
                total += e;
                sum += e * kv[s * width + j];
            }
            out[j] = sum / total;
        }
    }
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------- routing and SwiGLU */

/* route(logits, bias or 0, hashed or 0, tokens, n_expert, k, norm_topk, routed_scale, experts,
 * weights): moe.route after the router's projection. Scores sqrt(softplus(logits)); experts the
 * k highest biased scores, best first (or the token's hash-table row); weights their scores,
 * divided by their sum when norm_topk, times routed_scale. */
static PyObject *py_route(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long logits_address, bias_address, hashed_address, experts_address, weights_address;
    long long tokens, n_expert, k;
    int norm_topk;
    float routed_scale;
    if (!PyArg_ParseTuple(args, "KKKLLLpfKK", &logits_address, &bias_address, &hashed_address, &tokens, &n_expert,
                          &k, &norm_topk, &routed_scale, &experts_address, &weights_address))
        return NULL;
    const float *bias = PTR(const float, bias_address);
    float *scores = malloc(sizeof(float) * (size_t)(2 * n_expert));
    if (scores == NULL) return PyErr_NoMemory();
    float *biased = scores + n_expert;
    for (int64_t t = 0; t < tokens; t++) {
        const float *logits = PTR(const float, logits_address) + t * n_expert;
        int64_t *experts = PTR(int64_t, experts_address) + t * k;
        float *weights = PTR(float, weights_address) + t * k;
        for (int64_t e = 0; e < n_expert; e++) {
            float x = logits[e];
            scores[e] = sqrtf(x > 20.0f ? x : log1pf(expf(x)));  /* softplus, torch's threshold */
            biased[e] = bias ? scores[e] + bias[e] : scores[e];
        }
        if (hashed_address) {
            memcpy(experts, PTR(const int64_t, hashed_address) + t * k, sizeof(int64_t) * (size_t)k);
        } else {
            for (int64_t j = 0; j < k; j++) { /* k passes: k is 6 of 256 */
                int64_t best = -1;
                for (int64_t e = 0; e < n_expert; e++) {
                    if (biased[e] != biased[e] || biased[e] == -INFINITY) continue; /* taken (or NaN) */
                    if (best < 0 || biased[e] > biased[best]) best = e;
                }
                if (best < 0) best = 0;
                experts[j] = best;
                biased[best] = -INFINITY;
            }
        }
        float total = 0.0f;
        for (int64_t j = 0; j < k; j++) total += weights[j] = scores[experts[j]];
        for (int64_t j = 0; j < k; j++) weights[j] = (norm_topk ? weights[j] / total : weights[j]) * routed_scale;
    }
    free(scores);
    Py_RETURN_NONE;
}

/* swiglu(gate, up, weights or 0, rows, width, limit, out): moe.swiglu, each row times its
 * weight when given: silu(min(gate, limit)) · clamp(up, -limit, limit) · weight. */
static PyObject *py_swiglu(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long gate_address, up_address, weights_address, out_address;
    long long rows, width;
    float limit;
    if (!PyArg_ParseTuple(args, "KKKLLfK", &gate_address, &up_address, &weights_address, &rows, &width, &limit,
                          &out_address))
        return NULL;
    const float *weights = PTR(const float, weights_address);
    for (int64_t r = 0; r < rows; r++) {
        const float *gate = PTR(const float, gate_address) + r * width, *up = PTR(const float, up_address) + r * width;
        float *out = PTR(float, out_address) + r * width;
        for (int64_t i = swiglu_start(gate, up, limit, out, width); i < width; i++) {
            float g = gate[i] < limit ? gate[i] : limit;
            float u = up[i] < -limit ? -limit : (up[i] > limit ? limit : up[i]);
            out[i] = g / (1.0f + expf(-g)) * u;
        }
        if (weights)
            for (int64_t i = 0; i < width; i++) out[i] *= weights[r];
    }
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------- quantisation simulation */

/* quantsim._pow2_scale: 2^ceil(log2(amax · (1/top))), the ratio's exponent from frexp (one
 * less when the ratio is a power of two). */
static float pow2_scale(float amax, float top) {
    int exponent;
    float mantissa = frexpf(amax * (float)(1.0 / (double)top), &exponent); /* as torch: 1/top rounded once */
    return ldexpf(1.0f, mantissa == 0.5f ? exponent - 1 : exponent);
}

/* The nearest E4M3 value of x (|x| <= 448), ties to even: steps of 2^(e-3) in the binade
 * [2^e, 2^(e+1)), and of 2^-9 below 2^-6 (subnormals). */
static float e4m3(float x) {
    int exponent;
    frexpf(x, &exponent); /* |x| in [2^(exponent-1), 2^exponent) */
    int step = exponent - 1 - 3 < -9 ? -9 : exponent - 1 - 3;
    return ldexpf(rintf(ldexpf(x, -step)), step);
}

/* fp8_round of one row's first `width` values, blocks of 64 (a last partial block as is). */
static void fp8_round_row(const float *x, int64_t width, float *out) {
    for (int64_t start = 0; start < width; start += 64) {
        int64_t end = start + 64 < width ? start + 64 : width;
        float amax = 0.0f;
        for (int64_t i = start; i < end; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
        float scale = pow2_scale(amax < 1e-4f ? 1e-4f : amax, 448.0f);
        for (int64_t i = start; i < end; i++) {
            float v = x[i] / scale;
            v = v < -448.0f ? -448.0f : (v > 448.0f ? 448.0f : v);
            out[i] = e4m3(v) * scale;
        }
    }
}

/* kv_round(x, rows, width, nope_dim, out): quantsim.kv_round, FP8 on each row's first nope_dim
 * values, the rest copied. out may be x. */
static PyObject *py_kv_round(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long x_address, out_address;
    long long rows, width, nope;
    if (!PyArg_ParseTuple(args, "KLLLK", &x_address, &rows, &width, &nope, &out_address)) return NULL;
    for (int64_t r = 0; r < rows; r++) {
        const float *x = PTR(const float, x_address) + r * width;
        float *out = PTR(float, out_address) + r * width;
        fp8_round_row(x, nope, out);
        if (out != x) memcpy(out + nope, x + nope, sizeof(float) * (size_t)(width - nope));
    }
    Py_RETURN_NONE;
}

static const float e2m1_values[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};

/* quantsim._e2m1: the nearest E2M1 magnitude, ties to the even code, with x's sign. */
static float e2m1(float x) {
    float magnitude = fabsf(x);
    int high = 0;
    while (high < 7 && e2m1_values[high] < magnitude) high++; /* bucketize, clamped to 7 */
    int low = high > 0 ? high - 1 : 0;
    float below = magnitude - e2m1_values[low], above = e2m1_values[high] - magnitude;
    float value = (above < below || (above == below && high % 2 == 0)) ? e2m1_values[high] : e2m1_values[low];
    return x > 0.0f ? value : (x < 0.0f ? -value : 0.0f * value);
}

/* indexer_round(x, rows, width, out): quantsim.indexer_round, each row (a power-of-two width)
 * rotated by the orthonormal Walsh-Hadamard transform (butterflies with stride 1, 2, 4 ...),
 * then FP4-rounded in blocks of 32. out may be x. */
static PyObject *py_indexer_round(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long x_address, out_address;
    long long rows, width;
    if (!PyArg_ParseTuple(args, "KLLK", &x_address, &rows, &width, &out_address)) return NULL;
    float *row = malloc(sizeof(float) * (size_t)(width ? width : 1));
    if (row == NULL) return PyErr_NoMemory();
    float norm = (float)pow((double)width, -0.5); /* Python's n ** -0.5, then float32 */
    for (int64_t r = 0; r < rows; r++) {
        memcpy(row, PTR(const float, x_address) + r * width, sizeof(float) * (size_t)width);
        for (int64_t stride = 1; stride < width; stride *= 2)
            for (int64_t start = 0; start < width; start += 2 * stride)
                for (int64_t i = start; i < start + stride; i++) {
                    float a = row[i], b = row[i + stride];
                    row[i] = a + b;
                    row[i + stride] = a - b;
                }
        for (int64_t i = 0; i < width; i++) row[i] *= norm;
        float *out = PTR(float, out_address) + r * width;
        for (int64_t start = 0; start < width; start += 32) {
            int64_t end = start + 32 < width ? start + 32 : width;
            float amax = 0.0f;
            for (int64_t i = start; i < end; i++) amax = fabsf(row[i]) > amax ? fabsf(row[i]) : amax;
            float scale = pow2_scale(amax < 6.0f * 0x1p-126f ? 6.0f * 0x1p-126f : amax, 6.0f);
            for (int64_t i = start; i < end; i++) {
                float v = row[i] / scale;
                out[i] = e2m1(v < -6.0f ? -6.0f : (v > 6.0f ? 6.0f : v)) * scale;
            }
        }
    }
    free(row);
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------- module */

static const char *isa = "portable";

/* Use the functions of instruction set `name` ("portable", "avx2", "avx512"); 0 if this CPU lacks it. */
static int use_isa(const char *name) {
    if (strcmp(name, "portable") == 0) {
        dot = dot_portable, axpy = axpy_portable, swiglu_start = swiglu_portable, isa = "portable";
        dot4 = dot4_portable, axpy4 = axpy4_portable, exp_sum = exp_sum_portable, scale_max = scale_max_portable;
        dot4x2 = dot4x2_portable, axpy4x2 = axpy4x2_portable;
        return 1;
    }
#ifdef HAVE_X86
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (strcmp(name, "avx2") == 0 && avx2) {
        dot = dot_avx2, axpy = axpy_avx2, swiglu_start = swiglu_avx2, isa = "avx2";
        dot4 = dot4_avx2, axpy4 = axpy4_avx2, exp_sum = exp_sum_avx2, scale_max = scale_max_avx2;
        dot4x2 = dot4x2_portable, axpy4x2 = axpy4x2_portable;
        return 1;
    }
    if (strcmp(name, "avx512") == 0 && avx2 && __builtin_cpu_supports("avx512f")) {
        dot = dot_avx512, axpy = axpy_avx512, swiglu_start = swiglu_avx2, isa = "avx512";
        dot4 = dot4_avx512, axpy4 = axpy4_avx512, exp_sum = exp_sum_avx2, scale_max = scale_max_avx2;
        dot4x2 = dot4x2_avx512, axpy4x2 = axpy4x2_avx512;
        return 1;
    }
#endif
    return 0;
}

static PyObject *py_isa(PyObject *self, PyObject *unused) {
    (void)self, (void)unused;
    return PyUnicode_FromString(isa);
}

/* set_isa('portable' | 'avx2' | 'avx512'), for tests. */
static PyObject *py_set_isa(PyObject *self, PyObject *name) {
    (void)self;
    const char *wanted = PyUnicode_AsUTF8(name);
    if (wanted == NULL) return NULL;
    if (!use_isa(wanted)) return PyErr_Format(PyExc_ValueError, "instruction set %s is not available here", wanted);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"rms_norm", py_rms_norm, METH_VARARGS, "RMSNorm of rows (see the source)."},
    {"rope", py_rope, METH_VARARGS, "Rotary embedding of rows (see the source)."},
    {"sinkhorn", py_sinkhorn, METH_VARARGS, "Sinkhorn projection of (n, n) matrices (see the source)."},
    {"hc_pre", py_hc_pre, METH_VARARGS, "Hyper-connection collapse after the projection (see the source)."},
    {"hc_head", py_hc_head, METH_VARARGS, "Hyper-connection head collapse (see the source)."},
    {"hc_post", py_hc_post, METH_VARARGS, "Hyper-connection expansion (see the source)."},
    {"attend", py_attend, METH_VARARGS, "Attention of one query with sinks (see the source)."},
    {"window_softmax", py_window_softmax, METH_VARARGS, "Masked softmax of a block of queries (see the source)."},
    {"pool", py_pool, METH_VARARGS, "A compressor's gated pooling (see the source)."},
    {"route", py_route, METH_VARARGS, "Expert routing after the router's projection (see the source)."},
    {"swiglu", py_swiglu, METH_VARARGS, "Clamped SwiGLU, optionally weighted per row (see the source)."},
    {"kv_round", py_kv_round, METH_VARARGS, "FP8 rounding of KV rows' non-rope values (see the source)."},
    {"indexer_round", py_indexer_round, METH_VARARGS, "Hadamard rotation and FP4 rounding (see the source)."},
    {"isa", py_isa, METH_NOARGS, "The instruction set in use: 'avx512', 'avx2' or 'portable'."},
    {"set_isa", py_set_isa, METH_O, "Choose the instruction set ('avx512', 'avx2', 'portable'), for tests."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fused(void) {
    if (!use_isa("avx512")) use_isa("avx2");
    return PyModule_Create(&module);
}
