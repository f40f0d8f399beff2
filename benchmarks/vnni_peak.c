/* The ceiling of the integer GEMM (src/dwarfstar/quant/csrc/cpu_gemm.c) on this CPU: how many
 * 512-bit `vpdpbusd` (64 int8 products each) and float32 FMAs (16 each) one core retires per
 * second, twelve independent chains each, and `vpdpbusd` with a float flush (convert + FMA) every
 * 8, as the GEMM does once per 32-value scale group.
 *
 *     gcc -O2 -o /tmp/vnni_peak benchmarks/vnni_peak.c && /tmp/vnni_peak
 */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

#define ROUNDS 50000000L
#define TARGET __attribute__((target("avx512f,avx512bw,avx512vnni")))

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t); /* not the time another process had the core */
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Keep twelve registers live without a memory access. */
#define KEEP(v)                                                                                              \
    __asm__ volatile("" ::"v"(v[0]), "v"(v[1]), "v"(v[2]), "v"(v[3]), "v"(v[4]), "v"(v[5]), "v"(v[6]),     \
                     "v"(v[7]), "v"(v[8]), "v"(v[9]), "v"(v[10]), "v"(v[11]))

TARGET static double dpbusd_rate(int flush) {
    __m512i acc[12];
    __m512 sums[12];
    const __m512i w = _mm512_set1_epi8(3), x = _mm512_set1_epi8(5);
    const __m512 scale = _mm512_set1_ps(1e-9f);
    for (int i = 0; i < 12; i++) acc[i] = _mm512_set1_epi32(i), sums[i] = _mm512_setzero_ps();
    double start = seconds();
    for (long n = 0; n < ROUNDS / 8; n++) {
        for (int s = 0; s < 8; s++) {
#pragma GCC unroll 12
            for (int i = 0; i < 12; i++) acc[i] = _mm512_dpbusd_epi32(acc[i], w, x);
            KEEP(acc);
        }
        if (flush)
#pragma GCC unroll 12
            for (int i = 0; i < 12; i++) sums[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i]), scale, sums[i]);
        KEEP(sums);
    }
    double elapsed = seconds() - start;
    int check = 0;
    for (int i = 0; i < 12; i++) check += _mm512_reduce_add_epi32(acc[i]) + (int)_mm512_reduce_add_ps(sums[i]);
    if (check == 1) printf(" ");
    return 12.0 * ROUNDS / elapsed;
}

TARGET static double fma_rate(void) {
    __m512 acc[12];
    const __m512 w = _mm512_set1_ps(1.0001f), x = _mm512_set1_ps(0.9999f);
    for (int i = 0; i < 12; i++) acc[i] = _mm512_set1_ps((float)i);
    double start = seconds();
    for (long n = 0; n < ROUNDS; n++) {
#pragma GCC unroll 12
        for (int i = 0; i < 12; i++) acc[i] = _mm512_fmadd_ps(acc[i], w, x);
        KEEP(acc);
    }
    double elapsed = seconds() - start;
    float check = 0;
    for (int i = 0; i < 12; i++) check += _mm512_reduce_add_ps(acc[i]);
    if (check == 1) printf(" ");
    return 12.0 * ROUNDS / elapsed;
}

int main(void) {
    for (int repeat = 0; repeat < 3; repeat++) {
        double dot = dpbusd_rate(0), flushed = dpbusd_rate(1), fma = fma_rate();
        printf("vpdpbusd: %.2f G/s = %.0f G int8 products/s; with a flush per 8: %.2f G/s (%.0f%%); "
               "vfmadd231ps: %.2f G/s = %.0f GFLOP/s\n",
               dot / 1e9, 64 * dot / 1e9, flushed / 1e9, 100 * flushed / dot, fma / 1e9, 32 * fma / 1e9);
    }
    return 0;
}
