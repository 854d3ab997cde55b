/* Stochastic rounding to 2, 4 or 8 bits and its inverse, one pass per group of elements.
 *
 * The same storage as xconv/quantize.py's torch-op code, bit for bit (tests/test_xconv_quantize.py
 * compares them): that code makes about ten whole-tensor passes per stored tensor, the main cost
 * of SR storage in a CPU training step (results/bench/README.md, "Low-bit storage"); here each
 * group of (at most 64) elements is read once and its codes written packed. Built at first use by
 * xconv/_native.py and called through ctypes, which releases the GIL, so ranges of groups can run
 * on several threads.
 *
 * Layout: the input is fp32 [rows, n], contiguous; groups of G elements tile each row (gpr per
 * row), the last one padded with the row's last element; element p of the padded layout (group
 * p / G) takes 16-bit lane p % 4 of splitmix64 hash p / 4 of the key, as xconv/rng.py's uniform16.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Whole-function copies for AVX-512 and AVX2 machines, picked at load time: the build does not
 * depend on the machine it runs on. Built with -ffp-contract=off: every product and sum is rounded
 * on its own, as the torch code's separate ops round them. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

#define GMAX 64

static inline uint64_t mix64(uint64_t z) {
    z ^= z >> 30;
    z *= 0xBF58476D1CE4E5B9ULL;
    z ^= z >> 27;
    z *= 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static inline uint32_t float_bits(float v) { uint32_t u; memcpy(&u, &v, 4); return u; }
static inline float bits_float(uint32_t u) { float v; memcpy(&v, &u, 4); return v; }
static inline float bf16_float(uint16_t b) { return bits_float((uint32_t)b << 16); }

/* bfloat16 bits of v rounded towards -inf (down) or +inf where not exact: quantize.py's _round_bf16. */
static inline uint16_t bf16_directed(float v, int down) {
    if (isnan(v)) return 0x7FC0;
    uint32_t b = float_bits(v), cut = b & 0xFFFF0000u;
    int away = (b & 0xFFFFu) && (down ? v < 0 : v > 0) && isfinite(v);
    return (uint16_t)((away ? cut + 0x10000u : cut) >> 16);
}

static inline void min_max(const float *v, int64_t G, float *lo, float *hi) {
    float mn = v[0], mx = v[0];
    if (G % 8 == 0) { /* eight independent lanes: vectorised without reordering a float reduction */
        float mn8[8], mx8[8];
        for (int k = 0; k < 8; k++) mn8[k] = mx8[k] = v[k];
        for (int64_t e = 8; e < G; e += 8)
            for (int k = 0; k < 8; k++) {
                mn8[k] = v[e + k] < mn8[k] ? v[e + k] : mn8[k];
                mx8[k] = v[e + k] > mx8[k] ? v[e + k] : mx8[k];
            }
        for (int k = 0; k < 8; k++) {
            mn = mn8[k] < mn ? mn8[k] : mn;
            mx = mx8[k] > mx ? mx8[k] : mx;
        }
    } else {
        for (int64_t e = 1; e < G; e++) {
            mn = v[e] < mn ? v[e] : mn;
            mx = v[e] > mx ? v[e] : mx;
        }
    }
    int nan = 0; /* as torch's amin and amax: a NaN makes both NaN (and so the whole group) */
    for (int64_t e = 0; e < G; e++) nan |= v[e] != v[e];
    *lo = nan ? NAN : mn == 0 ? 0.0f : mn; /* zero extremes as +0, as quantize.py's _grid */
    *hi = nan ? NAN : mx == 0 ? 0.0f : mx;
}

/* Quantize groups [g0, g1): codes into packed (byte p / per, bits (p % per) * bits, per = 8 / bits),
 * offsets and steps as bfloat16 bits. Threads must split at groups whose first element starts a byte. */
CLONES
void xconv_sr_quantize(const float *x, int64_t n, int64_t G, int64_t gpr, int64_t g0, int64_t g1, int bits,
                       int64_t key, uint8_t *packed, uint16_t *lo_out, uint16_t *step_out) {
    const float levels = (float)((1 << bits) - 1);
    const float shift = 0.5f + 0x1p-17f; /* u = (k + 32768.5) / 2^16 for the int16 k: see quantize.py */
    const uint64_t gamma = 0x9E3779B97F4A7C15ULL;
    const int per = 8 / bits;
    float v[GMAX];
    uint8_t codes[GMAX];
    uint64_t hashes[GMAX / 4 + 2];
    int16_t lanes[4 * (GMAX / 4 + 2)];
    for (int64_t g = g0; g < g1; g++) {
        const float *row = x + (g / gpr) * n;
        int64_t start = (g % gpr) * G, m = start + G <= n ? G : n - start, p0 = g * G;
        memcpy(v, row + start, (size_t)m * sizeof(float));
        for (int64_t e = m; e < G; e++) v[e] = row[n - 1];
        float mn, mx;
        min_max(v, G, &mn, &mx);
        uint16_t lo16 = bf16_directed(mn, 1);
        float lo = bf16_float(lo16);
        uint16_t step16 = bf16_directed((mx - lo) / levels, 0);
        float step = bf16_float(step16);
        float inverse = step > 0 ? 1.0f / step : 0.0f;
        float offset = shift - lo * inverse;
        lo_out[g] = lo16;
        step_out[g] = step16;
        int64_t h0 = p0 >> 2, h1 = (p0 + G + 3) >> 2;
        for (int64_t h = h0; h < h1; h++) hashes[h - h0] = mix64(((uint64_t)(h + 1) ^ (uint64_t)key) * gamma);
        /* the int16 lanes in memory order, as torch's view of the int64 hashes */
        memcpy(lanes, hashes, (size_t)(h1 - h0) * sizeof(uint64_t));
        const int16_t *noise = lanes + (p0 & 3);
        for (int64_t e = 0; e < G; e++) {
            float t = v[e] * inverse + offset + (float)noise[e] * 0x1p-16f;
            t = t > 0 ? t : 0; /* written so that NaN becomes 0: converting NaN to an integer is undefined */
            t = t < levels ? t : levels;
            codes[e] = (uint8_t)(int32_t)t; /* t + u in [0, 2^b): truncation is the floor */
        }
        if (per == 1) {
            memcpy(packed + p0, codes, (size_t)G);
        } else if (p0 % per == 0 && G % per == 0) {
            uint8_t *out = packed + p0 / per;
            if (per == 2)
                for (int64_t e = 0; e < G / 2; e++) out[e] = codes[2 * e] | (uint8_t)(codes[2 * e + 1] << 4);
            else
                for (int64_t e = 0; e < G / 4; e++)
                    out[e] = codes[4 * e] | (uint8_t)(codes[4 * e + 1] << 2) | (uint8_t)(codes[4 * e + 2] << 4) |
                             (uint8_t)(codes[4 * e + 3] << 6);
        } else {
            for (int64_t e = 0; e < G; e++) {
                int64_t p = p0 + e;
                int shift_bits = (int)(p % per) * bits;
                packed[p / per] = shift_bits ? packed[p / per] | (uint8_t)(codes[e] << shift_bits) : codes[e];
            }
        }
    }
}

/* Dequantize groups [g0, g1) into out, fp32 [rows, n] (padding dropped). */
CLONES
void xconv_sr_dequantize(const uint8_t *packed, const uint16_t *lo_in, const uint16_t *step_in, int64_t n, int64_t G,
                         int64_t gpr, int64_t g0, int64_t g1, int bits, float *out) {
    const int per = 8 / bits, mask = (1 << bits) - 1;
    uint8_t codes[GMAX];
    for (int64_t g = g0; g < g1; g++) {
        int64_t start = (g % gpr) * G, m = start + G <= n ? G : n - start, p0 = g * G;
        if (per == 1) {
            memcpy(codes, packed + p0, (size_t)G);
        } else if (p0 % per == 0 && G % per == 0) {
            const uint8_t *in = packed + p0 / per;
            if (per == 2)
                for (int64_t e = 0; e < G / 2; e++) {
                    codes[2 * e] = in[e] & 15;
                    codes[2 * e + 1] = in[e] >> 4;
                }
            else
                for (int64_t e = 0; e < G / 4; e++) {
                    codes[4 * e] = in[e] & 3;
                    codes[4 * e + 1] = (in[e] >> 2) & 3;
                    codes[4 * e + 2] = (in[e] >> 4) & 3;
                    codes[4 * e + 3] = in[e] >> 6;
                }
        } else {
            for (int64_t e = 0; e < G; e++) codes[e] = (packed[(p0 + e) / per] >> (((p0 + e) % per) * bits)) & mask;
        }
        float lo = bf16_float(lo_in[g]), step = bf16_float(step_in[g]);
        float *o = out + (g / gpr) * n + start;
        for (int64_t e = 0; e < m; e++) o[e] = step * (float)codes[e] + lo; /* an exact product: 8 by 8 bits */
    }
}
