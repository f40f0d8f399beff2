/* The compiled GEMM: products with many input rows (a prompt's tokens through a dense matrix, a
 * routed expert's share of them, the grouped output projection), on AVX-512 VNNI; an integer
 * GEMM for the block formats, a float32 one for F16 and BF16 (at the end).
 *
 * The direct products (cpu_kernels.c) decode each stored row again for every one or two input
 * rows; here a tile of 32 stored rows is decoded once to unsigned 8-bit codes, in the layout
 * `vpdpbusd` wants (one register = 16 rows x 4 consecutive values: Q8_0, Q4_K and MXFP4 rows
 * decoded then transposed, Q2_K and IQ2_XXS decoded from their 16 rows' stored blocks transposed), and
 * then meets every input row of its share of the product. The input rows are rounded as for the direct products: three
 * int8 parts per value, x ≈ s (a0 + a1 / 254 + a2 / 254²), one scale s per 256 values, so the
 * results agree with dequantize-then-matmul to float32's rounding (docs/model.md, "Kernels").
 *
 * The microkernel holds 2 x 3 x 3 int32 sums (two registers of rows, three input rows, three
 * parts) and takes each part's four values as a broadcast dword beside the stored codes. Each
 * code is made unsigned: Q8_0, IQ2_XXS and MXFP4 add a constant c (128, 43, 12) to every value and
 * take c times the parts' sums per 32 values off again (the sums start from that), Q2_K's codes
 * times its 4-bit scales are at most 45, Q4_K's codes are 4-bit. The integer sums go to float
 * once per scale group (32 values; 256 for Q2_K, whose scales are in the codes): converted,
 * times the group's scale per row (and that over 254 and 254² for the other parts), added to a
 * float sum per row and input; once per 256 values that sum times the input's scale goes to
 * the output, less Q2_K and Q4_K's minimums times the input's sums per 16 or 32 values. On this
 * CPU (Zen 5) the conversions hide behind the `vpdpbusd`: about 90% of its peak of two per
 * cycle, about 300 GFLOP/s per core in float32 terms (docs/benchmarks.md).
 */
#include "cpu_shared.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#ifdef HAVE_X86
#include <immintrin.h>

#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")))
#define INLINE inline __attribute__((always_inline))

#define TILE_ROWS 32 /* stored rows per tile: two registers of 16 */
#define TOKENS 3     /* input rows per pass of the microkernel */
#define PARTS 3
#define SLICE_BYTES (16 * 1024 * 1024) /* input parts a decoded tile meets: about half an L3 cache */
#define AHEAD 8                   /* stored rows prefetched ahead of the one decoded */

/* One stored row of `cols` values decoded: unsigned codes, the scale of each group and (Q2_K,
 * Q4_K) the minimum of each sub-block. */
typedef void (*RowFn)(const uint8_t *w, int64_t cols, uint8_t *codes, float *scales, float *mins);

/* Rows [16 h, 16 h + 16) of a tile (`valid` of them stored) decoded straight into it (Q2_K,
 * IQ2_XXS: see decode_tile), prefetching into the rows after them (`rows_left` from the tile's
 * first). */
struct Tile;
typedef void (*RowsFn)(const uint8_t *w, int64_t row_stride, int64_t valid, int64_t rows_left, int64_t cols,
                       const struct Tile *tile, int h);

typedef struct {
    int kind;
    int block, bytes; /* values and bytes per stored block */
    int group;  /* values per scale: 32, or 256 */
    int offset; /* c: code = value + c */
    int sub;    /* values per minimum, 0: none */
    RowFn row;    /* one row at a time, then the codes transposed (Q8_0, Q4_K, MXFP4) */
    RowsFn rows;  /* or 16 rows at once from their transposed blocks (Q2_K, IQ2_XXS) */
} GemmFormat;

VNNI static INLINE float half(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

VNNI static void row_q8_0(const uint8_t *w, int64_t cols, uint8_t *codes, float *scales, float *mins) {
    (void)mins;
    const __m256i flip = _mm256_set1_epi8((char)0x80); /* q + 128 */
    for (int64_t b = 0; b < cols / 32; b++, w += 34) {
        scales[b] = half(w);
        _mm256_storeu_si256((__m256i *)(codes + 32 * b),
                            _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(w + 2)), flip));
    }
}

/* MXFP4: each code's doubled value + 12 (0 to 24) from a table (`vpshufb` on the nibbles: low
 * nibbles are values 0-15, high ones 16-31), the block's scale 2^(e - 128) its group's. */
VNNI static void row_mxfp4(const uint8_t *w, int64_t cols, uint8_t *codes, float *scales, float *mins) {
    (void)mins;
    const __m128i table = _mm_add_epi8(_mm_loadu_si128((const __m128i *)mxfp4_doubled), _mm_set1_epi8(12));
    const __m128i low_nibbles = _mm_set1_epi8(0xF);
    for (int64_t b = 0; b < cols / 32; b++, w += 17) {
        scales[b] = mxfp4_half_scale(w[0]);
        __m128i bytes = _mm_loadu_si128((const __m128i *)(w + 1));
        _mm_storeu_si128((__m128i *)(codes + 32 * b), _mm_shuffle_epi8(table, _mm_and_si128(bytes, low_nibbles)));
        _mm_storeu_si128((__m128i *)(codes + 32 * b + 16),
                         _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(bytes, 4), low_nibbles)));
    }
}

/* Two 32-byte halves, the low one from `low`, the high one from `high`. */
VNNI static INLINE __m512i halves(__m256i low, __m256i high) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
}

VNNI static void row_q4_k(const uint8_t *w, int64_t cols, uint8_t *codes, float *scales, float *mins) {
    const __m256i low_nibbles = _mm256_set1_epi8(0xF);
    for (int64_t b = 0; b < cols / 256; b++, w += 144, codes += 256, scales += 8, mins += 8) {
        float d = half(w), dmin = half(w + 2);
        for (int j = 0; j < 4; j++) { /* values 64 j..: low, then high nibbles of bytes 32 j.. */
            __m256i bytes = _mm256_loadu_si256((const __m256i *)(w + 16 + 32 * j));
            _mm512_storeu_si512(codes + 64 * j, halves(_mm256_and_si256(bytes, low_nibbles),
                                                       _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low_nibbles)));
        }
        for (int g = 0; g < 8; g++) {
            int scale, minimum;
            q4_k_scale_min(w + 4, g, &scale, &minimum);
            scales[g] = d * (float)scale;
            mins[g] = dmin * (float)minimum;
        }
    }
}

/* ---------------------------------------------------------------- the inputs */

typedef struct {
    int8_t *parts;  /* (n, 3, stride): part p of input row i at parts + (3 i + p) stride, natural order */
    float *scales;  /* (n, blocks of 256) */
    int32_t *corr;  /* (n, 3, groups of 32): -c times the part's sum over the group (Q8_0, IQ2_XXS, MXFP4) */
    float *sums;    /* (n, cols / 16): the input's float sums per sub-block (Q2_K 16, Q4_K 32, the rest unused) */
    int64_t cols, blocks, groups, stride;
} GemmInput;

typedef struct {
    const GemmFormat *format;
    const float *x;
    int64_t x_stride;
    GemmInput *in;
} Rounding;

VNNI static void round_item(void *context, int64_t i) {
    Rounding *r = context;
    GemmInput *in = r->in;
    const GemmFormat *f = r->format;
    int8_t *parts = in->parts + 3 * i * in->stride;
    float *sum16 = f->sub ? in->sums + i * (in->cols / 16) : NULL; /* first per 16, then per sub */
    quantize_row_avx512(NATURAL_PARTS, r->x + i * r->x_stride, in->cols, in->stride, parts, in->scales + i * in->blocks,
                        sum16);
    if (f->sub == 32)
        for (int64_t j = 0; j < in->cols / 32; j++) sum16[j] = sum16[2 * j] + sum16[2 * j + 1];
    if (f->offset) {
        const __m512i ones = _mm512_set1_epi8(1);
        for (int p = 0; p < PARTS; p++) {
            int32_t *corr = in->corr + (3 * i + p) * in->groups;
            const int8_t *part = parts + p * in->stride;
            for (int64_t g = 0; g < in->groups; g += 2) {
                __m512i sums4 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, _mm512_loadu_si512(part + 32 * g));
                corr[g] = -f->offset * _mm512_mask_reduce_add_epi32(0x00FF, sums4);
                if (g + 1 < in->groups) corr[g + 1] = -f->offset * _mm512_mask_reduce_add_epi32(0xFF00, sums4);
            }
        }
    }
}

/* ---------------------------------------------------------------- tiles */

typedef struct Tile {
    uint8_t *codes; /* (cols / 4, 2, 64): k-step j, rows 16 h.. 16 h + 15, four values each */
    float *scales;  /* (cols / group, 3, 32): d, d / 254, d / 254² per row */
    float *mins;    /* (cols / sub, 32) */
    uint8_t *rows;  /* (16, cols + 64): 16 rows' codes as decoded, before the transposition */
    float *row_scales, *row_mins; /* (16, cols / group), (16, cols / sub): theirs */
} Tile;

/* This thread's tile buffer, kept between calls (the pool's threads live on). */
static _Thread_local uint8_t *tile_buffer;
static _Thread_local size_t tile_bytes;

/* This thread's tile buffer, at least `bytes` long and 64-byte aligned; NULL when out of memory. */
static uint8_t *thread_tile_buffer(size_t bytes) {
    if (tile_bytes < bytes) {
        free(tile_buffer);
        tile_bytes = 0;
        if (posix_memalign((void **)&tile_buffer, 64, bytes) != 0) {
            tile_buffer = NULL;
            return NULL;
        }
        tile_bytes = bytes;
    }
    return tile_buffer;
}

static int tile_for(const GemmFormat *f, int64_t cols, Tile *tile) {
    size_t groups = (size_t)(cols / f->group), subs = f->sub ? (size_t)(cols / f->sub) : 0;
    size_t sizes[6] = {(size_t)cols * TILE_ROWS, sizeof(float) * 3 * TILE_ROWS * groups, sizeof(float) * TILE_ROWS * subs,
                       16 * (size_t)(cols + 64), sizeof(float) * 16 * groups, sizeof(float) * 16 * subs};
    size_t bytes = 0;
    for (int i = 0; i < 6; i++) bytes += (sizes[i] + 63) / 64 * 64;
    uint8_t *at[6], *next = thread_tile_buffer(bytes);
    if (next == NULL) return -1;
    for (int i = 0; i < 6; i++) {
        at[i] = next;
        next += (sizes[i] + 63) / 64 * 64;
    }
    *tile = (Tile){at[0], (float *)at[1], (float *)at[2], at[3], (float *)at[4], (float *)at[5]};
    return 0;
}

/* Sixteen registers of 16 dwords transposed: r[i] dword j <-> r[j] dword i. */
VNNI static INLINE void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) { /* r[4 i + m], 128-bit lane L: dword 4 L + m of rows 4 i.. 4 i + 3 */
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int m = 0; m < 4; m++) {
        __m512i even_low = _mm512_shuffle_i32x4(r[m], r[4 + m], 0x88), odd_low = _mm512_shuffle_i32x4(r[m], r[4 + m], 0xDD);
        __m512i even_high = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], 0x88);
        __m512i odd_high = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], 0xDD);
        t[m] = _mm512_shuffle_i32x4(even_low, even_high, 0x88);
        t[8 + m] = _mm512_shuffle_i32x4(even_low, even_high, 0xDD);
        t[4 + m] = _mm512_shuffle_i32x4(odd_low, odd_high, 0x88);
        t[12 + m] = _mm512_shuffle_i32x4(odd_low, odd_high, 0xDD);
    }
    for (int i = 0; i < 16; i++) r[i] = t[i];
}

/* Ask for the stored block (of `block_bytes`, at most 128) four blocks after block b of row `row`,
 * or near the row's end the same block of the row 16 further on, while it is within `rows_left`. */
VNNI static INLINE void prefetch_block_ahead(const uint8_t *w, int64_t row_stride, int64_t block_bytes,
                                             int64_t rows_left, int64_t row, int64_t b, int64_t blocks) {
    int64_t ahead = b + 4 < blocks ? row : row + 16;
    if (ahead < rows_left) {
        const char *next = (const char *)w + ahead * row_stride + block_bytes * ((b + 4) % blocks);
        _mm_prefetch(next, _MM_HINT_T0);
        _mm_prefetch(next + 64, _MM_HINT_T0);
    }
}

/* IQ2_XXS rows [16 h, 16 h + 16) of a tile (`valid` of them stored), straight into it: per block,
 * the 16 rows' 64 bytes of indices, signs and scales transposed (a quarter of what the decoded
 * codes would be), then decoded in place, one register of 16 rows x 4 values at a time: no
 * transposition of the codes. The stored blocks are prefetched 4 blocks ahead, into the next
 * 16 rows at the end (of `rows_left` from the tile's first). */
VNNI static void decode_iq2_xxs_rows(const uint8_t *w, int64_t row_stride, int64_t valid, int64_t rows_left,
                                     int64_t cols, const Tile *tile, int h) {
    const float third = 1.0f / 254.0f, fourth = 1.0f / (254.0f * 254.0f);
    __m512i grid[8];
    for (int i = 0; i < 8; i++) grid[i] = _mm512_loadu_si512(iq2_xxs_grid_codes + 32 * i);
    const __m512i offset = _mm512_set1_epi8(43), magnitudes = _mm512_loadu_si512(iq2_magnitudes);
    const __m512i signs_low = _mm512_loadu_si512(iq2_signs), signs_high = _mm512_loadu_si512(iq2_signs + 64);
    /* each dword's byte 0 to its four bytes; the values' bits of a sign byte; the codes' 2-bit values */
    const __m512i replicate = _mm512_set4_epi32(0x0C0C0C0C, 0x08080808, 0x04040404, 0);
    const __m512i sign_bits[2] = {_mm512_set1_epi32(0x08040201), _mm512_set1_epi32((int)0x80402010u)};
    const __m512i value_bits[2] = {_mm512_set1_epi64(0x2624222006040200ll), _mm512_set1_epi64(0x2E2C2A280E0C0A08ll)};
    int64_t blocks = cols / 256;
    for (int64_t b = 0; b < blocks; b++) {
        __m512i x[16];
        float d[16];
        for (int r = 0; r < 16; r++) {
            prefetch_block_ahead(w, row_stride, 66, rows_left, 16 * h + r, b, blocks);
            const uint8_t *block = w + (16 * h + r) * row_stride + 66 * b;
            x[r] = r < valid ? _mm512_loadu_si512(block + 2) : _mm512_setzero_si512();
            d[r] = r < valid ? half(block) : 0.0f;
        }
        transpose16(x); /* x[2 g]: group g's 4 indices, x[2 g + 1]: its signs and scale; lane = row */
        __m512 eighth_d = _mm512_mul_ps(_mm512_loadu_ps(d), _mm512_set1_ps(0.125f));
        for (int g = 0; g < 8; g++) {
            __m512i indices = x[2 * g], aux = x[2 * g + 1];
            /* group scale d (0.5 + s) / 4 = d (2 s + 1) / 8 */
            __m512 scale = _mm512_mul_ps(
                _mm512_cvtepi32_ps(_mm512_or_si512(_mm512_slli_epi32(_mm512_srli_epi32(aux, 28), 1), _mm512_set1_epi32(1))),
                eighth_d);
            float *at = tile->scales + 3 * (8 * b + g) * TILE_ROWS + 16 * h;
            _mm512_store_ps(at, scale);
            _mm512_store_ps(at + TILE_ROWS, _mm512_mul_ps(scale, _mm512_set1_ps(third)));
            _mm512_store_ps(at + 2 * TILE_ROWS, _mm512_mul_ps(scale, _mm512_set1_ps(fourth)));
            for (int p = 0; p < 4; p++) { /* grid point p: values 8 p.. of the group, two k-steps */
                __m512i index = _mm512_srli_epi32(indices, 8 * p); /* in each dword's low word */
                __mmask32 bit6 = _mm512_test_epi16_mask(index, _mm512_set1_epi16(64));
                __mmask32 bit7 = _mm512_test_epi16_mask(index, _mm512_set1_epi16(128));
                __m512i code = _mm512_mask_blend_epi16(
                    bit7,
                    _mm512_mask_blend_epi16(bit6, _mm512_permutex2var_epi16(grid[0], index, grid[1]),
                                            _mm512_permutex2var_epi16(grid[2], index, grid[3])),
                    _mm512_mask_blend_epi16(bit6, _mm512_permutex2var_epi16(grid[4], index, grid[5]),
                                            _mm512_permutex2var_epi16(grid[6], index, grid[7])));
                __m512i signs = _mm512_shuffle_epi8(
                    _mm512_permutex2var_epi8(signs_low, _mm512_srli_epi32(aux, 7 * p), signs_high), replicate);
                for (int half_index = 0; half_index < 2; half_index++) {
                    __m512i magnitude =
                        _mm512_permutexvar_epi8(_mm512_multishift_epi64_epi8(value_bits[half_index], code), magnitudes);
                    __mmask64 negative = _mm512_test_epi8_mask(signs, sign_bits[half_index]);
                    int64_t step = 64 * b + 8 * g + 2 * p + half_index;
                    _mm512_store_si512(tile->codes + (step * 2 + h) * 64,
                                       _mm512_mask_sub_epi8(_mm512_add_epi8(offset, magnitude), negative, offset,
                                                            magnitude));
                }
            }
        }
    }
}

/* Q2_K rows [16 h, 16 h + 16) of a tile the same way: the 16 rows' 2-bit codes (64 bytes) and
 * sub-block scales (16 bytes) transposed, each register of 16 rows x 4 values then cut from its
 * codes' dword and scaled through a byte table (entry 4 s + t = s t). */
VNNI static void decode_q2_k_rows(const uint8_t *w, int64_t row_stride, int64_t valid, int64_t rows_left,
                                  int64_t cols, const Tile *tile, int h) {
    const float third = 1.0f / 254.0f, fourth = 1.0f / (254.0f * 254.0f);
    uint8_t products[64];
    for (int i = 0; i < 64; i++) products[i] = (uint8_t)((i / 4) * (i % 4));
    const __m512i table = _mm512_loadu_si512(products), low_nibbles = _mm512_set1_epi8(0x0F);
    const __m512i three = _mm512_set1_epi8(3), dwords = _mm512_set4_epi32(0x0C0C0C0C, 0x08080808, 0x04040404, 0);
    int64_t blocks = cols / 256;
    for (int64_t b = 0; b < blocks; b++) {
        __m512i x[16], y[16];
        float d[16], dmin[16];
        for (int r = 0; r < 16; r++) {
            prefetch_block_ahead(w, row_stride, 84, rows_left, 16 * h + r, b, blocks);
            const uint8_t *block = w + (16 * h + r) * row_stride + 84 * b;
            x[r] = r < valid ? _mm512_loadu_si512(block + 16) : _mm512_setzero_si512();
            y[r] = r < valid ? _mm512_zextsi128_si512(_mm_loadu_si128((const __m128i *)block)) : _mm512_setzero_si512();
            d[r] = r < valid ? half(block + 80) : 0.0f;
            dmin[r] = r < valid ? half(block + 82) : 0.0f;
        }
        transpose16(x); /* x[i], lane r: the codes' dword i of row r */
        transpose16(y); /* y[q < 4], lane r: scale bytes 4 q.. 4 q + 3 of row r */
        __m512 scale = _mm512_loadu_ps(d), minimum = _mm512_loadu_ps(dmin);
        float *at = tile->scales + 3 * b * TILE_ROWS + 16 * h;
        _mm512_store_ps(at, scale);
        _mm512_store_ps(at + TILE_ROWS, _mm512_mul_ps(scale, _mm512_set1_ps(third)));
        _mm512_store_ps(at + 2 * TILE_ROWS, _mm512_mul_ps(scale, _mm512_set1_ps(fourth)));
        for (int sub = 0; sub < 16; sub++) { /* values 16 sub.. */
            /* byte sub % 4 of each dword to all four of its bytes */
            __m512i packed = _mm512_shuffle_epi8(
                y[sub / 4], _mm512_add_epi8(dwords, _mm512_set1_epi8((char)(sub % 4))));
            __m512 m = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(packed, 4), _mm512_set1_epi32(0xF)));
            _mm512_store_ps(tile->mins + (16 * b + sub) * TILE_ROWS + 16 * h, _mm512_mul_ps(m, minimum));
            __m512i scale_index = _mm512_slli_epi32(_mm512_and_si512(packed, low_nibbles), 2); /* 4 s per byte */
            /* value 32 c + j: bits 2 (c % 4) of byte 32 (c / 4) + j */
            int c = sub / 2, shift = 2 * (c % 4);
            for (int u = 0; u < 4; u++) {
                __m512i codes = _mm512_and_si512(_mm512_srli_epi32(x[8 * (c / 4) + 4 * (sub % 2) + u], shift), three);
                _mm512_store_si512(tile->codes + ((64 * b + 4 * sub + u) * 2 + h) * 64,
                                   _mm512_permutexvar_epi8(_mm512_or_si512(codes, scale_index), table));
            }
        }
    }
}

/* Decode stored rows [first, first + count) into the tile (count ≤ 32; the rest of it weighs
 * nothing): each block of 16 rows row by row into `rows` (16, cols + 64), then transposed. The
 * stored rows are prefetched AHEAD ahead, into the next tile's too (`rows_left` rows from first
 * on): with one thread that is the next item, with two the other thread's, found in L3. */
VNNI static void decode_tile(const GemmFormat *f, const uint8_t *w, int64_t row_stride, int64_t count,
                             int64_t rows_left, int64_t cols, const Tile *tile) {
    int64_t stride = cols + 64; /* rows 4 KiB apart would share the L1 cache's sets */
    int64_t groups = cols / f->group, subs = f->sub ? cols / f->sub : 0;
    int64_t row_bytes = cols / f->block * f->bytes;
    const float third = 1.0f / 254.0f, fourth = 1.0f / (254.0f * 254.0f);
    for (int h = 0; h < 2; h++) {
        if (f->rows) {
            int64_t valid = count - 16 * h < 0 ? 0 : count - 16 * h > 16 ? 16 : count - 16 * h;
            f->rows(w, row_stride, valid, rows_left, cols, tile, h);
            continue;
        }
        for (int64_t r = 0; r < 16; r++) {
            float *scales = tile->row_scales + r * groups, *mins = tile->row_mins + r * subs;
            if (16 * h + r + AHEAD < rows_left) /* the stored bytes come from memory: ask for them early */
                for (int64_t at = 0; at < row_bytes; at += 64)
                    _mm_prefetch((const char *)w + (16 * h + r + AHEAD) * row_stride + at, _MM_HINT_T0);
            if (16 * h + r < count) {
                f->row(w + (16 * h + r) * row_stride, cols, tile->rows + r * stride, scales, mins);
            } else {
                memset(tile->rows + r * stride, 0, (size_t)cols);
                memset(scales, 0, sizeof(float) * (size_t)groups);
                memset(mins, 0, sizeof(float) * (size_t)subs);
            }
        }
        for (int64_t start = 0; start < cols; start += 64) {
            __m512i regs[16];
            for (int r = 0; r < 16; r++) regs[r] = _mm512_loadu_si512(tile->rows + r * stride + start);
            transpose16(regs);
            int64_t steps = cols - start < 64 ? (cols - start) / 4 : 16;
            uint8_t *out = tile->codes + (start / 4 * 2 + h) * 64;
            for (int64_t s = 0; s < steps; s++) _mm512_store_si512(out + 128 * s, regs[s]);
        }
        /* the scales and minimums, 16 rows x 16 groups at a time transposed the same way */
        for (int64_t g0 = 0; g0 < groups; g0 += 16) {
            __mmask16 valid = groups - g0 >= 16 ? 0xFFFF : (__mmask16)((1u << (groups - g0)) - 1);
            __m512i regs[16];
            for (int r = 0; r < 16; r++) regs[r] = _mm512_maskz_loadu_epi32(valid, tile->row_scales + r * groups + g0);
            transpose16(regs);
            for (int64_t g = g0; g < groups && g < g0 + 16; g++) {
                __m512 d = _mm512_castsi512_ps(regs[g - g0]);
                float *at = tile->scales + 3 * g * TILE_ROWS + 16 * h;
                _mm512_store_ps(at, d);
                _mm512_store_ps(at + TILE_ROWS, _mm512_mul_ps(d, _mm512_set1_ps(third)));
                _mm512_store_ps(at + 2 * TILE_ROWS, _mm512_mul_ps(d, _mm512_set1_ps(fourth)));
            }
        }
        for (int64_t j0 = 0; j0 < subs; j0 += 16) {
            __mmask16 valid = subs - j0 >= 16 ? 0xFFFF : (__mmask16)((1u << (subs - j0)) - 1);
            __m512i regs[16];
            for (int r = 0; r < 16; r++) regs[r] = _mm512_maskz_loadu_epi32(valid, tile->row_mins + r * subs + j0);
            transpose16(regs);
            for (int64_t j = j0; j < subs && j < j0 + 16; j++) _mm512_store_si512(tile->mins + j * TILE_ROWS + 16 * h, regs[j - j0]);
        }
    }
}

static const GemmFormat gemm_formats[] = {
    {Q8_0, 32, 34, 32, 128, 0, row_q8_0, NULL},
    {Q2_K, 256, 84, 256, 0, 16, NULL, decode_q2_k_rows},
    {Q4_K, 256, 144, 32, 0, 32, row_q4_k, NULL},
    {IQ2_XXS, 256, 66, 32, 43, 0, NULL, decode_iq2_xxs_rows},
    {MXFP4, 32, 17, 32, 12, 0, row_mxfp4, NULL},
    {F16, 1, 2, 0, 0, 0, NULL, NULL}, /* the float path below */
    {BF16, 1, 2, 0, 0, 0, NULL, NULL},
};

static const GemmFormat *find_gemm_format(int kind) {
    for (size_t i = 0; i < sizeof(gemm_formats) / sizeof(gemm_formats[0]); i++)
        if (gemm_formats[i].kind == kind) return &gemm_formats[i];
    return NULL;
}

/* ---------------------------------------------------------------- the microkernel */

/* out[t][0..32) (masked by m0, m1) = tile @ input row inputs[t], for t < T, 32 values at a time
 * (8 k-steps); FOLDED: one scale per 256 values (Q2_K), else one per 32; CORR: the sums start
 * from corr; SUB: values per minimum (0: none). */
VNNI static INLINE void pass(const Tile *tile, const GemmInput *in, const int64_t *inputs, float *const *outs,
                             __mmask16 m0, __mmask16 m1, const int T, const int FOLDED, const int CORR, const int SUB) {
    const __mmask16 masks[2] = {m0, m1};
    const int8_t *parts[TOKENS];
    for (int t = 0; t < T; t++) parts[t] = in->parts + 3 * inputs[t] * in->stride;
    for (int64_t b = 0, start = 0; start < in->cols; b++, start += 256) {
        int64_t stop = in->cols - start < 256 ? in->cols : start + 256;
        __m512 sums[2][TOKENS];
        __m512i acc[2][TOKENS][PARTS];
        for (int t = 0; t < T; t++) sums[0][t] = sums[1][t] = _mm512_setzero_ps();
        for (int64_t g0 = start; g0 < stop; g0 += 32) {
            int64_t g = g0 / 32;
            if (!FOLDED || g0 == start)
                for (int t = 0; t < T; t++)
                    for (int p = 0; p < PARTS; p++) {
                        acc[0][t][p] = CORR ? _mm512_set1_epi32(in->corr[(3 * inputs[t] + p) * in->groups + g])
                                            : _mm512_setzero_si512();
                        acc[1][t][p] = acc[0][t][p];
                    }
            const uint8_t *codes = tile->codes + g0 / 4 * 128;
#pragma GCC unroll 8
            for (int s = 0; s < 8; s++) {
                __m512i w0 = _mm512_load_si512(codes + 128 * s), w1 = _mm512_load_si512(codes + 128 * s + 64);
                for (int t = 0; t < T; t++)
                    for (int p = 0; p < PARTS; p++) {
                        int32_t four;
                        memcpy(&four, parts[t] + p * in->stride + g0 + 4 * s, 4);
                        __m512i a = _mm512_set1_epi32(four);
                        acc[0][t][p] = _mm512_dpbusd_epi32(acc[0][t][p], w0, a);
                        acc[1][t][p] = _mm512_dpbusd_epi32(acc[1][t][p], w1, a);
                    }
            }
            if (!FOLDED || g0 + 32 == stop) {
                const float *scale = tile->scales + 3 * (FOLDED ? b : g) * TILE_ROWS;
                for (int r = 0; r < 2; r++)
                    for (int t = 0; t < T; t++)
                        for (int p = 0; p < PARTS; p++)
                            sums[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][t][p]),
                                                         _mm512_load_ps(scale + p * TILE_ROWS + 16 * r), sums[r][t]);
            }
        }
        for (int t = 0; t < T; t++) {
            __m512 s = _mm512_set1_ps(in->scales[inputs[t] * in->blocks + b]);
            for (int r = 0; r < 2; r++)
                sums[r][t] = b == 0 ? _mm512_mul_ps(sums[r][t], s)
                                    : _mm512_fmadd_ps(sums[r][t], s, _mm512_maskz_loadu_ps(masks[r], outs[t] + 16 * r));
        }
        if (SUB) /* the minimums, for all the rows and inputs at once (independent sums) */
            for (int64_t j = start / SUB; j < stop / SUB; j++) {
                __m512 low = _mm512_load_ps(tile->mins + j * TILE_ROWS), high = _mm512_load_ps(tile->mins + j * TILE_ROWS + 16);
                for (int t = 0; t < T; t++) {
                    __m512 x_sum = _mm512_set1_ps(in->sums[inputs[t] * (in->cols / 16) + j]); /* row stride: GemmInput */
                    sums[0][t] = _mm512_fnmadd_ps(low, x_sum, sums[0][t]);
                    sums[1][t] = _mm512_fnmadd_ps(high, x_sum, sums[1][t]);
                }
            }
        for (int t = 0; t < T; t++)
            for (int r = 0; r < 2; r++) _mm512_mask_storeu_ps(outs[t] + 16 * r, masks[r], sums[r][t]);
    }
}

typedef void (*PassFn)(const Tile *, const GemmInput *, const int64_t *, float *const *, __mmask16, __mmask16, int);

/* One function per format family, specialised for 1, 2 or 3 input rows. */
#define PASS(name, FOLDED, CORR, SUB)                                                                            \
    VNNI static void name(const Tile *tile, const GemmInput *in, const int64_t *inputs, float *const *outs,      \
                          __mmask16 m0, __mmask16 m1, int count) {                                               \
        if (count == 3)                                                                                          \
            pass(tile, in, inputs, outs, m0, m1, 3, FOLDED, CORR, SUB);                                          \
        else if (count == 2)                                                                                     \
            pass(tile, in, inputs, outs, m0, m1, 2, FOLDED, CORR, SUB);                                          \
        else                                                                                                     \
            pass(tile, in, inputs, outs, m0, m1, 1, FOLDED, CORR, SUB);                                          \
    }
PASS(pass_offset, 0, 1, 0) /* Q8_0, IQ2_XXS, MXFP4 */
PASS(pass_q2_k, 1, 0, 16)
PASS(pass_q4_k, 0, 0, 32)

static PassFn pass_for(int kind) {
    return kind == Q2_K ? pass_q2_k : kind == Q4_K ? pass_q4_k : pass_offset;
}

/* ---------------------------------------------------------------- the product */

typedef struct {
    int64_t expert, first, last; /* pairs pair_order[first..last) of one expert */
} Slice;

typedef struct {
    const GemmFormat *format;
    PassFn pass;
    const uint8_t *w;
    int64_t expert_stride, row_stride, rows, cols, k, tiles;
    const GemmInput *in;
    const int64_t *pair_order;
    const Slice *slices;
    const float *x; /* the float path's inputs */
    int64_t x_stride;
    float *out;
    atomic_int failed; /* set by any thread that could not allocate its tile */
} Gemm;

VNNI static void gemm_item(void *context, int64_t item) {
    Gemm *g = context;
    const Slice *slice = &g->slices[item / g->tiles];
    int64_t first_row = item % g->tiles * TILE_ROWS;
    int64_t count = g->rows - first_row < TILE_ROWS ? g->rows - first_row : TILE_ROWS;
    Tile tile;
    if (tile_for(g->format, g->cols, &tile) != 0) {
        g->failed = 1;
        return;
    }
    decode_tile(g->format, g->w + slice->expert * g->expert_stride + first_row * g->row_stride, g->row_stride, count,
                g->rows - first_row, g->cols, &tile);
    __mmask16 m0 = count >= 16 ? 0xFFFF : (__mmask16)((1u << count) - 1);
    __mmask16 m1 = count >= 32 ? 0xFFFF : count <= 16 ? 0 : (__mmask16)((1u << (count - 16)) - 1);
    for (int64_t s = slice->first, n; s < slice->last; s += n) {
        int64_t left = slice->last - s;
        n = left == 4 ? 2 : left < TOKENS ? left : TOKENS; /* 4 = 2 + 2, not 3 + 1 */
        int64_t inputs[TOKENS];
        float *outs[TOKENS];
        for (int t = 0; t < n; t++) {
            int64_t pair = g->pair_order[s + t];
            inputs[t] = pair / g->k;
            outs[t] = g->out + pair * g->rows + first_row;
        }
        g->pass(&tile, g->in, inputs, outs, m0, m1, n);
    }
}

/* ---------------------------------------------------------------- F16 and BF16: a float32 GEMM */

/* F16 and BF16 weights are not integers: their tiles are decoded to float32 (exactly), laid out
 * (cols, 32) so that one register holds 16 rows of one column, and multiplied with each input
 * value broadcast, FLOATS input rows per pass (2 x 12 float32 sums). Same results as the
 * reference up to the order of the float32 sums. */
#define FLOATS 12

/* Rows [first, first + count) of an F16 or BF16 matrix (count ≤ 32) as float32 into tile (cols, 32). */
VNNI static void decode_float_tile(int kind, const uint8_t *w, int64_t row_stride, int64_t count, int64_t cols,
                                   float *tile) {
    for (int h = 0; h < 2; h++)
        for (int64_t start = 0; start < cols; start += 16) {
            int64_t length = cols - start < 16 ? cols - start : 16;
            __mmask16 valid = (__mmask16)((1u << length) - 1);
            __m512i regs[16];
            for (int r = 0; r < 16; r++) {
                if (16 * h + r >= count) {
                    regs[r] = _mm512_setzero_si512();
                    continue;
                }
                __m256i bits = _mm256_maskz_loadu_epi16(valid, w + (16 * h + r) * row_stride + 2 * start);
                regs[r] = kind == F16 ? _mm512_castps_si512(_mm512_cvtph_ps(bits))
                                      : _mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16);
            }
            transpose16(regs);
            for (int64_t j = 0; j < length; j++) _mm512_store_si512(tile + (start + j) * TILE_ROWS + 16 * h, regs[j]);
        }
}

/* outs[t][0..32) (masked) = tile (cols, 32) @ xs[t], for t < T. */
VNNI static INLINE void float_pass(const float *tile, int64_t cols, const float *const *xs, float *const *outs,
                                   __mmask16 m0, __mmask16 m1, const int T) {
    __m512 acc[2][FLOATS];
    for (int t = 0; t < T; t++) acc[0][t] = acc[1][t] = _mm512_setzero_ps();
#pragma GCC unroll 2
    for (int64_t j = 0; j < cols; j++) {
        __m512 w0 = _mm512_load_ps(tile + j * TILE_ROWS), w1 = _mm512_load_ps(tile + j * TILE_ROWS + 16);
        for (int t = 0; t < T; t++) {
            __m512 x = _mm512_set1_ps(xs[t][j]);
            acc[0][t] = _mm512_fmadd_ps(w0, x, acc[0][t]);
            acc[1][t] = _mm512_fmadd_ps(w1, x, acc[1][t]);
        }
    }
    for (int t = 0; t < T; t++) {
        _mm512_mask_storeu_ps(outs[t], m0, acc[0][t]);
        _mm512_mask_storeu_ps(outs[t] + 16, m1, acc[1][t]);
    }
}

VNNI static void float_pass_12(const float *tile, int64_t cols, const float *const *xs, float *const *outs,
                               __mmask16 m0, __mmask16 m1) {
    float_pass(tile, cols, xs, outs, m0, m1, 12);
}
VNNI static void float_pass_4(const float *tile, int64_t cols, const float *const *xs, float *const *outs,
                              __mmask16 m0, __mmask16 m1) {
    float_pass(tile, cols, xs, outs, m0, m1, 4);
}
VNNI static void float_pass_1(const float *tile, int64_t cols, const float *const *xs, float *const *outs,
                              __mmask16 m0, __mmask16 m1) {
    float_pass(tile, cols, xs, outs, m0, m1, 1);
}

VNNI static void float_item(void *context, int64_t item) {
    Gemm *g = context;
    const Slice *slice = &g->slices[item / g->tiles];
    int64_t first_row = item % g->tiles * TILE_ROWS;
    int64_t count = g->rows - first_row < TILE_ROWS ? g->rows - first_row : TILE_ROWS;
    float *tile = (float *)thread_tile_buffer(sizeof(float) * TILE_ROWS * (size_t)g->cols);
    if (tile == NULL) {
        g->failed = 1;
        return;
    }
    decode_float_tile(g->format->kind, g->w + slice->expert * g->expert_stride + first_row * g->row_stride,
                      g->row_stride, count, g->cols, tile);
    __mmask16 m0 = count >= 16 ? 0xFFFF : (__mmask16)((1u << count) - 1);
    __mmask16 m1 = count >= 32 ? 0xFFFF : count <= 16 ? 0 : (__mmask16)((1u << (count - 16)) - 1);
    for (int64_t s = slice->first, n; s < slice->last; s += n) {
        int64_t left = slice->last - s;
        n = left >= FLOATS ? FLOATS : left >= 4 ? 4 : 1;
        const float *xs[FLOATS];
        float *outs[FLOATS];
        for (int t = 0; t < n; t++) {
            int64_t pair = g->pair_order[s + t];
            xs[t] = g->x + pair / g->k * g->x_stride;
            outs[t] = g->out + pair * g->rows + first_row;
        }
        (n == FLOATS ? float_pass_12 : n == 4 ? float_pass_4 : float_pass_1)(tile, g->cols, xs, outs, m0, m1);
    }
}
#endif

/* gemm(kind, w, expert_stride, row_stride, rows, cols, x, n, x_stride, ids, k, experts, out,
 *      threads): as `matmul` (cpu_kernels.c), through the integer GEMM; pairs whose expert id is
 *      negative are skipped (their outputs left as they are). */
PyObject *gemm(PyObject *self, PyObject *args) {
    (void)self;
    int kind, threads;
    unsigned long long w, x, ids_address, out;
    long long expert_stride, row_stride, rows, cols, n, x_stride, k, experts;
    if (!PyArg_ParseTuple(args, "iKLLLLKLLKLLKi", &kind, &w, &expert_stride, &row_stride, &rows, &cols, &x, &n,
                          &x_stride, &ids_address, &k, &experts, &out, &threads))
        return NULL;
#ifdef HAVE_X86
    const GemmFormat *format = find_gemm_format(kind);
    if (format == NULL || !integer_products_in_use())
        return PyErr_Format(PyExc_ValueError, "no compiled GEMM for GGML type %d here", kind);
    if (cols % format->block != 0)
        return PyErr_Format(PyExc_ValueError, "%lld columns is not a whole number of blocks", cols);
    if (k < 1 || experts < 1 || n < 0 || rows < 0) return PyErr_Format(PyExc_ValueError, "bad product shape");
    int64_t pairs = n * k;
    const int64_t *ids = (const int64_t *)(uintptr_t)ids_address;
    GemmInput in = {NULL, NULL, NULL, NULL, cols, (cols + 255) / 256, cols / 32, cols + 64};
    int64_t *starts = malloc(sizeof(int64_t) * (size_t)(experts + 1));
    int64_t *pair_order = malloc(sizeof(int64_t) * (size_t)(pairs ? pairs : 1));
    Slice *slices = NULL;
    int floating = kind == F16 || kind == BF16; /* the inputs are used as they are */
    if (!floating) {
        in.parts = malloc((size_t)(3 * n * in.stride + 64));
        in.scales = malloc(sizeof(float) * (size_t)(n * in.blocks + 1));
    }
    if (format->offset) in.corr = malloc(sizeof(int32_t) * (size_t)(3 * n * in.groups + 1));
    if (format->sub) in.sums = malloc(sizeof(float) * (size_t)(n * (cols / 16) + 1));
    if (!starts || !pair_order || (!floating && (!in.parts || !in.scales)) || (format->offset && !in.corr) ||
        (format->sub && !in.sums)) {
        PyErr_NoMemory();
        goto done;
    }
    if (sort_pairs_by_expert(ids, pairs, experts, 1, starts, pair_order) != 0) goto done;
    /* Each expert's pairs in slices of as many input rows as the L3 cache holds well: a tile is
     * decoded once per slice (decoding it again for each L2-sized slice cost more than reading
     * the parts from L3: 265 against 158 GFLOP/s on a 4096 x 8192 Q8_0 matrix and 512 rows). */
    int64_t per_slice = SLICE_BYTES / (floating ? 4 * cols : 3 * in.stride) / TOKENS * TOKENS;
    if (per_slice < TOKENS) per_slice = TOKENS;
    int64_t slice_count = 0;
    for (int64_t e = 0; e < experts; e++) slice_count += (starts[e + 1] - starts[e] + per_slice - 1) / per_slice;
    slices = malloc(sizeof(Slice) * (size_t)(slice_count ? slice_count : 1));
    if (!slices) {
        PyErr_NoMemory();
        goto done;
    }
    slice_count = 0;
    for (int64_t e = 0; e < experts; e++)
        for (int64_t s = starts[e]; s < starts[e + 1]; s += per_slice)
            slices[slice_count++] = (Slice){e, s, s + per_slice < starts[e + 1] ? s + per_slice : starts[e + 1]};

    Rounding rounding = {format, (const float *)(uintptr_t)x, x_stride, &in};
    Gemm g = {format, pass_for(kind), (const uint8_t *)(uintptr_t)w, expert_stride, row_stride, rows, cols, k,
              (rows + TILE_ROWS - 1) / TILE_ROWS, &in, pair_order, slices, (const float *)(uintptr_t)x, x_stride,
              (float *)(uintptr_t)out, 0};
    Py_BEGIN_ALLOW_THREADS;
    if (n > 0 && !floating) parallel_for(round_item, &rounding, n, threads);
    if (rows > 0) parallel_for(floating ? float_item : gemm_item, &g, slice_count * g.tiles, threads);
    Py_END_ALLOW_THREADS;
    if (atomic_load(&g.failed)) PyErr_NoMemory();

done:
    free(starts);
    free(pair_order);
    free(slices);
    free(in.parts);
    free(in.scales);
    free(in.corr);
    free(in.sums);
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
#else
    (void)kind, (void)threads, (void)w, (void)x, (void)ids_address, (void)out, (void)expert_stride, (void)row_stride,
        (void)rows, (void)cols, (void)n, (void)x_stride, (void)k, (void)experts;
    return PyErr_Format(PyExc_ValueError, "no integer GEMM on this CPU");
#endif
}

PyObject *gemm_kinds(PyObject *self, PyObject *unused) {
    (void)self, (void)unused;
    PyObject *list = PyList_New(0);
#ifdef HAVE_X86
    for (size_t i = 0; list && integer_products_in_use() && i < sizeof(gemm_formats) / sizeof(gemm_formats[0]); i++) {
        PyObject *number = PyLong_FromLong(gemm_formats[i].kind);
        if (!number || PyList_Append(list, number) < 0) Py_CLEAR(list);
        Py_XDECREF(number);
    }
#endif
    return list;
}
