/* What the two C files of the compiled kernels share: `cpu_kernels.c` (the module, the direct
 * products, the thread pool, the inputs' integer parts) and `cpu_gemm.c` (the integer GEMM). */
#ifndef DWARFSTAR_CPU_SHARED_H
#define DWARFSTAR_CPU_SHARED_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#define HAVE_X86 1
#endif

/* GGML type numbers (gguf.GGMLQuantizationType). */
enum { F16 = 1, Q8_0 = 8, Q2_K = 10, Q4_K = 12, IQ2_XXS = 16, BF16 = 30, MXFP4 = 39 };

/* MXFP4's e2m1 values doubled (integers; bit 3 of the code the sign) and its scale halved to
 * match: 2^(e - 128) from the block's e8m0 byte e, built from its float32 bits (a subnormal for
 * e < 2), exactly as formats.mxfp4. Each value is then one exact product (or an infinity: e > 252
 * with the largest codes). */
static const int8_t mxfp4_doubled[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

static inline float mxfp4_half_scale(uint8_t e) {
    uint32_t bits = e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return scale;
}

/* ggml's kgrid_2bit_256: IQ2_XXS's 256 grid points, 2 bits per value (standing for 8, 25, 43). */
extern const uint16_t iq2_xxs_grid_codes[256];

/* IQ2_XXS's constant vectors (cpu_kernels.c, build_int_tables). */
extern uint8_t iq2_magnitudes[64]; /* index & 3 -> 8, 25, 43, 0 */
extern uint8_t iq2_signs[128];     /* 7 sign bits + parity: bit t set = value t negative */

/* Q4_K's 6-bit scale and min of group j from its 12 packed bytes. */
static inline void q4_k_scale_min(const uint8_t *packed, int j, int *scale, int *minimum) {
    if (j < 4) {
        *scale = packed[j] & 63;
        *minimum = packed[j + 4] & 63;
    } else {
        *scale = (packed[j + 4] & 0xF) | ((packed[j - 4] >> 6) << 4);
        *minimum = (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4);
    }
}

/* All eight of them at once, four at a time: bytes 0-7 of *scales and *minimums are
 * q4_k_scale_min's for j = 0..7. */
static inline void q4_k_scales_mins(const uint8_t *packed, uint64_t *scales, uint64_t *minimums) {
    uint32_t p[3];
    memcpy(p, packed, 12);
    uint32_t scales_high = (p[2] & 0x0F0F0F0F) | ((p[0] >> 6) & 0x03030303) << 4;
    uint32_t mins_high = ((p[2] >> 4) & 0x0F0F0F0F) | ((p[1] >> 6) & 0x03030303) << 4;
    *scales = (uint64_t)(p[0] & 0x3F3F3F3F) | (uint64_t)scales_high << 32;
    *minimums = (uint64_t)(p[1] & 0x3F3F3F3F) | (uint64_t)mins_high << 32;
}

/* fn(context, i) for i in [0, items), on `threads` threads including the caller. */
typedef void (*ItemFn)(void *context, int64_t item);
void parallel_for(ItemFn fn, void *context, int64_t items, int threads);

/* The pairs s < pairs (input row s / k, expert ids[s]; ids NULL: all expert 0) in order of
 * expert, stably (a counting sort): expert e's at pair_order[starts[e]..starts[e + 1]) (starts:
 * experts + 1). A negative expert is left out when skip_negative (its pair left to another
 * kernel), else out of range. Returns 0, or -1 with an IndexError set (with the GIL held). */
int sort_pairs_by_expert(const int64_t *ids, int64_t pairs, int64_t experts, int skip_negative, int64_t *starts,
                         int64_t *pair_order);

/* Whether the integer products (AVX-512 VNNI and VBMI) are in use. */
int integer_products_in_use(void);

/* An input row rounded to three int8 parts per value (x ≈ s (a0 + a1 / 254 + a2 / 254²)), one
 * scale s per ACT_BLOCK values; see "integer products" in cpu_kernels.c. `kind` sets their order
 * (MXFP4's pads a short last block with zeros to ACT_BLOCK values: the stride must leave room);
 * the GEMM asks for NATURAL_PARTS. */
#define ACT_BLOCK 256
#define NATURAL_PARTS (-1)
#ifdef HAVE_X86
/* In the natural order (AVX2); the AVX-512 one puts each block in its format's layout. */
void quantize_row_avx2(const float *x, int64_t cols, int64_t stride, int8_t *parts, float *scales, float *sum16);
void sums_of_16(const float *x, int64_t cols, float *sum16);
void quantize_row_avx512(int kind, const float *x, int64_t cols, int64_t stride, int8_t *parts, float *scales,
                         float *sum16);
#endif

/* The integer GEMM (cpu_gemm.c): same arguments as `matmul`. */
PyObject *gemm(PyObject *self, PyObject *args);
PyObject *gemm_kinds(PyObject *self, PyObject *unused);

#endif
