/* Compiled CPU kernels: matrix products straight from GGML's stored blocks.
 *
 * One entry point, `matmul`, covers `quant.linear` (one matrix) and `quant.expert_linear`
 * (stacked experts, each input row through its k experts). The weights are never expanded as
 * a whole: one stored row at a time is decoded into a float32 buffer that stays in the L1
 * cache, then multiplied with every input row that wants it. The decoders compute each value
 * exactly as the reference decoders in formats.py (same float operations in the same order),
 * so the only difference from dequantize-then-matmul is the order of the float32 sums.
 *
 * Each format has a portable C decoder and an AVX2 one, and fused products for AVX2 and
 * AVX-512 (x86-64, chosen at run time from what the CPU has). On CPUs with AVX-512 VNNI (and
 * VBMI), Q8_0, Q2_K, Q4_K, IQ2_XXS and MXFP4 instead multiply integers: the inputs are rounded
 * once per call to three int8 parts (about 24 bits, see "integer products"), so the results still
 * agree with the reference to float32's rounding (IQ2_XXS uses two of them: within s / 508 per
 * value, docs/model.md). With AVX2 alone (or AVX-512 without VNNI), Q2_K, Q4_K and IQ2_XXS
 * do the same for a few input rows ("integer products (AVX2)"). Work is spread over a small pool of threads, one item
 * per band of output rows of one expert; the calling thread works too.
 */
#include "cpu_shared.h" /* first: it includes Python.h */

#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "float_dot.h"

#ifdef HAVE_X86
#include <immintrin.h>
/* a macro, not a variable: clang wants the rounding mode of a round instruction as a constant */
#define ROUND_NEAREST (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#endif

/* ---------------------------------------------------------------- scalar helpers */

static inline float half_to_float(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
    uint32_t bits;
    float f;
    if (exponent == 0) { /* zero or subnormal: mantissa * 2^-24 */
        f = (float)mantissa * 5.9604644775390625e-8f;
        memcpy(&bits, &f, 4);
        bits |= sign;
    } else if (exponent == 31) {
        bits = sign | 0x7F800000u | (mantissa << 13);
    } else {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    }
    memcpy(&f, &bits, 4);
    return f;
}

static inline float bf16_to_float(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* IQ2_XXS tables: ggml's kgrid_2bit_256 (8 magnitudes of 2 bits per point, standing for 8, 25
 * and 43), expanded at start-up into 8 bytes per point; and the 128 sign patterns (bit i set =
 * value i negative, value 7 negative when an odd number of the others are) as float sign bits. */
const uint16_t iq2_xxs_grid_codes[256] = {
    0,     2,     5,     8,     10,    17,    20,    32,    34,    40,    42,    65,    68,    80,
    88,    97,    100,   128,   130,   138,   162,   257,   260,   272,   277,   320,   388,   408,
    512,   514,   546,   642,   1025,  1028,  1040,  1057,  1060,  1088,  1090,  1096,  1120,  1153,
    1156,  1168,  1188,  1280,  1282,  1288,  1312,  1350,  1385,  1408,  1425,  1545,  1552,  1600,
    1668,  1700,  2048,  2053,  2056,  2068,  2088,  2113,  2116,  2128,  2130,  2184,  2308,  2368,
    2562,  2580,  4097,  4100,  4112,  4129,  4160,  4192,  4228,  4240,  4245,  4352,  4360,  4384,
    4432,  4442,  4480,  4644,  4677,  5120,  5128,  5152,  5157,  5193,  5248,  5400,  5474,  5632,
    5654,  6145,  6148,  6160,  6208,  6273,  6400,  6405,  6560,  6737,  8192,  8194,  8202,  8260,
    8289,  8320,  8322,  8489,  8520,  8704,  8706,  9217,  9220,  9232,  9280,  9302,  9472,  9537,
    9572,  9872,  10248, 10272, 10388, 10820, 16385, 16388, 16400, 16408, 16417, 16420, 16448, 16456,
    16470, 16480, 16513, 16516, 16528, 16640, 16672, 16737, 16768, 16773, 16897, 16912, 16968, 16982,
    17000, 17408, 17416, 17440, 17536, 17561, 17682, 17700, 17920, 18433, 18436, 18448, 18496, 18501,
    18688, 18776, 18785, 18818, 19013, 19088, 20480, 20488, 20497, 20505, 20512, 20608, 20616, 20740,
    20802, 20900, 21137, 21648, 21650, 21770, 22017, 22100, 22528, 22545, 22553, 22628, 22848, 23048,
    24580, 24592, 24640, 24680, 24832, 24917, 25112, 25184, 25600, 25605, 25872, 25874, 25988, 26690,
    32768, 32770, 32778, 32833, 32898, 33028, 33048, 33088, 33297, 33793, 33796, 33808, 33813, 33856,
    33888, 34048, 34118, 34196, 34313, 34368, 34400, 34818, 35076, 35345, 36868, 36880, 36900, 36928,
    37025, 37142, 37248, 37445, 37888, 37922, 37956, 38225, 39041, 39200, 40962, 41040, 41093, 41225,
    41472, 42008, 43088, 43268,
};
static uint64_t iq2_xxs_grid[256];
static uint32_t iq2_xxs_sign_bits[128][8]; /* 0 or 0x80000000: xor into a float to negate it */

static void build_tables(void) {
    static const uint8_t magnitudes[4] = {8, 25, 43, 0};
    for (int i = 0; i < 256; i++) {
        uint8_t bytes[8];
        for (int j = 0; j < 8; j++) bytes[j] = magnitudes[(iq2_xxs_grid_codes[i] >> (2 * j)) & 3];
        memcpy(&iq2_xxs_grid[i], bytes, 8);
    }
    for (int i = 0; i < 128; i++) {
        int negatives = 0;
        for (int j = 0; j < 7; j++) {
            int negative = (i >> j) & 1;
            negatives += negative;
            iq2_xxs_sign_bits[i][j] = negative ? 0x80000000u : 0;
        }
        iq2_xxs_sign_bits[i][7] = (negatives & 1) ? 0x80000000u : 0;
    }
}

/* ---------------------------------------------------------------- portable row decoders */

/* Decode one stored row of `cols` values into out: value = exactly what formats.py computes. */
typedef void (*DecodeFn)(const uint8_t *w, float *out, int64_t cols);

/* A fused product (x86 only): one stored row times one input row, see "Fused products". */
typedef float (*FusedFn)(const uint8_t *w, const float *x, const float *sum16, int64_t cols);

static void decode_q8_0(const uint8_t *w, float *out, int64_t cols) {
    for (int64_t b = 0; b < cols / 32; b++, w += 34, out += 32) {
        float d = half_to_float(w);
        const int8_t *q = (const int8_t *)(w + 2);
        for (int i = 0; i < 32; i++) out[i] = (float)q[i] * d;
    }
}

static void decode_q2_k(const uint8_t *w, float *out, int64_t cols) {
    for (int64_t b = 0; b < cols / 256; b++, w += 84, out += 256) {
        float d = half_to_float(w + 80), dmin = half_to_float(w + 82);
        for (int c = 0; c < 8; c++) { /* values 32c.. are bits 2(c%4) of bytes 32(c/4).. */
            const uint8_t *bytes = w + 16 + 32 * (c / 4);
            int shift = 2 * (c % 4);
            for (int half_index = 0; half_index < 2; half_index++) {
                uint8_t packed = w[2 * c + half_index];
                float scale = d * (float)(packed & 0xF), minimum = dmin * (float)(packed >> 4);
                for (int j = 16 * half_index; j < 16 * half_index + 16; j++)
                    out[32 * c + j] = scale * (float)((bytes[j] >> shift) & 3) - minimum;
            }
        }
    }
}

static void decode_q4_k(const uint8_t *w, float *out, int64_t cols) {
    for (int64_t b = 0; b < cols / 256; b++, w += 144, out += 256) {
        float d = half_to_float(w), dmin = half_to_float(w + 2);
        for (int g = 0; g < 8; g++) { /* group 2k: low nibbles of bytes 32k..; 2k+1: high nibbles */
            const uint8_t *bytes = w + 16 + 32 * (g / 2);
            int shift = 4 * (g % 2), scale, minimum;
            q4_k_scale_min(w + 4, g, &scale, &minimum);
            float group_scale = d * (float)scale, group_min = dmin * (float)minimum;
            for (int j = 0; j < 32; j++) out[32 * g + j] = group_scale * (float)((bytes[j] >> shift) & 0xF) - group_min;
        }
    }
}

static void decode_iq2_xxs(const uint8_t *w, float *out, int64_t cols) {
    for (int64_t b = 0; b < cols / 256; b++, w += 66, out += 256) {
        float d = half_to_float(w);
        for (int g = 0; g < 8; g++) {
            const uint8_t *group = w + 2 + 8 * g;
            uint32_t aux;
            memcpy(&aux, group + 4, 4);
            float scale = d * (0.5f + (float)(aux >> 28)) * 0.25f;
            for (int l = 0; l < 4; l++) {
                const uint8_t *grid = (const uint8_t *)&iq2_xxs_grid[group[l]];
                const uint32_t *signs = iq2_xxs_sign_bits[(aux >> (7 * l)) & 127];
                for (int i = 0; i < 8; i++) {
                    float value = (float)grid[i];
                    uint32_t bits;
                    memcpy(&bits, &value, 4);
                    bits ^= signs[i];
                    memcpy(&value, &bits, 4);
                    out[32 * g + 8 * l + i] = scale * value;
                }
            }
        }
    }
}

static void decode_mxfp4(const uint8_t *w, float *out, int64_t cols) {
    for (int64_t b = 0; b < cols / 32; b++, w += 17, out += 32) {
        float scale = mxfp4_half_scale(w[0]);
        for (int j = 0; j < 16; j++) { /* byte j: value j in its low nibble, value 16 + j in its high one */
            out[j] = (float)mxfp4_doubled[w[1 + j] & 0xF] * scale;
            out[16 + j] = (float)mxfp4_doubled[w[1 + j] >> 4] * scale;
        }
    }
}

static void decode_f16(const uint8_t *w, float *out, int64_t cols) {
    for (int64_t i = 0; i < cols; i++) out[i] = half_to_float(w + 2 * i);
}

static void decode_bf16(const uint8_t *w, float *out, int64_t cols) {
    for (int64_t i = 0; i < cols; i++) out[i] = bf16_to_float(w + 2 * i);
}

/* ---------------------------------------------------------------- AVX2 row decoders */

#ifdef HAVE_X86
#define AVX2 __attribute__((target("avx2,fma,f16c")))
#define INLINE_AVX inline __attribute__((always_inline))

AVX2 static inline float half(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* Eight bytes from p (unsigned) as float32. */
AVX2 static inline __m256 u8x8_to_float(const uint8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

AVX2 static void decode_q8_0_avx2(const uint8_t *w, float *out, int64_t cols) {
    for (int64_t b = 0; b < cols / 32; b++, w += 34, out += 32) {
        __m256 d = _mm256_set1_ps(half(w));
        for (int i = 0; i < 32; i += 8) {
            __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + 2 + i)));
            _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_cvtepi32_ps(q), d));
        }
    }
}

AVX2 static void decode_q2_k_avx2(const uint8_t *w, float *out, int64_t cols) {
    const __m256i mask = _mm256_set1_epi8(3);
    for (int64_t b = 0; b < cols / 256; b++, w += 84, out += 256) {
        float d = half(w + 80), dmin = half(w + 82);
        uint8_t codes[32];
        for (int c = 0; c < 8; c++) {
            __m256i bytes = _mm256_loadu_si256((const __m256i *)(w + 16 + 32 * (c / 4)));
            _mm256_storeu_si256((__m256i *)codes, _mm256_and_si256(_mm256_srli_epi16(bytes, 2 * (c % 4)), mask));
            for (int half_index = 0; half_index < 2; half_index++) {
                uint8_t packed = w[2 * c + half_index];
                __m256 scale = _mm256_set1_ps(d * (float)(packed & 0xF));
                __m256 minimum = _mm256_set1_ps(dmin * (float)(packed >> 4));
                for (int j = 16 * half_index; j < 16 * half_index + 16; j += 8)
                    _mm256_storeu_ps(out + 32 * c + j,
                                     _mm256_sub_ps(_mm256_mul_ps(scale, u8x8_to_float(codes + j)), minimum));
            }
        }
    }
}

AVX2 static void decode_q4_k_avx2(const uint8_t *w, float *out, int64_t cols) {
    const __m256i mask = _mm256_set1_epi8(0xF);
    for (int64_t b = 0; b < cols / 256; b++, w += 144, out += 256) {
        float d = half(w), dmin = half(w + 2);
        uint8_t codes[32];
        for (int g = 0; g < 8; g++) {
            __m256i bytes = _mm256_loadu_si256((const __m256i *)(w + 16 + 32 * (g / 2)));
            _mm256_storeu_si256((__m256i *)codes, _mm256_and_si256(_mm256_srli_epi16(bytes, 4 * (g % 2)), mask));
            int scale, minimum;
            q4_k_scale_min(w + 4, g, &scale, &minimum);
            __m256 group_scale = _mm256_set1_ps(d * (float)scale);
            __m256 group_min = _mm256_set1_ps(dmin * (float)minimum);
            for (int j = 0; j < 32; j += 8)
                _mm256_storeu_ps(out + 32 * g + j,
                                 _mm256_sub_ps(_mm256_mul_ps(group_scale, u8x8_to_float(codes + j)), group_min));
        }
    }
}

AVX2 static void decode_iq2_xxs_avx2(const uint8_t *w, float *out, int64_t cols) {
    for (int64_t b = 0; b < cols / 256; b++, w += 66, out += 256) {
        float d = half(w);
        for (int g = 0; g < 8; g++) {
            const uint8_t *group = w + 2 + 8 * g;
            uint32_t aux;
            memcpy(&aux, group + 4, 4);
            __m256 scale = _mm256_set1_ps(d * (0.5f + (float)(aux >> 28)) * 0.25f);
            for (int l = 0; l < 4; l++) {
                __m256 grid = u8x8_to_float((const uint8_t *)&iq2_xxs_grid[group[l]]);
                __m256 signs = _mm256_castsi256_ps(
                    _mm256_loadu_si256((const __m256i *)iq2_xxs_sign_bits[(aux >> (7 * l)) & 127]));
                _mm256_storeu_ps(out + 32 * g + 8 * l, _mm256_mul_ps(scale, _mm256_xor_ps(grid, signs)));
            }
        }
    }
}

/* MXFP4's 32 doubled values of a block (bytes 1..16 at p) as int8: low nibbles then high ones,
 * through the value table (`vpshufb`). */
AVX2 static inline __m256i mxfp4_values(const uint8_t *p, __m128i table) {
    const __m128i low_nibbles = _mm_set1_epi8(0xF);
    __m128i bytes = _mm_loadu_si128((const __m128i *)p);
    return _mm256_set_m128i(_mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(bytes, 4), low_nibbles)),
                            _mm_shuffle_epi8(table, _mm_and_si128(bytes, low_nibbles)));
}

AVX2 static void decode_mxfp4_avx2(const uint8_t *w, float *out, int64_t cols) {
    const __m128i table = _mm_loadu_si128((const __m128i *)mxfp4_doubled);
    for (int64_t b = 0; b < cols / 32; b++, w += 17, out += 32) {
        __m256 scale = _mm256_set1_ps(mxfp4_half_scale(w[0]));
        __m256i values = mxfp4_values(w + 1, table);
        __m128i low = _mm256_castsi256_si128(values), high = _mm256_extracti128_si256(values, 1);
        __m128i eights[4] = {low, _mm_srli_si128(low, 8), high, _mm_srli_si128(high, 8)};
        for (int i = 0; i < 4; i++)
            _mm256_storeu_ps(out + 8 * i, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eights[i])), scale));
    }
}

AVX2 static void decode_f16_avx2(const uint8_t *w, float *out, int64_t cols) {
    int64_t i = 0;
    for (; i + 8 <= cols; i += 8)
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + 2 * i))));
    for (; i < cols; i++) out[i] = half(w + 2 * i);
}

AVX2 static void decode_bf16_avx2(const uint8_t *w, float *out, int64_t cols) {
    int64_t i = 0;
    for (; i + 8 <= cols; i += 8) {
        __m256i bits = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(w + 2 * i)));
        _mm256_storeu_ps(out + i, _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16)));
    }
    for (; i < cols; i++) out[i] = bf16_to_float(w + 2 * i);
}

/* Fused products for a few input rows: decode eight values at a time in registers and
 * multiply them at once (no buffer). The per-group scales are applied to sums of q * x, and
 * Q2_K / Q4_K's minimum terms to the input's sums per 16 values (`sum16`), which is the same
 * sum reordered. */
AVX2 static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The sum over 16 values: unsigned codes (16 bytes) times x. */
AVX2 static inline __m256 codes16_times(__m128i codes, const float *x) {
    __m256 low = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes));
    __m256 high = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(codes, 8)));
    return _mm256_fmadd_ps(high, _mm256_loadu_ps(x + 8), _mm256_mul_ps(low, _mm256_loadu_ps(x)));
}

AVX2 static float fused_q8_0_avx2(const uint8_t *w, const float *x, const float *sum16, int64_t cols) {
    (void)sum16;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < cols / 32; b++, w += 34, x += 32) {
        __m256 sum = _mm256_setzero_ps();
        for (int i = 0; i < 32; i += 8) {
            __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + 2 + i)));
            sum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), _mm256_loadu_ps(x + i), sum);
        }
        acc = _mm256_fmadd_ps(sum, _mm256_set1_ps(half(w)), acc);
    }
    return hsum(acc);
}

AVX2 static float fused_q2_k_avx2(const uint8_t *w, const float *x, const float *sum16, int64_t cols) {
    const __m256i mask = _mm256_set1_epi8(3);
    float acc = 0.0f;
    for (int64_t b = 0; b < cols / 256; b++, w += 84, x += 256, sum16 += 16) {
        __m256 products = _mm256_setzero_ps();
        for (int c = 0; c < 8; c++) {
            __m256i bytes = _mm256_loadu_si256((const __m256i *)(w + 16 + 32 * (c / 4)));
            __m256i codes = _mm256_and_si256(_mm256_srli_epi16(bytes, 2 * (c % 4)), mask);
            __m256 low = codes16_times(_mm256_castsi256_si128(codes), x + 32 * c);
            __m256 high = codes16_times(_mm256_extracti128_si256(codes, 1), x + 32 * c + 16);
            products = _mm256_fmadd_ps(low, _mm256_set1_ps((float)(w[2 * c] & 0xF)), products);
            products = _mm256_fmadd_ps(high, _mm256_set1_ps((float)(w[2 * c + 1] & 0xF)), products);
        }
        float mins = 0.0f;
        for (int g = 0; g < 16; g++) mins += (float)(w[g] >> 4) * sum16[g];
        acc += half(w + 80) * hsum(products) - half(w + 82) * mins;
    }
    return acc;
}

AVX2 static float fused_q4_k_avx2(const uint8_t *w, const float *x, const float *sum16, int64_t cols) {
    const __m256i mask = _mm256_set1_epi8(0xF);
    float acc = 0.0f;
    for (int64_t b = 0; b < cols / 256; b++, w += 144, x += 256, sum16 += 16) {
        __m256 products = _mm256_setzero_ps();
        float mins = 0.0f;
        for (int g = 0; g < 8; g++) {
            __m256i bytes = _mm256_loadu_si256((const __m256i *)(w + 16 + 32 * (g / 2)));
            __m256i codes = _mm256_and_si256(_mm256_srli_epi16(bytes, 4 * (g % 2)), mask);
            __m256 sum = _mm256_add_ps(codes16_times(_mm256_castsi256_si128(codes), x + 32 * g),
                                       codes16_times(_mm256_extracti128_si256(codes, 1), x + 32 * g + 16));
            int scale, minimum;
            q4_k_scale_min(w + 4, g, &scale, &minimum);
            products = _mm256_fmadd_ps(sum, _mm256_set1_ps((float)scale), products);
            mins += (float)minimum * (sum16[2 * g] + sum16[2 * g + 1]);
        }
        acc += half(w) * hsum(products) - half(w + 2) * mins;
    }
    return acc;
}

AVX2 static float fused_iq2_xxs_avx2(const uint8_t *w, const float *x, const float *sum16, int64_t cols) {
    (void)sum16;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < cols / 256; b++, w += 66, x += 256) {
        float d = half(w);
        for (int g = 0; g < 8; g++) {
            const uint8_t *group = w + 2 + 8 * g;
            uint32_t aux;
            memcpy(&aux, group + 4, 4);
            __m256 sum = _mm256_setzero_ps();
            for (int l = 0; l < 4; l++) {
                __m256 grid = u8x8_to_float((const uint8_t *)&iq2_xxs_grid[group[l]]);
                __m256 signs = _mm256_castsi256_ps(
                    _mm256_loadu_si256((const __m256i *)iq2_xxs_sign_bits[(aux >> (7 * l)) & 127]));
                sum = _mm256_fmadd_ps(_mm256_xor_ps(grid, signs), _mm256_loadu_ps(x + 32 * g + 8 * l), sum);
            }
            acc = _mm256_fmadd_ps(sum, _mm256_set1_ps(d * (0.5f + (float)(aux >> 28)) * 0.25f), acc);
        }
    }
    return hsum(acc);
}

AVX2 static float fused_mxfp4_avx2(const uint8_t *w, const float *x, const float *sum16, int64_t cols) {
    (void)sum16;
    const __m128i table = _mm_loadu_si128((const __m128i *)mxfp4_doubled);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < cols / 32; b++, w += 17, x += 32) {
        __m256i values = mxfp4_values(w + 1, table);
        __m128i low = _mm256_castsi256_si128(values), high = _mm256_extracti128_si256(values, 1);
        __m128i eights[4] = {low, _mm_srli_si128(low, 8), high, _mm_srli_si128(high, 8)};
        __m256 sum = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eights[0])), _mm256_loadu_ps(x));
        for (int i = 1; i < 4; i++)
            sum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eights[i])), _mm256_loadu_ps(x + 8 * i), sum);
        acc = _mm256_fmadd_ps(sum, _mm256_set1_ps(mxfp4_half_scale(w[0])), acc);
    }
    return hsum(acc);
}

/* A float row's dot product: four independent sums, since one would wait on the latency of
 * each FMA (16-bit rows stream at a quarter of the read's speed with one). */
AVX2 static INLINE_AVX float float_row_dot_avx2(__m256 (*load8)(const uint8_t *), float (*scalar)(const uint8_t *),
                                                const uint8_t *w, const float *x, int64_t cols) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t i = 0;
    for (; i + 32 <= cols; i += 32)
        for (int j = 0; j < 4; j++)
            acc[j] = _mm256_fmadd_ps(load8(w + 2 * (i + 8 * j)), _mm256_loadu_ps(x + i + 8 * j), acc[j]);
    for (; i + 8 <= cols; i += 8) acc[0] = _mm256_fmadd_ps(load8(w + 2 * i), _mm256_loadu_ps(x + i), acc[0]);
    float total = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
    for (; i < cols; i++) total += scalar(w + 2 * i) * x[i];
    return total;
}

AVX2 static INLINE_AVX __m256 f16x8(const uint8_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

AVX2 static INLINE_AVX __m256 bf16x8(const uint8_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

AVX2 static float fused_f16_avx2(const uint8_t *w, const float *x, const float *sum16, int64_t cols) {
    (void)sum16;
    return float_row_dot_avx2(f16x8, half, w, x, cols);
}

AVX2 static float fused_bf16_avx2(const uint8_t *w, const float *x, const float *sum16, int64_t cols) {
    (void)sum16;
    return float_row_dot_avx2(bf16x8, bf16_to_float, w, x, cols);
}

/* ---------------------------------------------------------------- AVX-512 fused products */

/* The same fused products, sixteen values per operation (AVX-512F). */
#define AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))

AVX512 static inline __m512 u8x16_to_float(__m128i bytes) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes));
}

AVX512 static float fused_q8_0_avx512(const uint8_t *w, const float *x, const float *sum16, int64_t cols) {
    (void)sum16;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t b = 0; b < cols / 32; b++, w += 34, x += 32) {
        __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + 2))));
        __m512 high = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + 18))));
        __m512 sum = _mm512_fmadd_ps(high, _mm512_loadu_ps(x + 16), _mm512_mul_ps(low, _mm512_loadu_ps(x)));
        acc = _mm512_fmadd_ps(sum, _mm512_set1_ps(half(w)), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

AVX512 static float fused_q2_k_avx512(const uint8_t *w, const float *x, const float *sum16, int64_t cols) {
    const __m256i mask = _mm256_set1_epi8(3);
    float acc = 0.0f;
    for (int64_t b = 0; b < cols / 256; b++, w += 84, x += 256, sum16 += 16) {
        __m512 products = _mm512_setzero_ps();
        for (int c = 0; c < 8; c++) {
            __m256i bytes = _mm256_loadu_si256((const __m256i *)(w + 16 + 32 * (c / 4)));
            __m256i codes = _mm256_and_si256(_mm256_srli_epi16(bytes, 2 * (c % 4)), mask);
            __m512 low = _mm512_mul_ps(u8x16_to_float(_mm256_castsi256_si128(codes)), _mm512_loadu_ps(x + 32 * c));
            __m512 high =
                _mm512_mul_ps(u8x16_to_float(_mm256_extracti128_si256(codes, 1)), _mm512_loadu_ps(x + 32 * c + 16));
            products = _mm512_fmadd_ps(low, _mm512_set1_ps((float)(w[2 * c] & 0xF)), products);
            products = _mm512_fmadd_ps(high, _mm512_set1_ps((float)(w[2 * c + 1] & 0xF)), products);
        }
        float mins = 0.0f;
        for (int g = 0; g < 16; g++) mins += (float)(w[g] >> 4) * sum16[g];
        acc += half(w + 80) * _mm512_reduce_add_ps(products) - half(w + 82) * mins;
    }
    return acc;
}

AVX512 static float fused_q4_k_avx512(const uint8_t *w, const float *x, const float *sum16, int64_t cols) {
    const __m256i mask = _mm256_set1_epi8(0xF);
    float acc = 0.0f;
    for (int64_t b = 0; b < cols / 256; b++, w += 144, x += 256, sum16 += 16) {
        __m512 products = _mm512_setzero_ps();
        float mins = 0.0f;
        for (int g = 0; g < 8; g++) {
            __m256i bytes = _mm256_loadu_si256((const __m256i *)(w + 16 + 32 * (g / 2)));
            __m256i codes = _mm256_and_si256(_mm256_srli_epi16(bytes, 4 * (g % 2)), mask);
            __m512 low = u8x16_to_float(_mm256_castsi256_si128(codes));
            __m512 high = u8x16_to_float(_mm256_extracti128_si256(codes, 1));
            __m512 sum = _mm512_fmadd_ps(high, _mm512_loadu_ps(x + 32 * g + 16),
                                         _mm512_mul_ps(low, _mm512_loadu_ps(x + 32 * g)));
            int scale, minimum;
            q4_k_scale_min(w + 4, g, &scale, &minimum);
            products = _mm512_fmadd_ps(sum, _mm512_set1_ps((float)scale), products);
            mins += (float)minimum * (sum16[2 * g] + sum16[2 * g + 1]);
        }
        acc += half(w) * _mm512_reduce_add_ps(products) - half(w + 2) * mins;
    }
    return acc;
}

AVX512 static float fused_iq2_xxs_avx512(const uint8_t *w, const float *x, const float *sum16, int64_t cols) {
    (void)sum16;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t b = 0; b < cols / 256; b++, w += 66, x += 256) {
        float d = half(w);
        for (int g = 0; g < 8; g++) {
            const uint8_t *group = w + 2 + 8 * g;
            uint32_t aux;
            memcpy(&aux, group + 4, 4);
            __m512 sum = _mm512_setzero_ps();
            for (int l = 0; l < 4; l += 2) {
                __m512 grid = u8x16_to_float(
                    _mm_set_epi64x((long long)iq2_xxs_grid[group[l + 1]], (long long)iq2_xxs_grid[group[l]]));
                __m512i signs = _mm512_inserti64x4(
                    _mm512_castsi256_si512(
                        _mm256_loadu_si256((const __m256i *)iq2_xxs_sign_bits[(aux >> (7 * l)) & 127])),
                    _mm256_loadu_si256((const __m256i *)iq2_xxs_sign_bits[(aux >> (7 * l + 7)) & 127]), 1);
                __m512 values = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(grid), signs));
                sum = _mm512_fmadd_ps(values, _mm512_loadu_ps(x + 32 * g + 8 * l), sum);
            }
            acc = _mm512_fmadd_ps(sum, _mm512_set1_ps(d * (0.5f + (float)(aux >> 28)) * 0.25f), acc);
        }
    }
    return _mm512_reduce_add_ps(acc);
}

AVX512 static float fused_mxfp4_avx512(const uint8_t *w, const float *x, const float *sum16, int64_t cols) {
    (void)sum16;
    const __m128i table = _mm_loadu_si128((const __m128i *)mxfp4_doubled);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t b = 0; b < cols / 32; b++, w += 17, x += 32) {
        __m256i values = mxfp4_values(w + 1, table);
        __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(values)));
        __m512 high = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(values, 1)));
        __m512 sum = _mm512_fmadd_ps(high, _mm512_loadu_ps(x + 16), _mm512_mul_ps(low, _mm512_loadu_ps(x)));
        acc = _mm512_fmadd_ps(sum, _mm512_set1_ps(mxfp4_half_scale(w[0])), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* As float_row_dot_avx2, 16 values a step. */
AVX512 static INLINE_AVX float float_row_dot_avx512(__m512 (*load16)(const uint8_t *), float (*scalar)(const uint8_t *),
                                                    const uint8_t *w, const float *x, int64_t cols) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int64_t i = 0;
    for (; i + 64 <= cols; i += 64)
        for (int j = 0; j < 4; j++)
            acc[j] = _mm512_fmadd_ps(load16(w + 2 * (i + 16 * j)), _mm512_loadu_ps(x + i + 16 * j), acc[j]);
    for (; i + 16 <= cols; i += 16) acc[0] = _mm512_fmadd_ps(load16(w + 2 * i), _mm512_loadu_ps(x + i), acc[0]);
    float total = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
    for (; i < cols; i++) total += scalar(w + 2 * i) * x[i];
    return total;
}

AVX512 static INLINE_AVX __m512 f16x16(const uint8_t *p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}

AVX512 static INLINE_AVX __m512 bf16x16(const uint8_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

AVX512 static float fused_f16_avx512(const uint8_t *w, const float *x, const float *sum16, int64_t cols) {
    (void)sum16;
    return float_row_dot_avx512(f16x16, half, w, x, cols);
}

AVX512 static float fused_bf16_avx512(const uint8_t *w, const float *x, const float *sum16, int64_t cols) {
    (void)sum16;
    return float_row_dot_avx512(bf16x16, bf16_to_float, w, x, cols);
}
#endif

/* ---------------------------------------------------------------- integer products (AVX-512 VNNI) */

/* The input rows are quantized once per call: per block of ACT_BLOCK values a float scale s and
 * three int8 parts, x ≈ s (a0 + a1 / 254 + a2 / 254²) with |a_k| ≤ 127, each part the rounded
 * remainder of the one before. That is about 24 bits, as exact as float32: the rounding left is
 * at most s / (2·254²) ≈ 6.1e-8 · max|x| of the block per value (plus float32's own rounding of
 * x / s), where one int8 part (llama.cpp's Q8_K) leaves s / 2 and moves a 2-bit model's logits by
 * whole units. Each stored weight group is decoded once to 8-bit integers (scale folded in where
 * it fits: Q2_K's 4-bit scale times its 2-bit codes), multiplied with the three parts by
 * `vpdpbusd` (unsigned weights, signed parts: Q8_0's, IQ2_XXS's and MXFP4's weights are 128, 43
 * and 12 more than the signed ones, their sums start from the offsets), and the three integer
 * sums are combined in float once per register or block. The parts are stored in the weight's
 * order (natural_position), so that one 64-byte load of stored codes meets one of input parts:
 * quantize_row_avx512 rounds each block in registers and lays it out there, by one two-register
 * byte permute per 64 bytes (packed_layouts), before its only store.
 * Q2_K and Q4_K's minimum terms use the input's float sums per 16 values. */
#define MAX_ROWS 2      /* input rows multiplied per pass over a stored row */
#define INTEGER_TILE 4  /* stored rows per pass over the inputs */
/* stored rows per call where the inputs take one pass (at most MAX_ROWS of them): each call loads
 * its constant registers afresh (one input row, one thread, cold, 4096x2048: IQ2_XXS 106.8 us with
 * 4 rows a call, 100.7 with 16; MXFP4 147.3 and 137.6; the other formats within noise) */
#define ONE_PASS_TILE 16

typedef struct {
    int8_t *parts; /* (n, 3, stride): part k of input row i at parts + (3 i + k) stride */
    float *scales; /* (n, blocks of ACT_BLOCK, the last possibly short) */
    float *sum16;  /* (n, cols / 16): sums of x per 16 values, natural order (Q2_K, Q4_K) */
    int32_t *offsets; /* per block: (2, 16) IQ2_XXS (offset_sums), (3, 16) MXFP4, Q8_0 (offset_sums3) */
    int64_t cols, blocks;
    int64_t stride; /* 64 past the whole blocks (MXFP4 pads a short last one): rows 4 KiB apart would share
                     * the L1 cache's sets */
} Activations;

/* Where value p of a 256-value block sits in the natural order. Q2_K registers hold two 32-value
 * runs 128 values apart. Q4_K and IQ2_XXS are laid out so that each 4-byte lane of every register
 * holds values of one group of 32, the same group in all four (see their kernels): Q4_K's
 * register j, 128-bit lane c, dword m takes code bytes 16 (j % 2) + 4 (m ^ j / 2).. of the
 * 32-byte chunk c, low nibbles (values 64 c + byte) in even dwords, high ones (64 c + 32 + byte)
 * in odd ones: group 2 c + m % 2. IQ2_XXS: dword 4 L + t of register j holds value 2 j + t / 2
 * of the four runs of 8 of group 2 L + t % 2; two blocks' registers j are then interleaved by
 * dwords (quantize_row_avx512), so that register m of a pair of blocks holds value m of every run of
 * 8, each dword four runs of one group of one block (see int_iq2_xxs_rows). MXFP4: register j,
 * lanes 2 b and 2 b + 1, values 16 (j / 2) + 8 (j % 2).. + 7 of stored block b. Q8_0: register j,
 * lanes 2 b and 2 b + 1, values 8 j.. + 7 of stored block b; its short last block stays in the
 * natural order. */
static int natural_position(int kind, int p) {
    int j = p / 64, half = (p % 64) / 32, offset = p % 32, q = p % 64;
    if (kind == Q2_K) return 32 * j + 128 * half + offset;
    if (kind == Q4_K) {
        int chunk = q / 16, dword = (q / 4) % 4;
        return 64 * chunk + 32 * (dword % 2) + 16 * (j % 2) + 4 * (dword ^ (j / 2)) + q % 4;
    }
    if (kind == IQ2_XXS) {
        int dword = q / 4, m = 2 * j + (dword % 4) / 2, group = 2 * (dword / 4) + dword % 2;
        return 32 * group + 8 * (p % 4) + m;
    }
    if (kind == MXFP4) return 32 * (q / 8) + 16 * (j / 2) + 8 * (j % 2) + q % 8;
    if (kind == Q8_0) return 32 * (q / 8) + 8 * j + q % 8;
    return p;
}

/* Where natural value v of a block sits after packing its four registers of 16 int32 per 64 values
 * to bytes (_mm512_packs_epi32 twice, then _mm512_packs_epi16, each per 128-bit lane). */
static int packed_position(int v) {
    int q = v / 64, m = (v % 64) / 16, lane = (v % 16) / 4, e = v % 4;
    return 64 * q + 16 * lane + 4 * m + e;
}

/* out[MAX_ROWS i + r] = stored row i (at w + i row_stride, cols values) @ input row rows[r], for
 * i < stored and r < count ≤ MAX_ROWS. */
typedef void (*IntDotFn)(const uint8_t *w, int64_t row_stride, int stored, const Activations *a, const int64_t *rows,
                         int count, float *out);

/* Constant vectors, filled by build_tables. */
static uint32_t q2_k_multiples[16]; /* dword c: bytes 0, c, 2c, 3c */
static uint8_t q2_k_spread[64];      /* byte 16 t + s of the code-at-bits-4-5 table: 4 s + t of the other */
static uint8_t q2_k_offsets[4][64];  /* register j, byte p: its sub-block's bits in the index (see int_q2_k_rows) */
uint8_t iq2_magnitudes[64];          /* these two: see cpu_shared.h */
uint8_t iq2_signs[128];
static uint8_t q8_0_scale_bytes[2][64]; /* blocks 0-3 from bytes 0..127, 4-7 from 128..255: byte permutes */
static uint8_t q4_k_spread[2][64];   /* byte 4 L: lane L's scale, minimum in [scales, minimums] */
static uint8_t layouts[5][256];     /* Q2_K, Q4_K, IQ2_XXS, MXFP4, Q8_0: natural_position */
/* the same, for the registers of bytes that _mm512_packs_epi32 then _mm512_packs_epi16 leave: 64 q
 * + byte 16 L + 4 m + e of those holds value 64 q + 16 m + 4 L + e (packed_position) */
static uint8_t packed_layouts[5][256];
static uint8_t iq2_sign_windows[2][64]; /* byte p (run p % 4): bits 28 + 7 (p % 4), 32 + 7 (p % 4) */
/* 43 + the signed weight, from the 2-bit code at bits 2 j and the sign at bit 4 + j of the index */
static uint8_t iq2_offset_weights[2][64];
static uint8_t iq2_code_bytes[2][256]; /* low, high byte of each grid point's code */
static uint8_t iq2_pair_index[64];  /* byte p: byte 8 (p / 8) + p % 4 of the first (p % 8 < 4) or second block */
static uint8_t mxfp4_offset_values[64]; /* 12 + mxfp4_doubled, four times: indexed by the low 6 bits */
static uint8_t mxfp4_codes_index[64];    /* byte 8 b + t: block b's code byte t, from 128 bytes */
static uint8_t mxfp4_exponent_index[64]; /* byte 4 l: block l / 2's exponent byte, from 128 bytes */
static float iq2_group_scales[16];  /* (0.5 + s) / 4 = (2 s + 1) / 8 of each 4-bit group scale s */

/* Which of `layouts` the inputs' parts of format `kind` take, -1 for the natural order. */
static int layout_number(int kind) {
    return kind == Q2_K ? 0 : kind == Q4_K ? 1 : kind == IQ2_XXS ? 2 : kind == MXFP4 ? 3 : kind == Q8_0 ? 4 : -1;
}

static void build_int_tables(void) {
    for (int p = 0; p < 64; p++) {
        q2_k_spread[p] = (uint8_t)(4 * (p % 16) + p / 16);
        /* halves 2 g, 2 g + 1: block g's scale, at byte 34 g (less 128 for blocks 4-7) */
        q8_0_scale_bytes[0][p] = (uint8_t)(34 * (p / 4 % 4) + p % 2);
        q8_0_scale_bytes[1][p] = (uint8_t)(34 * (p / 4 % 4 + 4) - 128 + p % 2);
        int group = 2 * (p / 16) + (p / 4) % 2; /* lane L = p / 4: group 2 (L / 4) + L % 2 */
        q4_k_spread[0][p] = (uint8_t)(group + 4 * (group / 4));
        q4_k_spread[1][p] = (uint8_t)(4 + p / 8 + 4 * (p / 32)); /* sum16 L: group L / 2 */
        iq2_magnitudes[p] = (uint8_t)((const uint8_t[]){8, 25, 43, 0})[p & 3];
        iq2_sign_windows[0][p] = (uint8_t)(28 + 7 * (p % 4));
        iq2_sign_windows[1][p] = (uint8_t)(32 + 7 * (p % 4));
        iq2_pair_index[p] = (uint8_t)(64 * ((p % 8) / 4) + 8 * (p / 8) + p % 4);
        for (int j = 0; j < 4; j++) {
            int lane = p / 16, subs[4] = {2 * j, 2 * j + 1, 8 + 2 * j, 9 + 2 * j};
            q2_k_offsets[j][p] = (uint8_t)(j < 2 ? 4 * subs[lane] : subs[lane]);
        }
    }
    for (int c = 0; c < 16; c++) {
        q2_k_multiples[c] = (uint32_t)c * 0x03020100u;
        iq2_group_scales[c] = (float)(2 * c + 1) / 8.0f;
    }
    for (int i = 0; i < 128; i++) iq2_signs[i] = (uint8_t)(i | (__builtin_popcount(i) & 1) << 7);
    for (int p = 0; p < 64; p++) {
        mxfp4_offset_values[p] = (uint8_t)(12 + mxfp4_doubled[p % 16]);
        mxfp4_codes_index[p] = (uint8_t)(17 * (p / 8) + 1 + p % 8);
        mxfp4_exponent_index[p] = (uint8_t)(17 * (p / 8));
    }
    for (int j = 0; j < 2; j++)
        for (int e = 0; e < 64; e++) {
            int magnitude = iq2_magnitudes[(e >> (2 * j)) & 3];
            iq2_offset_weights[j][e] = (uint8_t)(e >> (4 + j) & 1 ? 43 - magnitude : 43 + magnitude);
        }
    for (int p = 0; p < 256; p++) {
        iq2_code_bytes[0][p] = (uint8_t)(iq2_xxs_grid_codes[p] & 0xFF);
        iq2_code_bytes[1][p] = (uint8_t)(iq2_xxs_grid_codes[p] >> 8);
        layouts[0][p] = (uint8_t)natural_position(Q2_K, p);
        layouts[1][p] = (uint8_t)natural_position(Q4_K, p);
        layouts[2][p] = (uint8_t)natural_position(IQ2_XXS, p);
        layouts[3][p] = (uint8_t)natural_position(MXFP4, p);
        layouts[4][p] = (uint8_t)natural_position(Q8_0, p);
        for (int f = 0; f < 5; f++) packed_layouts[f][p] = (uint8_t)packed_position(layouts[f][p]);
    }
}

#ifdef HAVE_X86
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")))
#define INLINE inline __attribute__((always_inline))

/* The float value of the three parts' integer sums s0 + s1 / 254 + s2 / 254². */
VNNI static INLINE __m512 parts_to_float(__m512i s0, __m512i s1, __m512i s2) {
    __m512 value = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1), _mm512_set1_ps(1.0f / 254.0f), _mm512_cvtepi32_ps(s0));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(s2), _mm512_set1_ps(1.0f / (254.0f * 254.0f)), value);
}

/* 256 bytes at p in the order `layout` (byte i = p[layout[i]]), in place (MXFP4's short last
 * block, rounded by quantize_row_avx2). */
VNNI static void permute_block(int8_t *p, const uint8_t *layout) {
    __m512i n0 = _mm512_loadu_si512(p), n1 = _mm512_loadu_si512(p + 64), n2 = _mm512_loadu_si512(p + 128);
    __m512i n3 = _mm512_loadu_si512(p + 192);
    for (int j = 0; j < 4; j++) {
        __m512i index = _mm512_loadu_si512(layout + 64 * j);
        _mm512_storeu_si512(p + 64 * j, _mm512_mask_blend_epi8(_mm512_movepi8_mask(index),
                                                               _mm512_permutex2var_epi8(n0, index, n1),
                                                               _mm512_permutex2var_epi8(n2, index, n3)));
    }
}

/* Register m of IQ2_XXS's parts of a pair of blocks at p; `lone`: a last odd block, stored as one
 * block (not interleaved when quantized), interleaved here with zeros. */
VNNI static INLINE __m512i iq2_parts(const int8_t *p, int m, int lone) {
    if (!lone) return _mm512_loadu_si512(p + 64 * m);
    __m512i block = _mm512_loadu_si512(p + 64 * (m / 2)), zero = _mm512_setzero_si512();
    return m % 2 ? _mm512_unpackhi_epi32(block, zero) : _mm512_unpacklo_epi32(block, zero);
}

/* One whole block of 256 values at x rounded as quantize_row_avx2 rounds it, value for value (the
 * same divisions and roundings, 16 values a step), its scale to *scale, and its first `count`
 * parts laid out by `index` (packed_layouts) into out[k][0..3]. */
VNNI static INLINE void quantize_block(const float *x, const uint8_t *index, int count, __m512i out[3][4], float *scale) {
    __m512 most[4];
    __mmask16 unordered = 0; /* max drops nan */
    for (int i = 0; i < 4; i++) most[i] = _mm512_setzero_ps();
    for (int j = 0; j < 16; j++) {
        __m512 v = _mm512_loadu_ps(x + 16 * j);
        most[j % 4] = _mm512_max_ps(most[j % 4], _mm512_abs_ps(v));
        unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
    float top = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(most[0], most[1]), _mm512_max_ps(most[2], most[3])));
    if (unordered || !(top < INFINITY)) top = NAN;
    float s = top / 127.0f;
    *scale = s;
    const __m512 divisor = _mm512_set1_ps(s > 0.0f ? s : 1.0f), radix = _mm512_set1_ps(254.0f);
    __m512i packed[3][4];
    for (int j = 0; j < 4; j++) { /* 64 values: four registers of int32 packed to bytes per part */
        __m512i part[3][4];
        for (int i = 0; i < 4; i++) {
            __m512 r = _mm512_div_ps(_mm512_loadu_ps(x + 64 * j + 16 * i), divisor);
            for (int k = 0; k < count; k++) {
                __m512 rounded = _mm512_roundscale_ps(r, ROUND_NEAREST);
                part[k][i] = _mm512_cvtps_epi32(rounded);
                r = _mm512_mul_ps(_mm512_sub_ps(r, rounded), radix);
            }
        }
        for (int k = 0; k < count; k++) /* saturating, as the AVX2 packs; the lanes' order is in `index` */
            packed[k][j] = _mm512_packs_epi16(_mm512_packs_epi32(part[k][0], part[k][1]),
                                              _mm512_packs_epi32(part[k][2], part[k][3]));
    }
    for (int j = 0; j < 4; j++) {
        __m512i at = _mm512_loadu_si512(index + 64 * j);
        __mmask64 upper = _mm512_movepi8_mask(at);
        for (int k = 0; k < count; k++)
            out[k][j] = _mm512_mask_blend_epi8(upper, _mm512_permutex2var_epi8(packed[k][0], at, packed[k][1]),
                                               _mm512_permutex2var_epi8(packed[k][2], at, packed[k][3]));
    }
}

/* Round input row x to its parts in the weight's order (quantize_row_avx2's rounding; each whole
 * block laid out while in registers, IQ2_XXS's pairs of blocks interleaved there too, and only its
 * two parts made), its scales, and its sums per 16 values when sum16 is given. A short last block
 * goes through quantize_row_avx2: MXFP4's then padded with zeros to 256 values (the stride leaves
 * room) and laid out, Q8_0's left in the natural order. */
VNNI void quantize_row_avx512(int kind, const float *x, int64_t cols, int64_t stride, int8_t *parts,
                              float *scales, float *sum16) {
    int number = layout_number(kind);
    if (number < 0) {
        quantize_row_avx2(x, cols, stride, parts, scales, sum16);
        return;
    }
    const uint8_t *index = packed_layouts[number];
    int64_t whole = cols / ACT_BLOCK;
    int count = kind == IQ2_XXS ? 2 : 3;
    for (int64_t b = 0; b < whole; b++) {
        __m512i block[3][4];
        quantize_block(x + ACT_BLOCK * b, index, count, block, scales + b);
        if (kind == IQ2_XXS && b + 1 < whole) { /* a pair: registers j of both, dwords interleaved */
            __m512i second[3][4];
            quantize_block(x + ACT_BLOCK * (b + 1), index, count, second, scales + b + 1);
            for (int k = 0; k < count; k++)
                for (int j = 0; j < 4; j++) {
                    int8_t *at = parts + k * stride + ACT_BLOCK * b + 128 * j;
                    _mm512_storeu_si512(at, _mm512_unpacklo_epi32(block[k][j], second[k][j]));
                    _mm512_storeu_si512(at + 64, _mm512_unpackhi_epi32(block[k][j], second[k][j]));
                }
            b++;
            continue;
        }
        for (int k = 0; k < count; k++)
            for (int j = 0; j < 4; j++) _mm512_storeu_si512(parts + k * stride + ACT_BLOCK * b + 64 * j, block[k][j]);
    }
    int64_t start = ACT_BLOCK * whole;
    if (start < cols) {
        quantize_row_avx2(x + start, cols - start, stride, parts + start, scales + whole, NULL);
        if (kind == MXFP4)
            for (int k = 0; k < 3; k++) {
                memset(parts + k * stride + cols, 0, (size_t)(start + ACT_BLOCK - cols));
                permute_block(parts + k * stride + start, layouts[number]);
            }
    }
    if (sum16) sums_of_16(x, cols, sum16);
}

/* IQ2_XXS's sums start from -43 times each lane's sum of the part (its weights are 43 more than
 * the signed ones, see int_iq2_xxs_rows); it takes two parts only. */
VNNI static void offset_sums(const int8_t *parts, int64_t stride, int64_t cols, int32_t *offsets) {
    const __m512i offset = _mm512_set1_epi8(43);
    int64_t blocks = cols / 256;
    for (int64_t b = 0; b < blocks; b += 2) /* per pair of blocks, at the first one's place */
        for (int k = 0; k < 2; k++) {
            __m512i sum = _mm512_setzero_si512();
            for (int m = 0; m < 8; m++)
                sum = _mm512_dpbusd_epi32(sum, offset, iq2_parts(parts + k * stride + 256 * b, m, b + 1 == blocks));
            _mm512_storeu_si512(offsets + (2 * b + k) * 16, _mm512_sub_epi32(_mm512_setzero_si512(), sum));
        }
}

/* MXFP4's and Q8_0's sums start from -c times each lane's sum of the part over a block's four
 * registers (their weights are c = 12, 128 more than the signed ones, see int_mxfp4_rows,
 * int_q8_0_rows): 16 int32 per block and part, for the first `blocks` (MXFP4: a short last one
 * too, padded with zeros; Q8_0: the whole ones). */
VNNI static void offset_sums3(const int8_t *parts, int64_t stride, int64_t blocks, uint8_t c, int32_t *offsets) {
    const __m512i offset = _mm512_set1_epi8((char)c);
    for (int64_t b = 0; b < blocks; b++)
        for (int k = 0; k < 3; k++) {
            __m512i sum = _mm512_setzero_si512();
            for (int j = 0; j < 4; j++)
                sum = _mm512_dpbusd_epi32(sum, offset, _mm512_loadu_si512(parts + k * stride + 256 * b + 64 * j));
            _mm512_storeu_si512(offsets + (3 * b + k) * 16, _mm512_sub_epi32(_mm512_setzero_si512(), sum));
        }
}

/* Part k of input row rows[r] at value `at`. */
#define SCALE(r, b) a->scales[rows[r] * a->blocks + (b)]

/* Where the `count` input rows' parts, offsets (`offsets_per_block` int32 a block), scales and sums
 * per 16 values start: worked out once per stored row (or tile), not per block, where it took
 * about fifteen scalar instructions a block (one thread, cache-warm, 2048x4096, best of 400:
 * IQ2_XXS 98.5-100.1 -> 96.4-98.3 µs, two input rows 150-152 -> 139-144; Q2_K 111-114 ->
 * 109-111; Q8_0 and Q4_K the same). MXFP4 keeps its own: with these its cache-warm product was
 * 8% faster but one read from memory 14% slower (158-160 -> 181-183 µs), for no reason found. */
typedef struct {
    const int8_t *parts[MAX_ROWS];
    const int32_t *offsets[MAX_ROWS];
    const float *scales[MAX_ROWS], *sum16[MAX_ROWS];
    int64_t stride;
} InputRows;

static INLINE InputRows input_rows(const Activations *a, const int64_t *rows, const int count,
                                   const int offsets_per_block) {
    InputRows in = {.stride = a->stride};
    for (int r = 0; r < count; r++) {
        in.parts[r] = a->parts + 3 * rows[r] * a->stride;
        in.offsets[r] = a->offsets ? a->offsets + rows[r] * a->blocks * offsets_per_block : NULL;
        in.scales[r] = a->scales + rows[r] * a->blocks;
        in.sum16[r] = a->sum16 ? a->sum16 + rows[r] * (a->cols / 16) : NULL;
    }
    return in;
}

/* The three products of 64 unsigned weights with the parts at `at`, negated where `negative`. */
VNNI static INLINE __m512 times_parts(__m512i weights, __mmask64 negative, const Activations *a, int64_t row,
                                      int64_t at) {
    const int8_t *part = a->parts + 3 * row * a->stride + at;
    const __m512i zero = _mm512_setzero_si512();
    __m512i p0 = _mm512_loadu_si512(part), p1 = _mm512_loadu_si512(part + a->stride);
    __m512i p2 = _mm512_loadu_si512(part + 2 * a->stride);
    if (negative) {
        p0 = _mm512_mask_sub_epi8(p0, negative, zero, p0);
        p1 = _mm512_mask_sub_epi8(p1, negative, zero, p1);
        p2 = _mm512_mask_sub_epi8(p2, negative, zero, p2);
    }
    return parts_to_float(_mm512_dpbusd_epi32(zero, weights, p0), _mm512_dpbusd_epi32(zero, weights, p1),
                          _mm512_dpbusd_epi32(zero, weights, p2));
}

/* Q8_0 over a short last block (natural order): 64 values (two blocks) per register, the signs
 * on the parts, one float conversion per register; adds to acc[r] from value `start` on. */
VNNI static INLINE void q8_0_tail(const uint8_t *w, const Activations *a, const int64_t *rows, const int count,
                                  int64_t start, __m512 *acc) {
    int64_t stop = a->cols, b = start / ACT_BLOCK;
    __m512 block[MAX_ROWS];
    for (int r = 0; r < count; r++) block[r] = _mm512_setzero_ps();
    for (int64_t at = start; at < stop; at += 64, w += 68) {
        __m512i q;
        __m512 scale;
        if (at + 64 <= stop) {
            q = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(w + 2))),
                                   _mm256_loadu_si256((const __m256i *)(w + 36)), 1);
            scale = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(half(w)), _mm512_set1_ps(half(w + 34)));
        } else { /* a last odd block: the upper half weighs nothing */
            q = _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)(w + 2)));
            scale = _mm512_maskz_mov_ps(0x00FF, _mm512_set1_ps(half(w)));
        }
        __mmask64 negative = _mm512_movepi8_mask(q);
        __m512i magnitude = _mm512_abs_epi8(q);
        for (int r = 0; r < count; r++)
            block[r] = _mm512_fmadd_ps(times_parts(magnitude, negative, a, rows[r], at), scale, block[r]);
    }
    for (int r = 0; r < count; r++) acc[r] = _mm512_fmadd_ps(block[r], _mm512_set1_ps(SCALE(r, b)), acc[r]);
}

/* Q8_0, whole blocks of 256 values (8 stored blocks of 32, 272 bytes): the codes are transposed
 * so that register j holds bytes 8 j.. of each block (qword g: block g; natural_position), two
 * 4-byte lanes per block in all four registers, so the three integer sums run over the 256
 * values and the blocks' scales apply once, in float. Eight 32-byte loads (two blocks per
 * register), `vpunpck[lh]qdq` and `vshufi64x2` transpose the 32 qwords. The codes are signed:
 * stored 128 more (unsigned, one XOR), Σ (q + 128) a = Σ q a + 128 Σ a, and the sums start from
 * -128 times each lane's sum of the part (offset_sums3, once per call). A lane sums 16 products of
 * at most 255 · 127, < 2^19: exact in float. The eight fp16 scales come from four 64-byte loads
 * by two byte permutes, each doubled (lanes 2 g, 2 g + 1: block g). */
VNNI static INLINE void int_q8_0_rows(const uint8_t *w, const Activations *a, const int64_t *rows, const int count,
                                      float *out) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const __m512i first_scales = _mm512_loadu_si512(q8_0_scale_bytes[0]);
    const __m512i last_scales = _mm512_loadu_si512(q8_0_scale_bytes[1]);
    const int64_t stride = a->stride, whole = a->cols / 256;
    const InputRows in = input_rows(a, rows, count, 48);
    __m512 acc[MAX_ROWS];
    for (int r = 0; r < count; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < whole; b++, w += 272) {
        __m512i pairs[4]; /* blocks (0, 2), (1, 3), (4, 6), (5, 7) */
        for (int i = 0; i < 4; i++) {
            const uint8_t *first = w + 2 + 34 * ((i / 2) * 4 + i % 2);
            pairs[i] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)first)),
                                          _mm256_loadu_si256((const __m256i *)(first + 68)), 1);
        }
        __m512i even0 = _mm512_unpacklo_epi64(pairs[0], pairs[1]), odd0 = _mm512_unpackhi_epi64(pairs[0], pairs[1]);
        __m512i even4 = _mm512_unpacklo_epi64(pairs[2], pairs[3]), odd4 = _mm512_unpackhi_epi64(pairs[2], pairs[3]);
        __m512i weights[4];
        weights[0] = _mm512_xor_si512(_mm512_shuffle_i64x2(even0, even4, _MM_SHUFFLE(2, 0, 2, 0)), flip);
        weights[1] = _mm512_xor_si512(_mm512_shuffle_i64x2(odd0, odd4, _MM_SHUFFLE(2, 0, 2, 0)), flip);
        weights[2] = _mm512_xor_si512(_mm512_shuffle_i64x2(even0, even4, _MM_SHUFFLE(3, 1, 3, 1)), flip);
        weights[3] = _mm512_xor_si512(_mm512_shuffle_i64x2(odd0, odd4, _MM_SHUFFLE(3, 1, 3, 1)), flip);
        __m512i halves = _mm512_mask_blend_epi8(
            0xFFFF0000ull,
            _mm512_permutex2var_epi8(_mm512_loadu_si512(w), first_scales, _mm512_loadu_si512(w + 64)),
            _mm512_permutex2var_epi8(_mm512_loadu_si512(w + 128), last_scales, _mm512_loadu_si512(w + 192)));
        __m512 lane_scales = _mm512_cvtph_ps(_mm512_castsi512_si256(halves));
        for (int r = 0; r < count; r++) {
            const int8_t *part = in.parts[r] + 256 * b;
            const int32_t *offsets = in.offsets[r] + 48 * b;
            __m512i s0 = _mm512_loadu_si512(offsets), s1 = _mm512_loadu_si512(offsets + 16);
            __m512i s2 = _mm512_loadu_si512(offsets + 32);
            for (int j = 0; j < 4; j++) {
                s0 = _mm512_dpbusd_epi32(s0, weights[j], _mm512_loadu_si512(part + 64 * j));
                s1 = _mm512_dpbusd_epi32(s1, weights[j], _mm512_loadu_si512(part + stride + 64 * j));
                s2 = _mm512_dpbusd_epi32(s2, weights[j], _mm512_loadu_si512(part + 2 * stride + 64 * j));
            }
            __m512 scale = _mm512_mul_ps(lane_scales, _mm512_set1_ps(in.scales[r][b]));
            acc[r] = _mm512_fmadd_ps(parts_to_float(s0, s1, s2), scale, acc[r]);
        }
    }
    if (whole * 256 < a->cols) q8_0_tail(w, a, rows, count, whole * 256, acc);
    for (int r = 0; r < count; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}

/* MXFP4, 256 values (eight stored blocks, 136 bytes) at a time in four registers, lanes 2 b and
 * 2 b + 1 of each holding values of block b: registers 0 and 1 the low nibbles (values 0-15) of
 * each block's code bytes 0-7 and 8-15, registers 2 and 3 their high nibbles (values 16-31); the
 * inputs' parts are laid out to match (natural_position; a short last block is padded with zero
 * parts and its missing stored blocks read as zero codes). Code bytes 0-7 of the eight blocks
 * come out of the first 128 bytes by one byte permute, bytes 8-15 out of the 128 from byte 8 by
 * the same; the low nibbles index the value table (16 entries four times: bits 4-5 are ignored)
 * as they are, the high ones after a shift. The table holds the doubled values plus 12 (0 to 24,
 * unsigned: the signed parts are `vpdpbusd`'s memory operand), so each lane's sums start from
 * -12 times the lane's sum of the part over the four registers (offset_sums3, once per
 * input row). Each lane then sums 16 values of one block, exactly (|Σ a w| ≤ 16 · 127 · 12 =
 * 24384), and the three sums go to float once per 256 values, times each lane's scale 2^(e - 128)
 * (vscalefps: subnormal for e < 2) and the input's s. */
typedef struct {
    __m512i table, codes_index, exponent_index;
} Mxfp4Tables;

/* The mask of the first `bytes` bytes of a register (none when bytes ≤ 0). */
static inline uint64_t first_bytes(int64_t bytes) {
    return bytes <= 0 ? 0 : bytes >= 64 ? ~0ull : (1ull << bytes) - 1;
}

/* 64 bytes at w + at, of which the first `bytes` - at are stored (all of them when whole). */
VNNI static INLINE __m512i mxfp4_load(const uint8_t *w, int64_t at, const int whole, int64_t bytes) {
    return whole ? _mm512_loadu_si512(w + at) : _mm512_maskz_loadu_epi8(first_bytes(bytes - at), w + at);
}

/* Stored bytes prefetched ahead of the block in hand (48 blocks). With the hardware's prefetch
 * alone, a one-row product of 2048x4096 read from memory (cycling 134 MB of copies) took 320-335
 * µs against 122 in cache, two rows 460-510 against 195; 48 blocks ahead: 150-160 and 245-255
 * (8, 16, 24, 32 blocks: 175, 190, 160, 170). 4096x2048 read from memory was not hurt as much:
 * 157-161 µs, 148-150 with the prefetch (two rows 215 -> 230). The prefetches cost the cache-warm
 * products 10-15% (one thread, load ~2.7). The same prefetch (1, 2, 4, 8 or 12 KB ahead, a line
 * per 64 bytes) in the Q8_0 and Q4_K one-row products gained nothing clear in the best calls and
 * is left out (Q2_K's and IQ2_XXS's typical calls gain: Q2_K_AHEAD, IQ2_XXS_AHEAD): the hardware's keeps up with their rows (2048x4096 read from memory, one thread: Q2_K
 * 108 µs against 104 in cache, IQ2_XXS 105 against 100, Q4_K 116-126 against 114-116, Q8_0
 * 153-159 against 145-149), two threads on Q8_0 read at the memory's pace (88-100 µs, about 100 GB/s,
 * with or without), and the prefetches cost the cache-warm products 2-18% (Q8_0 148 -> 154-173 µs,
 * two threads 77 -> 81-91; load ~1). */
#define MXFP4_AHEAD (48 * 136)

/* One block of 256 values at w, `bytes` of it stored (136: whole). */
VNNI static INLINE void mxfp4_block(const Mxfp4Tables *t, const uint8_t *w, const int64_t bytes,
                                    const Activations *a, const int64_t *rows, const int count, int64_t b,
                                    __m512 *acc) {
    const int whole = bytes == 136;
    _mm_prefetch((const char *)w + MXFP4_AHEAD, _MM_HINT_T0); /* a block spans three lines at most: */
    _mm_prefetch((const char *)w + MXFP4_AHEAD + 64, _MM_HINT_T0); /* the next one's first takes its last */
    __m512i low = mxfp4_load(w, 0, whole, bytes), high = mxfp4_load(w, 64, whole, bytes);
    __m512i codes[2] = {_mm512_permutex2var_epi8(low, t->codes_index, high),
                        _mm512_permutex2var_epi8(mxfp4_load(w, 8, whole, bytes), t->codes_index,
                                                 mxfp4_load(w, 72, whole, bytes))};
    __m512i weights[4];
    for (int h = 0; h < 2; h++) {
        weights[h] = _mm512_permutexvar_epi8(codes[h], t->table);
        weights[2 + h] = _mm512_permutexvar_epi8(_mm512_srli_epi16(codes[h], 4), t->table);
    }
    /* lane 2 b + h: block b's scale 2^(e - 128), subnormal for e < 2 */
    __m512i exponents = _mm512_maskz_permutex2var_epi8(0x1111111111111111ull, low, t->exponent_index, high);
    __m512 scale = _mm512_scalef_ps(_mm512_set1_ps(1.0f),
                                    _mm512_cvtepi32_ps(_mm512_sub_epi32(exponents, _mm512_set1_epi32(128))));
    for (int r = 0; r < count; r++) {
        const int8_t *part = a->parts + 3 * rows[r] * a->stride + 256 * b;
        const int32_t *offsets = a->offsets + (rows[r] * a->blocks + b) * 48;
        __m512i sum[3];
        for (int k = 0; k < 3; k++) { /* two chains of two vpdpbusd: one of four waits on itself */
            const int8_t *at = part + k * a->stride;
            __m512i first = _mm512_dpbusd_epi32(_mm512_loadu_si512(offsets + 16 * k), weights[0], _mm512_loadu_si512(at));
            __m512i second = _mm512_dpbusd_epi32(_mm512_setzero_si512(), weights[2], _mm512_loadu_si512(at + 128));
            first = _mm512_dpbusd_epi32(first, weights[1], _mm512_loadu_si512(at + 64));
            second = _mm512_dpbusd_epi32(second, weights[3], _mm512_loadu_si512(at + 192));
            sum[k] = _mm512_add_epi32(first, second);
        }
        __m512 block = _mm512_mul_ps(parts_to_float(sum[0], sum[1], sum[2]), scale);
        acc[r] = _mm512_fmadd_ps(block, _mm512_set1_ps(SCALE(r, b)), acc[r]);
    }
}

VNNI static INLINE void int_mxfp4_rows(const uint8_t *w, const Activations *a, const int64_t *rows, const int count,
                                       float *out) {
    const Mxfp4Tables t = {_mm512_loadu_si512(mxfp4_offset_values), _mm512_loadu_si512(mxfp4_codes_index),
                           _mm512_loadu_si512(mxfp4_exponent_index)};
    __m512 acc[MAX_ROWS];
    for (int r = 0; r < count; r++) acc[r] = _mm512_setzero_ps();
    int64_t whole = a->cols / 256;
#pragma GCC unroll 2
    for (int64_t b = 0; b < whole; b++, w += 136) mxfp4_block(&t, w, 136, a, rows, count, b, acc);
    if (a->cols % 256) mxfp4_block(&t, w, a->cols % 256 / 32 * 17, a, rows, count, whole, acc);
    for (int r = 0; r < count; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}

/* Q2_K, 84 bytes per 256 values: a scale byte (minimum << 4 | scale) per sub-block of 16 values,
 * 64 code bytes, d, dmin. Register j takes the codes at bits 2 j of the code bytes, values
 * 32 j + p % 32 + 128 (p / 32) of the block (natural_position), so that its 128-bit lane L holds
 * one sub-block, 2 j + {0, 1, 8, 9}[L]. One byte lookup per register gives the code times its
 * 4-bit scale (≤ 45), from a table built per block in two instructions: the scale bytes,
 * zero-extended to dwords, pick by their low 4 bits (`vpermd`) the dword of bytes 0, c, 2c, 3c of
 * a constant, so that byte 4 s + t = t · scale s. Registers 0 and 1 index it by their code at bits
 * 0-1 (of the code bytes, or of them shifted by 2) or'ed with 4 × the sub-block; registers 2 and 3
 * leave their code at bits 4-5 (of the same two) and take the sub-block in bits 0-3, through the
 * table permuted once (byte 16 t + s): one shift and one masked or (`vpternlogd`) per index for
 * all four. The same dwords shifted by 4 are the minimums. */
/* Stored bytes prefetched ahead of the Q2_K block in hand (about 49 blocks): the best calls are
 * the same with or without it (two threads, one row of 2048x4096 cycling copies that overflow
 * the caches: 62.7 against 64-66 µs), but the typical ones are not: the median went 83.5-88.2 ->
 * 67.6-76.9 µs and the 90th percentile 117-129 -> 87-120 in three rounds alternating with the
 * kernel without it (1024 bytes ahead: worse, 2048: between). In cache it costs 2.5-4% (57.1-59.2
 * -> 58.5-61.6 µs). */
#define Q2_K_AHEAD 4096

VNNI static INLINE void int_q2_k_rows(const uint8_t *w, const Activations *a, const int64_t *rows, const int count,
                                      float *out) {
    const __m512i multiples = _mm512_loadu_si512(q2_k_multiples), spread = _mm512_loadu_si512(q2_k_spread);
    const __m512i low_code = _mm512_set1_epi8(0x03), high_code = _mm512_set1_epi8(0x30);
    __m512i offsets[4];
    for (int j = 0; j < 4; j++) offsets[j] = _mm512_loadu_si512(q2_k_offsets[j]);
    __m512 acc[MAX_ROWS], min_acc[MAX_ROWS]; /* two sums: one dependent chain of two FMAs a block was its bound */
    const int64_t stride = a->stride;
    const InputRows in = input_rows(a, rows, count, 0);
    for (int r = 0; r < count; r++) acc[r] = min_acc[r] = _mm512_setzero_ps();
#pragma GCC unroll 2 /* two blocks an iteration: 4% faster for one row, the same for two */
    for (int64_t b = 0; b < a->cols / 256; b++, w += 84) {
        _mm_prefetch((const char *)w + Q2_K_AHEAD, _MM_HINT_T0); /* two lines a block: the next one's first takes any third */
        _mm_prefetch((const char *)w + Q2_K_AHEAD + 64, _MM_HINT_T0);
        __m512i scales = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)w));
        __m512i table = _mm512_permutexvar_epi32(scales, multiples);
        __m512i high_table = _mm512_permutexvar_epi8(spread, table);
        int32_t d_dmin;
        memcpy(&d_dmin, w + 80, 4);
        __m512 halves = _mm512_cvtph_ps(_mm256_set1_epi32(d_dmin)); /* d, dmin, d, dmin, ... */
        __m512 mins = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(scales, 4)), _mm512_movehdup_ps(halves));
        __m512 d = _mm512_moveldup_ps(halves);
        __m512i bytes = _mm512_loadu_si512(w + 16), shifted = _mm512_srli_epi16(bytes, 2), weights[4];
        weights[0] = _mm512_permutexvar_epi8(_mm512_ternarylogic_epi32(bytes, low_code, offsets[0], 0xEA), table);
        weights[1] = _mm512_permutexvar_epi8(_mm512_ternarylogic_epi32(shifted, low_code, offsets[1], 0xEA), table);
        weights[2] = _mm512_permutexvar_epi8(_mm512_ternarylogic_epi32(bytes, high_code, offsets[2], 0xEA), high_table);
        weights[3] =
            _mm512_permutexvar_epi8(_mm512_ternarylogic_epi32(shifted, high_code, offsets[3], 0xEA), high_table);
        for (int r = 0; r < count; r++) {
            const int8_t *part = in.parts[r] + 256 * b;
            __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0;
            for (int j = 0; j < 4; j++) {
                s0 = _mm512_dpbusd_epi32(s0, weights[j], _mm512_loadu_si512(part + 64 * j));
                s1 = _mm512_dpbusd_epi32(s1, weights[j], _mm512_loadu_si512(part + stride + 64 * j));
                s2 = _mm512_dpbusd_epi32(s2, weights[j], _mm512_loadu_si512(part + 2 * stride + 64 * j));
            }
            acc[r] = _mm512_fmadd_ps(parts_to_float(s0, s1, s2), _mm512_mul_ps(d, _mm512_set1_ps(in.scales[r][b])), acc[r]);
            min_acc[r] = _mm512_fmadd_ps(mins, _mm512_loadu_ps(in.sum16[r] + 16 * b), min_acc[r]);
        }
    }
    for (int r = 0; r < count; r++) out[r] = _mm512_reduce_add_ps(_mm512_sub_ps(acc[r], min_acc[r]));
}

/* Q4_K: the four registers of a block share one group per 4-byte lane (natural_position: lane L
 * holds group 2 (L / 4) + L % 2), so, as for IQ2_XXS, the three integer sums run over the whole
 * block and the group scales and minimums apply once per block in float. The 128 code bytes are
 * 4 chunks of 32 (chunk c: group 2 c in the low nibbles, 2 c + 1 in the high ones); two 128-bit
 * shuffles give each 128-bit lane 16 bytes of one chunk (registers 0, 1: bytes 0-15, 16-31), and
 * registers 2, 3 are the same with each pair of dwords swapped; one AND keeps the low nibbles of
 * even dwords and the high nibbles of odd ones in place (16 times the code, ≤ 240: those lanes'
 * scales are divided by 16). A lane sums 16 products of at most 240 · 127 per part, < 2^19:
 * exact in float. The 6-bit scales and minimums are unpacked in one 16-byte register (`vpmultishiftqb`)
 * and spread to the lanes by a byte permute each. */
VNNI static INLINE void int_q4_k_rows(const uint8_t *w, const Activations *a, const int64_t *rows, const int count,
                                      float *out) {
    const __m512i nibbles = _mm512_set1_epi64(0xF0F0F0F00F0F0F0Fll);
    const __m512 sixteenths = _mm512_castsi512_ps(_mm512_set1_epi64(0x3D8000003F800000ll)); /* 1, 1/16 per lane */
    const __m512i scale_spread = _mm512_loadu_si512(q4_k_spread[0]), min_spread = _mm512_loadu_si512(q4_k_spread[1]);
    const __m128i nibble_windows = _mm_set_epi64x(0x1C140C0418100800ll, 0x3830282018100800ll);
    const __m128i scale_windows = _mm_set_epi64x(0x3A322A221A120A02ll, 0);
    const __m128i top_bits = _mm_set1_epi8((char)0xC0);
    const __m128i low_bits = _mm_set_epi64x(0x0F0F0F0F0F0F0F0Fll, 0x3F3F3F3F3F3F3F3Fll);
    const int64_t stride = a->stride;
    const InputRows in = input_rows(a, rows, count, 0);
    __m512 acc[MAX_ROWS];
    for (int r = 0; r < count; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < a->cols / 256; b++, w += 144) {
        /* the 6-bit scales and minimums (stored bytes p0-p11, see q4_k_scales_mins) to bytes 0-3
         * scales 0-3, 4-7 minimums 0-3, 8-11 scales 4-7, 12-15 minimums 4-7: p & 63 for the first
         * eight; for the others the low and high nibbles of p8-p11 (the windows of nibble_windows),
         * their bits 4-5 bits 6-7 of p0-p7, masked in the upper qword (windows 2 bits on) */
        __m128i stored = _mm_loadu_si128((const __m128i *)(w + 4));
        __m128i tops = _mm_multishift_epi64_epi8(scale_windows, _mm_and_si128(_mm_bslli_si128(stored, 8), top_bits));
        __m512i packed = _mm512_castsi128_si512(
            _mm_ternarylogic_epi64(_mm_multishift_epi64_epi8(nibble_windows, stored), tops, low_bits, 0xEC));
        __m512 both = _mm512_castps128_ps512(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)w))); /* d, dmin */
        __m512 lane_scales = _mm512_mul_ps(
            _mm512_cvtepi32_ps(_mm512_maskz_permutexvar_epi8(0x1111111111111111ull, scale_spread, packed)),
            _mm512_mul_ps(_mm512_broadcastss_ps(_mm512_castps512_ps128(both)), sixteenths));
        __m512 min16 = _mm512_mul_ps(
            _mm512_cvtepi32_ps(_mm512_maskz_permutexvar_epi8(0x1111111111111111ull, min_spread, packed)),
            _mm512_permutexvar_ps(_mm512_set1_epi32(1), both));
        __m512i codes_low = _mm512_loadu_si512(w + 16), codes_high = _mm512_loadu_si512(w + 80), weights[4];
        weights[0] = _mm512_shuffle_i64x2(codes_low, codes_high, _MM_SHUFFLE(2, 0, 2, 0));
        weights[1] = _mm512_shuffle_i64x2(codes_low, codes_high, _MM_SHUFFLE(3, 1, 3, 1));
        weights[2] = _mm512_and_si512(_mm512_shuffle_epi32(weights[0], _MM_PERM_CDAB), nibbles);
        weights[3] = _mm512_and_si512(_mm512_shuffle_epi32(weights[1], _MM_PERM_CDAB), nibbles);
        weights[0] = _mm512_and_si512(weights[0], nibbles);
        weights[1] = _mm512_and_si512(weights[1], nibbles);
        for (int r = 0; r < count; r++) {
            const int8_t *part = in.parts[r] + 256 * b;
            __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0;
            for (int j = 0; j < 4; j++) {
                s0 = _mm512_dpbusd_epi32(s0, weights[j], _mm512_loadu_si512(part + 64 * j));
                s1 = _mm512_dpbusd_epi32(s1, weights[j], _mm512_loadu_si512(part + stride + 64 * j));
                s2 = _mm512_dpbusd_epi32(s2, weights[j], _mm512_loadu_si512(part + 2 * stride + 64 * j));
            }
            __m512 scale = _mm512_mul_ps(lane_scales, _mm512_set1_ps(in.scales[r][b]));
            acc[r] = _mm512_fmadd_ps(parts_to_float(s0, s1, s2), scale, acc[r]);
            acc[r] = _mm512_fnmadd_ps(min16, _mm512_loadu_ps(in.sum16[r] + 16 * b), acc[r]);
        }
    }
    for (int r = 0; r < count; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}

/* IQ2_XXS, two parts (docs/model.md: decode-bound, it drops the third; the input rounded to
 * within s / 508 per value), two blocks at a time: byte p of each register stands for run of 8
 * (grid point) p % 4 of group p / 8 of the first block (p % 8 < 4) or the second, so that each
 * dword holds four runs of one group of one block, the first block's in the even dwords. The
 * points' 16-bit codes (2 bits per value) are looked up in a low and a high byte table; register m
 * takes value m of each point, whose code is at bits 2 (m % 4) of the low (m < 4) or high byte
 * and its sign at bit 4 + m % 4 of a byte of signs (values 0-3's straight from the stored 7-bit
 * sign index, one `vpmultishiftqb` window; values 4-7's, the last one the parity of the seven,
 * through a 128-entry table). One byte of bits 0-3 of the codes and 4-7 of the signs indexes
 * registers 0 and 1's tables of 43 + the signed weight (unsigned, 0 to 86; table k reads bits 2 k
 * and 4 + k, `vpermb`), the same with codes and signs shifted down by 4 and 2 registers 2 and
 * 3's, likewise 4-7 from the high bytes. The inputs' parts are laid out to match
 * (natural_position, pairs interleaved by quantize_row_avx512), so the two integer sums of each dword run over one whole
 * group of 32 (lane 2 g + block: group g), starting from -43 times the lane's sum of the part,
 * and the group scales, d and the input's scale of either block apply to the lanes once per pair. */
typedef struct {
    __m512i code_bytes[2][4]; /* low, high byte of the 256 points' codes */
    __m512i pair_index, sign_windows[2], signs_low, signs_high, weights[2];
    __m512 group_scales; /* iq2_group_scales */
} Iq2Tables;

/* `first`, `second`: the two blocks' 64 bytes after d; lone: there is no second (zeros), the parts
 * hold one block (iq2_parts). */
VNNI static INLINE void iq2_xxs_pair(const Iq2Tables *t, const uint8_t *w, __m512i first, __m512i second, int lone,
                                     const InputRows *in, const int count, int64_t b, __m512 *acc) {
    const __mmask64 of_second = 0xF0F0F0F0F0F0F0F0ull; /* bytes standing for the second block */
    __m512i index = _mm512_permutex2var_epi8(first, t->pair_index, second);
    __mmask64 upper = _mm512_movepi8_mask(index);
    __m512i codes[2], signs[2];
    for (int h = 0; h < 2; h++)
        codes[h] = _mm512_mask_blend_epi8(upper,
                                          _mm512_permutex2var_epi8(t->code_bytes[h][0], index, t->code_bytes[h][1]),
                                          _mm512_permutex2var_epi8(t->code_bytes[h][2], index, t->code_bytes[h][3]));
    /* each byte's window of its point's sign index: bits 4-7 values 0-3's signs; the whole index */
    for (int h = 0; h < 2; h++)
        signs[h] = _mm512_mask_multishift_epi64_epi8(_mm512_multishift_epi64_epi8(t->sign_windows[h], first), of_second,
                                                     t->sign_windows[h], second);
    signs[1] = _mm512_permutex2var_epi8(t->signs_low, signs[1], t->signs_high);
    /* lane 2 g + block: group g's scale (0.5 + s) / 4 = (2 s + 1) / 8, exact in float, from a table:
     * s is at bits 60-63 of the group's qword, `vpmultishiftqb` brings it to the low bits of each
     * dword and the lookup ignores the rest; d: the first block's in the even lanes */
    const __m512i scale_bits = _mm512_set1_epi8(60);
    __m512i scale_windows = _mm512_mask_multishift_epi64_epi8(_mm512_multishift_epi64_epi8(scale_bits, first),
                                                              of_second, scale_bits, second);
    __m512 lane_scales = _mm512_permutexvar_ps(scale_windows, t->group_scales);
    uint32_t halves = (uint32_t)(w[0] | w[1] << 8) | (lone ? 0u : (uint32_t)(w[66] | w[67] << 8) << 16);
    __m512 d = _mm512_cvtph_ps(_mm256_set1_epi32((int)halves));
    /* registers 4 h + 0 and + 1's index: bits 0-3 of the codes, 4-7 of the signs (select = 0xE4);
     * + 2 and + 3's: the codes' bits 4-7 and the signs' 6-7 moved there (`vpermb` reads bits 0-5) */
    const __m512i high_nibbles = _mm512_set1_epi8((char)0xF0);
    __m512i weights[8];
    for (int h = 0; h < 2; h++) {
        __m512i low = _mm512_ternarylogic_epi32(signs[h], codes[h], high_nibbles, 0xE4);
        __m512i high = _mm512_ternarylogic_epi32(_mm512_srli_epi16(signs[h], 2), _mm512_srli_epi16(codes[h], 4),
                                                 high_nibbles, 0xE4);
        weights[4 * h] = _mm512_permutexvar_epi8(low, t->weights[0]);
        weights[4 * h + 1] = _mm512_permutexvar_epi8(low, t->weights[1]);
        weights[4 * h + 2] = _mm512_permutexvar_epi8(high, t->weights[0]);
        weights[4 * h + 3] = _mm512_permutexvar_epi8(high, t->weights[1]);
    }
    for (int r = 0; r < count; r++) {
        const int8_t *part = in->parts[r] + 256 * b;
        const int32_t *offsets = in->offsets[r] + 32 * b;
        const int64_t stride = in->stride;
        /* one row: two chains of four per part (eight dependent `vpdpbusd` would be twice one
         * block's latency); two rows have four chains already, and the extra sums cost them */
        __m512i s0 = _mm512_loadu_si512(offsets), s1 = _mm512_loadu_si512(offsets + 16);
        __m512i t0 = _mm512_setzero_si512(), t1 = t0;
        for (int m = 0; m < 8; m += 2) {
            s0 = _mm512_dpbusd_epi32(s0, weights[m], iq2_parts(part, m, lone));
            s1 = _mm512_dpbusd_epi32(s1, weights[m], iq2_parts(part + stride, m, lone));
            __m512i p0 = iq2_parts(part, m + 1, lone), p1 = iq2_parts(part + stride, m + 1, lone);
            if (count == 1) {
                t0 = _mm512_dpbusd_epi32(t0, weights[m + 1], p0);
                t1 = _mm512_dpbusd_epi32(t1, weights[m + 1], p1);
            } else {
                s0 = _mm512_dpbusd_epi32(s0, weights[m + 1], p0);
                s1 = _mm512_dpbusd_epi32(s1, weights[m + 1], p1);
            }
        }
        if (count == 1) {
            s0 = _mm512_add_epi32(s0, t0);
            s1 = _mm512_add_epi32(s1, t1);
        }
        __m512 input_scales; /* the first block's in the even lanes */
        if (lone)
            input_scales = _mm512_set1_ps(in->scales[r][b]);
        else {
            double pair;
            memcpy(&pair, in->scales[r] + b, sizeof pair);
            input_scales = _mm512_castpd_ps(_mm512_set1_pd(pair));
        }
        __m512 sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1), _mm512_set1_ps(1.0f / 254.0f), _mm512_cvtepi32_ps(s0));
        __m512 scale = _mm512_mul_ps(lane_scales, _mm512_mul_ps(d, input_scales));
        acc[r] = _mm512_fmadd_ps(sum, scale, acc[r]);
    }
}

/* Stored rows i < stored at w + i row_stride, as int_q2_k_rows and the others but in one loop over
 * all their pairs of blocks, each row's sums taken at its end: with a loop over the pairs inside
 * one over the rows (INT_DOT), gcc saved sixteen of the ~20 constant registers to the stack and
 * restored them around each row's loop, ~33 cycles a row (4096x2048, one input row, one thread:
 * 129 us against 107 us for the same bytes as 2048x4096). */
/* Stored bytes prefetched ahead of the pair of IQ2_XXS blocks in hand (about 31 pairs). Two threads,
 * one row of 2048x4096 cycling copies that overflow the caches: the median call 59.2-60.7 ->
 * 55.8-57.3 µs and the best 53.4-57.0 -> 51.9-54.9 in five rounds alternating with the kernel
 * without it (2048 or 8192 bytes ahead: less clear); in cache the same (53.6-54.0 against 53.0-53.3
 * µs, one thread 98.6-100.5 against 98.4-99.7). */
#define IQ2_XXS_AHEAD 4096

VNNI static INLINE void int_iq2_xxs_tile(const uint8_t *w, int64_t row_stride, int stored, const Activations *a,
                                         const int64_t *rows, const int count, float *out) {
    Iq2Tables t;
    for (int h = 0; h < 2; h++)
        for (int i = 0; i < 4; i++) t.code_bytes[h][i] = _mm512_loadu_si512(iq2_code_bytes[h] + 64 * i);
    t.pair_index = _mm512_loadu_si512(iq2_pair_index);
    for (int h = 0; h < 2; h++) t.sign_windows[h] = _mm512_loadu_si512(iq2_sign_windows[h]);
    t.signs_low = _mm512_loadu_si512(iq2_signs);
    t.signs_high = _mm512_loadu_si512(iq2_signs + 64);
    t.group_scales = _mm512_loadu_ps(iq2_group_scales);
    for (int j = 0; j < 2; j++) t.weights[j] = _mm512_loadu_si512(iq2_offset_weights[j]);
    const InputRows in = input_rows(a, rows, count, 32);
    __m512 acc[MAX_ROWS];
    for (int r = 0; r < count; r++) acc[r] = _mm512_setzero_ps();
    int64_t blocks = a->cols / 256, b = 0;
    for (int i = 0; i < stored;) {
        const uint8_t *pair = w + i * row_stride + 66 * b;
        if (b + 1 < blocks) {
            for (int at = 0; at < 192; at += 64) /* a pair spans three lines (a fourth: the next pair's first) */
                _mm_prefetch((const char *)pair + IQ2_XXS_AHEAD + at, _MM_HINT_T0);
            iq2_xxs_pair(&t, pair, _mm512_loadu_si512(pair + 2), _mm512_loadu_si512(pair + 68), 0, &in, count, b, acc);
            b += 2, pair += 132;
        }
        if (b + 1 >= blocks) { /* the row's end */
            if (b < blocks)
                iq2_xxs_pair(&t, pair, _mm512_loadu_si512(pair + 2), _mm512_setzero_si512(), 1, &in, count, b, acc);
            for (int r = 0; r < count; r++) {
                out[MAX_ROWS * i + r] = _mm512_reduce_add_ps(acc[r]);
                acc[r] = _mm512_setzero_ps();
            }
            b = 0, i++;
        }
    }
}

VNNI static void int_iq2_xxs(const uint8_t *w, int64_t row_stride, int stored, const Activations *a,
                             const int64_t *rows, int count, float *out) {
    if (count == 1)
        int_iq2_xxs_tile(w, row_stride, stored, a, rows, 1, out);
    else
        int_iq2_xxs_tile(w, row_stride, stored, a, rows, 2, out);
}

/* One function per format taking 1 or MAX_ROWS = 2 rows, a copy specialised for each count
 * (IQ2_XXS: int_iq2_xxs above, one loop over the tile). */
#define INT_DOT(target, name)                                                                                \
    target static void name(const uint8_t *w, int64_t row_stride, int stored, const Activations *a,               \
                            const int64_t *rows, int count, float *out) {                                         \
        for (int i = 0; i < stored; i++) { /* in one function: the constants stay in registers */                 \
            if (count == 1)                                                                                       \
                name##_rows(w + i * row_stride, a, rows, 1, out + MAX_ROWS * i);                                  \
            else                                                                                                  \
                name##_rows(w + i * row_stride, a, rows, 2, out + MAX_ROWS * i);                                  \
        }                                                                                                         \
    }
INT_DOT(VNNI, int_q8_0)
INT_DOT(VNNI, int_q2_k)
INT_DOT(VNNI, int_q4_k)
INT_DOT(VNNI, int_mxfp4)
#endif

/* ---------------------------------------------------------------- integer products (AVX2) */

/* The integer products for CPUs with AVX2 but not AVX-512 VNNI, 32 values per register: the
 * inputs are rounded exactly as above (quantize_row_avx2), but kept in their natural order, since
 * one register of 32 values is one scale group (IQ2_XXS, Q4_K; Q2_K: one per 128-bit half)
 * and each stored row's bytes go into registers in that order as they are. `vpmaddubsw`
 * multiplies unsigned 8-bit weights with the signed parts and adds neighbours to int16, then
 * `vpmaddwd` multiplies those with the group's integer scale and adds neighbours to int32. An
 * int16 sum of two products cannot saturate: the weights are at most 43 (IQ2_XXS's magnitudes,
 * their signs moved onto the parts, which leaves no offset to take off), 3 (Q2_K's codes) and
 * 15 (Q4_K's), so 2·43·127 = 10922 at most; and the int32 sums of a block stay below 2^24
 * (IQ2_XXS: 8 groups · 2 · 10922 · 31 ≈ 5.4e6), so they go to float exactly, once per block. */

/* Constant vectors, filled by build_avx2_int_tables. */
static uint8_t q2_k_first_scales[32]; /* low 128 bits: bytes 0, 0x80 (byte 0 as int16); high: 1, 0x80 */
static uint8_t q4_k_first_scale[32];  /* bytes 0, 0x80 (byte 0 as int16) */
static uint64_t iq2_sign_masks[128];  /* byte t: -1 where value t is negative (iq2_signs), else 1 */

static void build_avx2_int_tables(void) {
    for (int p = 0; p < 32; p++) {
        q2_k_first_scales[p] = p % 2 ? 0x80 : (uint8_t)(p / 16);
        q4_k_first_scale[p] = p % 2 ? 0x80 : 0;
    }
    for (int i = 0; i < 128; i++) {
        uint8_t bytes[8];
        for (int t = 0; t < 8; t++) bytes[t] = (iq2_signs[i] >> t) & 1 ? 0xFF : 0x01;
        memcpy(&iq2_sign_masks[i], bytes, 8);
    }
}

#ifdef HAVE_X86
/* The sums of x per 16 values (Q2_K's and Q4_K's minimum terms). */
AVX2 void sums_of_16(const float *x, int64_t cols, float *sum16) {
    for (int64_t j = 0; j < cols / 16; j++)
        sum16[j] = hsum(_mm256_add_ps(_mm256_loadu_ps(x + 16 * j), _mm256_loadu_ps(x + 16 * j + 8)));
}

/* Round input row x to its three parts in the natural order, its scales per ACT_BLOCK values,
 * and its sums per 16 values when sum16 is given (the rounding of "integer products"). */
AVX2 void quantize_row_avx2(const float *x, int64_t cols, int64_t stride, int8_t *parts, float *scales,
                            float *sum16) {
    const __m256 radix = _mm256_set1_ps(254.0f), magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256i in_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7); /* undoes the packs' interleaving */
    for (int64_t b = 0, start = 0; start < cols; b++, start += ACT_BLOCK) {
        int64_t length = cols - start < ACT_BLOCK ? cols - start : ACT_BLOCK; /* a multiple of 32 */
        const float *xb = x + start;
        __m256 most[4], unordered = _mm256_setzero_ps(); /* four maxima: one would wait on each max */
        for (int i = 0; i < 4; i++) most[i] = _mm256_setzero_ps();
        for (int64_t j = 0; j < length; j += 32)
            for (int i = 0; i < 4; i++) {
                __m256 v = _mm256_loadu_ps(xb + j + 8 * i);
                most[i] = _mm256_max_ps(most[i], _mm256_and_ps(v, magnitude));
                unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q)); /* max drops nan */
            }
        __m256 largest = _mm256_max_ps(_mm256_max_ps(most[0], most[1]), _mm256_max_ps(most[2], most[3]));
        __m128 top4 = _mm_max_ps(_mm256_castps256_ps128(largest), _mm256_extractf128_ps(largest, 1));
        top4 = _mm_max_ps(top4, _mm_movehl_ps(top4, top4));
        float top = _mm_cvtss_f32(_mm_max_ss(top4, _mm_movehdup_ps(top4)));
        if (_mm256_movemask_ps(unordered) || !(top < INFINITY)) top = NAN;
        float s = top / 127.0f;
        scales[b] = s;
        __m256 divisor = _mm256_set1_ps(s > 0.0f ? s : 1.0f);
        for (int64_t p = 0; p < length; p += 32) {
            __m256i part[3][4];
            for (int i = 0; i < 4; i++) {
                __m256 r = _mm256_div_ps(_mm256_loadu_ps(xb + p + 8 * i), divisor);
                for (int k = 0; k < 3; k++) {
                    __m256 rounded = _mm256_round_ps(r, ROUND_NEAREST);
                    part[k][i] = _mm256_cvtps_epi32(rounded);
                    r = _mm256_mul_ps(_mm256_sub_ps(r, rounded), radix);
                }
            }
            for (int k = 0; k < 3; k++) {
                __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(part[k][0], part[k][1]),
                                                   _mm256_packs_epi32(part[k][2], part[k][3]));
                _mm256_storeu_si256((__m256i *)(parts + k * stride + start + p),
                                    _mm256_permutevar8x32_epi32(bytes, in_order));
            }
        }
    }
    if (sum16) sums_of_16(x, cols, sum16);
}

/* The float value of three parts' integer sums s0 + s1 / 254 + s2 / 254². */
AVX2 static INLINE_AVX __m256 parts_to_float_avx2(const __m256i *s) {
    __m256 value = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[1]), _mm256_set1_ps(1.0f / 254.0f), _mm256_cvtepi32_ps(s[0]));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[2]), _mm256_set1_ps(1.0f / (254.0f * 254.0f)), value);
}

/* Adds to s[0..parts) the products of 32 unsigned weights with the parts of row `row` at value
 * `at`, their pairs times `scale` (int16). */
AVX2 static INLINE_AVX void add_products(__m256i *s, int parts, __m256i weights, __m256i scale, const Activations *a,
                                         int64_t row, int64_t at) {
    const int8_t *part = a->parts + 3 * row * a->stride + at;
    for (int k = 0; k < parts; k++) {
        __m256i pairs = _mm256_maddubs_epi16(weights, _mm256_loadu_si256((const __m256i *)(part + k * a->stride)));
        s[k] = _mm256_add_epi32(s[k], _mm256_madd_epi16(pairs, scale));
    }
}

/* Q2_K and Q4_K's minimums, one byte per 16 values of a block, times dmin: floats 0-7, 8-15. */
AVX2 static INLINE_AVX void minimums16(__m128i bytes, float dmin, __m256 *mins) {
    mins[0] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)), _mm256_set1_ps(dmin));
    mins[1] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8))), _mm256_set1_ps(dmin));
}

/* One block of 256 values into acc: its three integer sums times `scale` (d times the input's
 * scale), less each 16 values' minimum times the input's sum over them (`sums`). */
AVX2 static INLINE_AVX __m256 k_quant_block(__m256 acc, const __m256i *s, float scale, const __m256 *mins,
                                            const float *sums) {
    acc = _mm256_fmadd_ps(parts_to_float_avx2(s), _mm256_set1_ps(scale), acc);
    acc = _mm256_fnmadd_ps(mins[0], _mm256_loadu_ps(sums), acc);
    return _mm256_fnmadd_ps(mins[1], _mm256_loadu_ps(sums + 8), acc);
}

/* Q2_K: register (h, c) holds code c of each of the 32 bytes of half h, values 128 h + 32 c..,
 * sub-blocks 8 h + 2 c (low 128 bits) and 8 h + 2 c + 1 (high 128 bits); `pick` takes their
 * 4-bit scales out of the 16 as int16, and moves on by two sub-blocks per register. The
 * minimums are applied in float to the input's sums per 16 values. */
AVX2 static INLINE_AVX void int_q2_k_avx2_rows(const uint8_t *w, const Activations *a, const int64_t *rows,
                                              const int count, float *out) {
    const __m256i codes_mask = _mm256_set1_epi8(3), two = _mm256_set1_epi8(2);
    const __m128i nibble = _mm_set1_epi8(0xF);
    __m256 acc[MAX_ROWS];
    for (int r = 0; r < count; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < a->cols / 256; b++, w += 84) {
        __m128i packed = _mm_loadu_si128((const __m128i *)w);
        __m256i scales = _mm256_broadcastsi128_si256(_mm_and_si128(packed, nibble));
        __m256 mins[2];
        minimums16(_mm_and_si128(_mm_srli_epi16(packed, 4), nibble), half(w + 82), mins);
        __m256i s[MAX_ROWS][3], pick = _mm256_loadu_si256((const __m256i *)q2_k_first_scales);
        for (int r = 0; r < count; r++) s[r][0] = s[r][1] = s[r][2] = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            __m256i bytes = _mm256_loadu_si256((const __m256i *)(w + 16 + 32 * h));
            for (int c = 0; c < 4; c++, pick = _mm256_add_epi8(pick, two)) {
                __m256i codes = _mm256_and_si256(_mm256_srli_epi16(bytes, 2 * c), codes_mask);
                __m256i scale = _mm256_shuffle_epi8(scales, pick);
                for (int r = 0; r < count; r++) add_products(s[r], 3, codes, scale, a, rows[r], 256 * b + 128 * h + 32 * c);
            }
        }
        float d = half(w + 80);
        for (int r = 0; r < count; r++)
            acc[r] = k_quant_block(acc[r], s[r], d * SCALE(r, b), mins, a->sum16 + rows[r] * (a->cols / 16) + 16 * b);
    }
    for (int r = 0; r < count; r++) out[r] = hsum(acc[r]);
}

/* Q4_K: register g holds group g (the low nibbles of bytes 32 (g / 2).. for even g, the high
 * ones for odd g); `pick` takes its 6-bit scale out of the eight as int16. */
AVX2 static INLINE_AVX void int_q4_k_avx2_rows(const uint8_t *w, const Activations *a, const int64_t *rows,
                                              const int count, float *out) {
    const __m256i nibbles = _mm256_set1_epi8(0xF), one = _mm256_set1_epi8(1);
    __m256 acc[MAX_ROWS];
    for (int r = 0; r < count; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < a->cols / 256; b++, w += 144) {
        uint64_t scale_bits, minimums;
        q4_k_scales_mins(w + 4, &scale_bits, &minimums);
        __m256i scales = _mm256_broadcastsi128_si256(_mm_cvtsi64_si128((long long)scale_bits));
        __m128i min_bytes = _mm_cvtsi64_si128((long long)minimums);
        __m256 mins[2];
        minimums16(_mm_unpacklo_epi8(min_bytes, min_bytes), half(w + 2), mins); /* one per 16 values */
        __m256i s[MAX_ROWS][3], pick = _mm256_loadu_si256((const __m256i *)q4_k_first_scale);
        for (int r = 0; r < count; r++) s[r][0] = s[r][1] = s[r][2] = _mm256_setzero_si256();
        for (int g = 0; g < 8; g++, pick = _mm256_add_epi8(pick, one)) {
            __m256i bytes = _mm256_loadu_si256((const __m256i *)(w + 16 + 32 * (g / 2)));
            __m256i codes = _mm256_and_si256(g % 2 ? _mm256_srli_epi16(bytes, 4) : bytes, nibbles);
            __m256i scale = _mm256_shuffle_epi8(scales, pick);
            for (int r = 0; r < count; r++) add_products(s[r], 3, codes, scale, a, rows[r], 256 * b + 32 * g);
        }
        float d = half(w);
        for (int r = 0; r < count; r++)
            acc[r] = k_quant_block(acc[r], s[r], d * SCALE(r, b), mins, a->sum16 + rows[r] * (a->cols / 16) + 16 * b);
    }
    for (int r = 0; r < count; r++) out[r] = hsum(acc[r]);
}

/* IQ2_XXS, two parts as its VNNI kernel: per group, the four grid points' magnitudes (8, 25 or
 * 43) are looked up as 8 bytes each, and their sign patterns as 8 bytes of -1 or 1 each, which
 * `vpsignb` puts onto the parts; `vpmaddwd` applies the group's 2 s + 1 (its scale is
 * d (0.5 + s) / 4 = d (2 s + 1) / 8, exact in float). The eight lookups per group bound it (as
 * they bound the float kernel): one 256 KiB table of signed weights for every grid point and
 * sign pattern (one lookup per point) was slower here, its lookups missing L1, and so was
 * spreading the sign bits to bytes in registers (more shuffles than the loads it saved). */
AVX2 static INLINE_AVX __m256i four_table_rows(uint64_t first, uint64_t second, uint64_t third, uint64_t fourth) {
    return _mm256_set_epi64x((long long)fourth, (long long)third, (long long)second, (long long)first);
}

AVX2 static INLINE_AVX void int_iq2_xxs_avx2_rows(const uint8_t *w, const Activations *a, const int64_t *rows,
                                                 const int count, float *out) {
    __m256 acc[MAX_ROWS];
    for (int r = 0; r < count; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < a->cols / 256; b++, w += 66) {
        __m256i s[MAX_ROWS][2];
        for (int r = 0; r < count; r++) s[r][0] = s[r][1] = _mm256_setzero_si256();
        for (int g = 0; g < 8; g++) {
            const uint8_t *index = w + 2 + 8 * g;
            uint32_t aux;
            memcpy(&aux, index + 4, 4);
            __m256i magnitudes = four_table_rows(iq2_xxs_grid[index[0]], iq2_xxs_grid[index[1]],
                                                 iq2_xxs_grid[index[2]], iq2_xxs_grid[index[3]]);
            __m256i signs = four_table_rows(iq2_sign_masks[aux & 127], iq2_sign_masks[(aux >> 7) & 127],
                                            iq2_sign_masks[(aux >> 14) & 127], iq2_sign_masks[(aux >> 21) & 127]);
            __m256i scale = _mm256_set1_epi16((short)(2 * (aux >> 28) + 1));
            for (int r = 0; r < count; r++) {
                const int8_t *part = a->parts + 3 * rows[r] * a->stride + 256 * b + 32 * g;
                for (int k = 0; k < 2; k++) {
                    __m256i signed_part =
                        _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(part + k * a->stride)), signs);
                    __m256i pairs = _mm256_maddubs_epi16(magnitudes, signed_part);
                    s[r][k] = _mm256_add_epi32(s[r][k], _mm256_madd_epi16(pairs, scale));
                }
            }
        }
        float d = half(w) * 0.125f;
        for (int r = 0; r < count; r++) {
            __m256 sum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[r][1]), _mm256_set1_ps(1.0f / 254.0f),
                                         _mm256_cvtepi32_ps(s[r][0]));
            acc[r] = _mm256_fmadd_ps(sum, _mm256_set1_ps(d * SCALE(r, b)), acc[r]);
        }
    }
    for (int r = 0; r < count; r++) out[r] = hsum(acc[r]);
}

INT_DOT(AVX2, int_q2_k_avx2)
INT_DOT(AVX2, int_q4_k_avx2)
INT_DOT(AVX2, int_iq2_xxs_avx2)
#endif

/* ---------------------------------------------------------------- dispatch */

typedef float (*DotFn)(const float *a, const float *b, int64_t n);

typedef struct {
    int kind;
    int64_t block;   /* values per block: rows are whole blocks */
    int needs_sum16; /* the fused product reads the input's sums per 16 values */
    DecodeFn portable, avx2;
    FusedFn fused_avx2, fused_avx512;
    IntDotFn integer; /* AVX-512 VNNI, on the inputs' integer parts */
    IntDotFn integer_avx2; /* the same with AVX2 alone (and AVX-512 without VNNI); NULL: the float ones */
} Format;

#ifdef HAVE_X86
#define X86(f) f
#else
#define X86(f) NULL
#endif

static const Format formats[] = {
    {Q8_0, 32, 0, decode_q8_0, X86(decode_q8_0_avx2), X86(fused_q8_0_avx2), X86(fused_q8_0_avx512), X86(int_q8_0)},
    {Q2_K, 256, 1, decode_q2_k, X86(decode_q2_k_avx2), X86(fused_q2_k_avx2), X86(fused_q2_k_avx512), X86(int_q2_k),
     X86(int_q2_k_avx2)},
    {Q4_K, 256, 1, decode_q4_k, X86(decode_q4_k_avx2), X86(fused_q4_k_avx2), X86(fused_q4_k_avx512), X86(int_q4_k),
     X86(int_q4_k_avx2)},
    {IQ2_XXS, 256, 0, decode_iq2_xxs, X86(decode_iq2_xxs_avx2), X86(fused_iq2_xxs_avx2), X86(fused_iq2_xxs_avx512), X86(int_iq2_xxs),
     X86(int_iq2_xxs_avx2)},
    {MXFP4, 32, 0, decode_mxfp4, X86(decode_mxfp4_avx2), X86(fused_mxfp4_avx2), X86(fused_mxfp4_avx512),
     X86(int_mxfp4)},
    {F16, 1, 0, decode_f16, X86(decode_f16_avx2), X86(fused_f16_avx2), X86(fused_f16_avx512), NULL},
    {BF16, 1, 0, decode_bf16, X86(decode_bf16_avx2), X86(fused_bf16_avx2), X86(fused_bf16_avx512), NULL},
};

/* Groups with at least this many input rows decode each weight row once into a buffer and
 * multiply it with all of them; smaller groups use the fused products. */
#define BUFFERED_ROWS 4

enum { PORTABLE, USE_AVX2, USE_AVX512, USE_VNNI };
static int isa = PORTABLE;

int integer_products_in_use(void) { return isa == USE_VNNI; }

static const Format *find_format(int kind) {
    for (size_t i = 0; i < sizeof(formats) / sizeof(formats[0]); i++)
        if (formats[i].kind == kind) return &formats[i];
    return NULL;
}

/* ---------------------------------------------------------------- thread pool */

/* parallel_for hands out items through one word, the ticket: the call's generation (high 32 bits)
 * and the next item to claim (low 32), claimed by compare-and-swap, so that a claim can only
 * succeed in the call it was meant for. The caller claims items too, and returns once the call's
 * items are all done, however many workers took part: a worker the system has descheduled, or one that
 * wakes late, finds none left and costs nothing. A call's description sits in one of two slots
 * (by the generation's parity): a worker late by a call reads the slot of its own call, still
 * intact, and its claim then fails. No lock is taken unless a thread sleeps: per call the cores
 * pass around the ticket's cache line (with the slots) and that of the count of items done. */
#define MAX_WORKERS 255

typedef struct {
    ItemFn fn;
    void *context;
    uint32_t items;
    int wanted; /* workers 0 .. wanted - 1 take part */
} Call;

static struct {
    _Alignas(64) _Atomic uint64_t ticket;
    Call calls[2];
    _Alignas(64) atomic_uint done; /* items of this call finished */
    _Alignas(64) atomic_int sleepers; /* workers asleep on `start` (or about to be) */
    atomic_int caller_asleep;         /* the caller asleep on `finished` (or about to be) */
    pthread_mutex_t lock, calling;    /* lock: the condition variables'; calling: one call at a time */
    pthread_cond_t start, finished;
    int started;
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .calling = PTHREAD_MUTEX_INITIALIZER,
          .start = PTHREAD_COND_INITIALIZER, .finished = PTHREAD_COND_INITIALIZER};

static uint32_t generation_of(uint64_t ticket) { return (uint32_t)(ticket >> 32); }

/* Claims and runs items of call `generation` until none is left (or that call is over). */
static void drain(uint32_t generation) {
    const Call *call = &pool.calls[generation % 2];
    uint64_t ticket = atomic_load(&pool.ticket);
    for (;;) {
        if (generation_of(ticket) != generation || (uint32_t)ticket >= call->items) return;
        if (!atomic_compare_exchange_weak(&pool.ticket, &ticket, ticket + 1)) continue;
        call->fn(call->context, (int64_t)(uint32_t)ticket);
        if (atomic_fetch_add(&pool.done, 1) + 1 == call->items && atomic_load(&pool.caller_asleep)) {
            pthread_mutex_lock(&pool.lock);
            pthread_cond_signal(&pool.finished);
            pthread_mutex_unlock(&pool.lock);
        }
        ticket = atomic_load(&pool.ticket);
    }
}

/* The generation each worker was started in: it joins the next one. */
static uint32_t worker_start[MAX_WORKERS];

/* Waking a sleeping thread costs 15-40 us here (a one-row 2048x4096 product takes 80-170 us on
 * two cores), so a thread that waits first spins this long on the value it waits for, then
 * sleeps: back-to-back calls (a decode step) find their workers awake. */
#define SPIN_MICROSECONDS 100

static uint64_t microseconds(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (uint64_t)now.tv_sec * 1000000u + (uint64_t)now.tv_nsec / 1000u;
}

/* One step of a spin that lasts up to SPIN_MICROSECONDS from the first call (a fresh spin
 * starts with *deadline = 0); now and then it yields the core to whatever else wants it (a busy
 * machine). False when the time is up. */
static int keep_spinning(unsigned *steps, uint64_t *deadline) {
#ifdef HAVE_X86
    _mm_pause();
#endif
    if (++*steps % 256 == 0) {
        uint64_t now = microseconds();
        if (*deadline == 0) *deadline = now + SPIN_MICROSECONDS;
        else if (now > *deadline) return 0;
        sched_yield();
    }
    return 1;
}

static void *worker(void *arg) {
    int id = (int)(intptr_t)arg;
    uint32_t seen = worker_start[id];
    int worked = 1; /* in the last call: a worker a call left out (fewer items than threads) sleeps at once */
    for (;;) {
        unsigned steps = 0;
        uint64_t deadline = 0;
        while (worked && generation_of(atomic_load_explicit(&pool.ticket, memory_order_relaxed)) == seen &&
               keep_spinning(&steps, &deadline)) {
        }
        if (generation_of(atomic_load(&pool.ticket)) == seen) {
            pthread_mutex_lock(&pool.lock);
            atomic_fetch_add(&pool.sleepers, 1); /* then look again: the caller looks at sleepers after the ticket */
            while (generation_of(atomic_load(&pool.ticket)) == seen) pthread_cond_wait(&pool.start, &pool.lock);
            atomic_fetch_sub(&pool.sleepers, 1);
            pthread_mutex_unlock(&pool.lock);
        }
        seen = generation_of(atomic_load(&pool.ticket));
        worked = id < pool.calls[seen % 2].wanted; /* stale if that call is over: then drain takes nothing */
        if (worked) drain(seen);
    }
    return NULL;
}

/* A forked child has none of the parent's threads: start afresh. */
static void forget_pool_in_child(void) {
    pthread_mutex_init(&pool.lock, NULL);
    pthread_mutex_init(&pool.calling, NULL);
    pthread_cond_init(&pool.start, NULL);
    pthread_cond_init(&pool.finished, NULL);
    atomic_store(&pool.sleepers, 0);
    atomic_store(&pool.caller_asleep, 0);
    pool.started = 0;
}

void parallel_for(ItemFn fn, void *context, int64_t items, int threads) {
    int workers = (int)(items < threads ? items : threads) - 1;
    if (workers > MAX_WORKERS) workers = MAX_WORKERS;
    if (workers <= 0 || items > UINT32_MAX) { /* the ticket counts items in 32 bits */
        for (int64_t i = 0; i < items; i++) fn(context, i);
        return;
    }
    pthread_mutex_lock(&pool.calling);
    uint32_t generation = generation_of(atomic_load(&pool.ticket)) + 1;
    while (pool.started < workers) {
        pthread_t thread;
        worker_start[pool.started] = generation - 1;
        if (pthread_create(&thread, NULL, worker, (void *)(intptr_t)pool.started) != 0) break;
        pthread_detach(thread);
        pool.started++;
    }
    if (workers > pool.started) workers = pool.started;
    pool.calls[generation % 2] = (Call){fn, context, (uint32_t)items, workers};
    atomic_store(&pool.done, 0);
    atomic_store(&pool.ticket, (uint64_t)generation << 32);
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.lock);
        pthread_cond_broadcast(&pool.start);
        pthread_mutex_unlock(&pool.lock);
    }
    drain(generation);
    unsigned steps = 0;
    uint64_t deadline = 0;
    while (atomic_load_explicit(&pool.done, memory_order_acquire) < items && keep_spinning(&steps, &deadline)) {
    }
    if (atomic_load(&pool.done) < items) {
        pthread_mutex_lock(&pool.lock);
        atomic_store(&pool.caller_asleep, 1); /* then look again: a worker looks at it after done */
        while (atomic_load(&pool.done) < items) pthread_cond_wait(&pool.finished, &pool.lock);
        atomic_store(&pool.caller_asleep, 0);
        pthread_mutex_unlock(&pool.lock);
    }
    pthread_mutex_unlock(&pool.calling);
}

/* ---------------------------------------------------------------- the product */

typedef struct {
    DecodeFn decode;
    DotFn dot;
    FusedFn fused; /* NULL: always decode into a buffer */
    IntDotFn integer; /* not NULL: the integer products on `activations`, for every group size */
    const Activations *activations;
    const float *sum16;
    const uint8_t *w;
    int64_t expert_stride, row_stride, rows, cols;
    const float *x;
    int64_t x_stride, k;
    /* pairs (input row i, slot j) = i * k + j, sorted by expert; group g is the pairs
     * pair_order[group_start[g] .. group_start[g + 1]) of expert group_expert[g] */
    const int64_t *pair_order, *group_start, *group_expert;
    int64_t band, bands_per_group;
    float *out;
    atomic_int failed;
} Product;

static void product_item(void *context, int64_t item) {
    Product *p = context;
    int64_t g = item / p->bands_per_group, first = (item % p->bands_per_group) * p->band;
    int64_t last = first + p->band < p->rows ? first + p->band : p->rows;
    const uint8_t *weights = p->w + p->group_expert[g] * p->expert_stride;
    int64_t group_first = p->group_start[g], group_last = p->group_start[g + 1];
    if (p->integer) { /* a few stored rows at a time stay in L1 while the inputs' parts go by */
        int64_t tile_rows = group_last - group_first <= MAX_ROWS ? ONE_PASS_TILE : INTEGER_TILE;
        for (int64_t tile = first; tile < last; tile += tile_rows) {
            int64_t tile_last = tile + tile_rows < last ? tile + tile_rows : last;
            for (int64_t s = group_first; s < group_last; s += MAX_ROWS) {
                int count = group_last - s < MAX_ROWS ? (int)(group_last - s) : MAX_ROWS;
                int64_t inputs[MAX_ROWS];
                float results[ONE_PASS_TILE * MAX_ROWS];
                for (int c = 0; c < count; c++) inputs[c] = p->pair_order[s + c] / p->k;
                p->integer(weights + tile * p->row_stride, p->row_stride, (int)(tile_last - tile), p->activations,
                           inputs, count, results);
                for (int64_t r = tile; r < tile_last; r++)
                    for (int c = 0; c < count; c++)
                        p->out[p->pair_order[s + c] * p->rows + r] = results[MAX_ROWS * (r - tile) + c];
            }
        }
        return;
    }
    if (p->fused && group_last - group_first < BUFFERED_ROWS) {
        for (int64_t r = first; r < last; r++) {
            const uint8_t *row = weights + r * p->row_stride;
            for (int64_t s = group_first; s < group_last; s++) {
                int64_t pair = p->pair_order[s], i = pair / p->k;
                const float *sum16 = p->sum16 ? p->sum16 + i * (p->cols / 16) : NULL;
                p->out[pair * p->rows + r] = p->fused(row, p->x + i * p->x_stride, sum16, p->cols);
            }
        }
        return;
    }
    float *row = malloc(sizeof(float) * (size_t)p->cols);
    if (row == NULL) {
        atomic_store(&p->failed, 1);
        return;
    }
    for (int64_t r = first; r < last; r++) {
        p->decode(weights + r * p->row_stride, row, p->cols);
        for (int64_t s = p->group_start[g]; s < p->group_start[g + 1]; s++) {
            int64_t pair = p->pair_order[s];
            p->out[pair * p->rows + r] = p->dot(row, p->x + (pair / p->k) * p->x_stride, p->cols);
        }
    }
    free(row);
}

#ifdef HAVE_X86 /* the only place the integer products run */
typedef struct {
    int kind, vnni; /* vnni: in the VNNI kernels' layout, else in the natural order (AVX2) */
    const float *x;
    int64_t x_stride;
    Activations *a;
} Quantizing;

static void quantize_item(void *context, int64_t i) {
    Quantizing *q = context;
    Activations *a = q->a;
    const float *x = q->x + i * q->x_stride;
    int8_t *parts = a->parts + 3 * i * a->stride;
    float *scales = a->scales + i * a->blocks, *sum16 = a->sum16 ? a->sum16 + i * (a->cols / 16) : NULL;
    if (!q->vnni) {
        quantize_row_avx2(x, a->cols, a->stride, parts, scales, sum16);
        return;
    }
    quantize_row_avx512(q->kind, x, a->cols, a->stride, parts, scales, sum16);
    if (q->kind == IQ2_XXS) offset_sums(parts, a->stride, a->cols, a->offsets + i * a->blocks * 32);
    if (q->kind == MXFP4) offset_sums3(parts, a->stride, a->blocks, 12, a->offsets + i * a->blocks * 48);
    if (q->kind == Q8_0) offset_sums3(parts, a->stride, a->cols / ACT_BLOCK, 128, a->offsets + i * a->blocks * 48);
}
#endif

int sort_pairs_by_expert(const int64_t *ids, int64_t pairs, int64_t experts, int skip_negative, int64_t *starts,
                         int64_t *pair_order) {
    memset(starts, 0, sizeof(int64_t) * (size_t)(experts + 1));
    for (int64_t s = 0; s < pairs; s++) { /* counts, each at starts[e + 1] */
        int64_t e = ids ? ids[s] : 0;
        if (e < 0 && skip_negative) continue;
        if (e < 0 || e >= experts) {
            PyErr_Format(PyExc_IndexError, "expert %lld out of range for %lld experts", (long long)e, (long long)experts);
            return -1;
        }
        starts[e + 1]++;
    }
    for (int64_t e = 0; e < experts; e++) starts[e + 1] += starts[e];
    for (int64_t s = 0; s < pairs; s++) { /* placing the pairs moves each expert's start to its end */
        int64_t e = ids ? ids[s] : 0;
        if (e >= 0) pair_order[starts[e]++] = s;
    }
    for (int64_t e = experts; e > 0; e--) starts[e] = starts[e - 1]; /* ends -> starts */
    starts[0] = 0;
    return 0;
}

#ifdef HAVE_X86
/* A decode step's activations (an input row or a few) go in a buffer kept per calling thread (freed
 * when it exits): allocating and freeing them cost about 0.2 us a call, a fifth of quantizing a
 * 4096-value row. Larger ones are allocated per call. */
#define KEPT_BYTES (256 * 1024)
static pthread_key_t kept_key;
static pthread_once_t kept_once = PTHREAD_ONCE_INIT;

static void make_kept_key(void) { (void)pthread_key_create(&kept_key, free); }

static size_t whole_lines(size_t bytes) { return (bytes + 63) / 64 * 64; }

/* a's arrays for n input rows in one 64-byte-aligned piece of memory, with sum16 when `sum16` and
 * `offsets` int32 per block when not 0: from the kept buffer when they fit, else allocated into
 * *owned (for the caller to free). Returns 0, or -1 when out of memory. */
static int allocate_activations(Activations *a, int64_t n, int sum16, int offsets, void **owned) {
    size_t parts = whole_lines((size_t)(3 * n * a->stride + 64)); /* slack: the last odd Q8_0 block reads
                                                                       * a whole register of parts */
    size_t offset_bytes = whole_lines(sizeof(int32_t) * (size_t)(n * a->blocks * offsets));
    size_t scales = whole_lines(sizeof(float) * (size_t)(n * a->blocks));
    size_t total = parts + offset_bytes + scales + (sum16 ? sizeof(float) * (size_t)(n * (a->cols / 16) + 1) : 0);
    char *memory;
    if (total <= KEPT_BYTES) {
        pthread_once(&kept_once, make_kept_key);
        memory = pthread_getspecific(kept_key);
        if (memory == NULL) {
            memory = aligned_alloc(64, KEPT_BYTES);
            if (memory == NULL || pthread_setspecific(kept_key, memory) != 0) {
                free(memory);
                return -1;
            }
        }
    } else if ((memory = *owned = aligned_alloc(64, whole_lines(total))) == NULL)
        return -1;
    a->parts = (int8_t *)memory;
    a->offsets = offsets ? (int32_t *)(memory + parts) : NULL;
    a->scales = (float *)(memory + parts + offset_bytes);
    a->sum16 = sum16 ? (float *)(memory + parts + offset_bytes + scales) : NULL;
    return 0;
}
#endif

#define MIN_BAND_WORK (1 << 17) /* weights times input rows in a band of the direct products: see matmul */

/* matmul(kind, w, expert_stride, row_stride, rows, cols, x, n, x_stride, ids, k, experts, out,
 *        threads): out (n * k, rows) = for each input row i and slot j, x[i] @ W[ids[i, j]].T.
 * Addresses are integers (tensor.data_ptr()); ids = 0 means one matrix (k = 1, expert 0). */
static PyObject *matmul(PyObject *self, PyObject *args) {
    (void)self;
    int kind, threads;
    unsigned long long w, x, ids_address, out;
    long long expert_stride, row_stride, rows, cols, n, x_stride, k, experts;
    if (!PyArg_ParseTuple(args, "iKLLLLKLLKLLKi", &kind, &w, &expert_stride, &row_stride, &rows, &cols, &x,
                          &n, &x_stride, &ids_address, &k, &experts, &out, &threads))
        return NULL;
    const Format *format = find_format(kind);
    if (format == NULL) return PyErr_Format(PyExc_ValueError, "no compiled kernel for GGML type %d", kind);
    if (cols % format->block != 0)
        return PyErr_Format(PyExc_ValueError, "%lld columns is not a whole number of blocks", cols);
    if (k < 1 || experts < 1 || n < 0 || rows < 0) return PyErr_Format(PyExc_ValueError, "bad product shape");

    int64_t pairs = n * k;
    float *sum16 = NULL; /* the input's sums per 16 values, for the fused Q2_K and Q4_K */
    /* integer products: rows of parts 64-byte aligned (a load across two cache lines costs two) */
    Activations activations = {NULL, NULL, NULL, NULL, cols, (cols + ACT_BLOCK - 1) / ACT_BLOCK,
                               (cols + ACT_BLOCK - 1) / ACT_BLOCK * ACT_BLOCK + 64};
    void *activations_owned = NULL; /* their memory, unless it is the calling thread's kept buffer */
    const int64_t *ids = (const int64_t *)(uintptr_t)ids_address;
    int64_t *starts = malloc(sizeof(int64_t) * (size_t)(experts + 1));
    int64_t *pair_order = malloc(sizeof(int64_t) * (size_t)(pairs ? pairs : 1));
    int64_t *group_start = malloc(sizeof(int64_t) * (size_t)(experts + 1));
    int64_t *group_expert = malloc(sizeof(int64_t) * (size_t)experts);
    if (!starts || !pair_order || !group_start || !group_expert) {
        PyErr_NoMemory();
        goto done;
    }
    if (sort_pairs_by_expert(ids, pairs, experts, 0, starts, pair_order) != 0) goto done;
    int64_t groups = 0; /* the experts with pairs */
    for (int64_t e = 0; e < experts; e++)
        if (starts[e + 1] > starts[e]) {
            group_expert[groups] = e;
            group_start[groups++] = starts[e];
        }
    group_start[groups] = pairs;

    /* Bands of output rows: one contiguous band per thread (per expert when several), since each
     * thread then streams one run of memory; eight bands per thread, handed out in turn, made
     * one-row products 10-15% slower (docs/benchmarks.md). A band is at least MIN_BAND_WORK
     * weights times inputs (4 rows at least): handing a band to another thread costs about a
     * microsecond on a quiet machine, more on a busy one (one row of IQ2_XXS, medians: 32x4096
     * 2.8 us on one thread, 2.7 on two; 64x4096 4.4 and 3.8, but 5.4 on two when the other core
     * was busy). */
    int64_t target = (int64_t)(threads > 0 ? threads : 1);
    int64_t band = (rows * (groups ? groups : 1) + target - 1) / target;
    int64_t inputs_per_group = groups ? (pairs + groups - 1) / groups : 1;
    int64_t least = MIN_BAND_WORK / (cols * inputs_per_group > 0 ? cols * inputs_per_group : 1);
    if (band < least) band = least;
    if (band < 4) band = 4;
    if (band > rows) band = rows > 0 ? rows : 1;
    Product p = {format->portable, dot_portable, NULL, NULL, NULL, NULL, (const uint8_t *)(uintptr_t)w, expert_stride, row_stride, rows, cols,
                 (const float *)(uintptr_t)x, x_stride, k, pair_order, group_start, group_expert, band,
                 (rows + band - 1) / band, (float *)(uintptr_t)out, 0};
#ifdef HAVE_X86
    IntDotFn integer = isa >= USE_VNNI ? format->integer : isa >= USE_AVX2 ? format->integer_avx2 : NULL;
    int vnni = isa >= USE_VNNI;
    if (integer && n > 0) {
        int offsets = !vnni ? 0 : kind == IQ2_XXS ? 32 : kind == MXFP4 || kind == Q8_0 ? 48 : 0; /* int32 per block */
        if (allocate_activations(&activations, n, format->needs_sum16, offsets, &activations_owned) != 0) {
            PyErr_NoMemory();
            goto done;
        }
        Quantizing quantizing = {kind, vnni, p.x, x_stride, &activations};
        Py_BEGIN_ALLOW_THREADS;
        parallel_for(quantize_item, &quantizing, n, threads);
        Py_END_ALLOW_THREADS;
        p.integer = integer;
        p.activations = &activations;
    } else if (isa >= USE_AVX2) {
        p.decode = format->avx2;
        p.dot = dot_avx2;
        p.fused = isa >= USE_AVX512 ? format->fused_avx512 : format->fused_avx2; /* with VNNI: F16, BF16 */
        if (format->needs_sum16) {
            sum16 = malloc(sizeof(float) * (size_t)(n * (cols / 16) + 1));
            if (sum16 == NULL) {
                PyErr_NoMemory();
                goto done;
            }
            for (int64_t i = 0; i < n; i++)
                for (int64_t j = 0; j < cols / 16; j++) {
                    float total = 0.0f;
                    for (int v = 0; v < 16; v++) total += p.x[i * x_stride + 16 * j + v];
                    sum16[i * (cols / 16) + j] = total;
                }
            p.sum16 = sum16;
        }
    }
#endif
    if (rows > 0) {
        Py_BEGIN_ALLOW_THREADS;
        parallel_for(product_item, &p, groups * p.bands_per_group, threads);
        Py_END_ALLOW_THREADS;
    }
    if (atomic_load(&p.failed)) PyErr_NoMemory();

done:
    free(activations_owned);
    free(sum16);
    free(starts);
    free(pair_order);
    free(group_start);
    free(group_expert);
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
}

typedef struct {
    DecodeFn decode;
    const uint8_t *w;
    int64_t row_stride, rows, cols, band;
    float *out;
} Decoding;

static void decode_item(void *context, int64_t item) {
    Decoding *d = context;
    int64_t first = item * d->band, last = first + d->band < d->rows ? first + d->band : d->rows;
    for (int64_t r = first; r < last; r++) d->decode(d->w + r * d->row_stride, d->out + r * d->cols, d->cols);
}

/* decode(kind, w, row_stride, rows, cols, out, threads): the float32 values of `rows` stored
 * rows into out (rows, cols), for products with many input rows (then a float32 GEMM). */
static PyObject *decode(PyObject *self, PyObject *args) {
    (void)self;
    int kind, threads;
    unsigned long long w, out;
    long long row_stride, rows, cols;
    if (!PyArg_ParseTuple(args, "iKLLLKi", &kind, &w, &row_stride, &rows, &cols, &out, &threads)) return NULL;
    const Format *format = find_format(kind);
    if (format == NULL) return PyErr_Format(PyExc_ValueError, "no compiled kernel for GGML type %d", kind);
    if (cols % format->block != 0)
        return PyErr_Format(PyExc_ValueError, "%lld columns is not a whole number of blocks", cols);
    int64_t band = (rows + 8 * threads - 1) / (8 * (int64_t)(threads > 0 ? threads : 1));
    if (band < 1) band = 1;
    Decoding d = {format->portable, (const uint8_t *)(uintptr_t)w, row_stride, rows, cols, band,
                  (float *)(uintptr_t)out};
#ifdef HAVE_X86
    if (isa >= USE_AVX2) d.decode = format->avx2;
#endif
    Py_BEGIN_ALLOW_THREADS;
    parallel_for(decode_item, &d, (rows + band - 1) / band, threads);
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}

static PyObject *kinds(PyObject *self, PyObject *unused) {
    (void)self, (void)unused;
    PyObject *list = PyList_New(0);
    for (size_t i = 0; list && i < sizeof(formats) / sizeof(formats[0]); i++) {
        PyObject *number = PyLong_FromLong(formats[i].kind);
        if (!number || PyList_Append(list, number) < 0) Py_CLEAR(list);
        Py_XDECREF(number);
    }
    return list;
}

static PyObject *get_isa(PyObject *self, PyObject *unused) {
    (void)self, (void)unused;
    return PyUnicode_FromString(isa == USE_VNNI     ? "avx512vnni"
                                : isa == USE_AVX512 ? "avx512"
                                : isa == USE_AVX2   ? "avx2"
                                                    : "portable");
}

/* The best instruction set this CPU has. */
static int best_isa(void) {
#ifdef HAVE_X86
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")))
        return PORTABLE;
    if (!__builtin_cpu_supports("avx512f")) return USE_AVX2;
    if (__builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi"))
        return USE_VNNI;
    return USE_AVX512;
#else
    return PORTABLE;
#endif
}

static PyObject *set_isa(PyObject *self, PyObject *name) {
    (void)self;
    const char *wanted = PyUnicode_AsUTF8(name);
    if (wanted == NULL) return NULL;
    int level = strcmp(wanted, "portable") == 0 ? PORTABLE
                : strcmp(wanted, "avx2") == 0   ? USE_AVX2
                : strcmp(wanted, "avx512") == 0 ? USE_AVX512
                : strcmp(wanted, "avx512vnni") == 0 ? USE_VNNI
                                                : -1;
    if (level < 0 || level > best_isa())
        return PyErr_Format(PyExc_ValueError, "instruction set %s is not available here", wanted);
    isa = level;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"matmul", matmul, METH_VARARGS, "Matrix product straight from stored blocks (see the source)."},
    {"decode", decode, METH_VARARGS, "Stored rows to float32 (see the source)."},
    {"gemm", gemm, METH_VARARGS, "The compiled GEMM straight from stored blocks, many input rows (cpu_gemm.c)."},
    {"gemm_kinds", gemm_kinds, METH_NOARGS, "GGML type numbers the compiled GEMM takes (none without VNNI)."},
    {"kinds", kinds, METH_NOARGS, "GGML type numbers with a compiled kernel."},
    {"isa", get_isa, METH_NOARGS, "The instruction set in use: 'avx512vnni', 'avx512', 'avx2' or 'portable'."},
    {"set_isa", set_isa, METH_O, "Choose the instruction set ('avx512vnni', 'avx512', 'avx2', 'portable'; at most the CPU's), for tests and benchmarks."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__cpu(void) {
    build_tables();
    build_int_tables();
    build_avx2_int_tables();
    isa = best_isa();
    pthread_atfork(NULL, NULL, forget_pool_in_child);
    return PyModule_Create(&module);
}
