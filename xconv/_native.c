/* xconv's C kernels: stochastic rounding to 2, 4 or 8 bits and its inverse, one pass per group of
 * elements; the 1-bit (leaky) ReLU's mask and masked gradient, one pass each.
 *
 * The same bits as the torch-op code they replace (xconv/quantize.py, xconv/_bits.py; the tests
 * compare them): that code makes several whole-tensor passes (about ten per SR-stored tensor, the
 * main cost of SR storage in a CPU training step: results/bench/README.md, "Low-bit storage").
 * Built at first use by xconv/_native.py and called through ctypes, which releases the GIL, so
 * ranges of groups (mask bytes) can run on several threads.
 *
 * SR layout: the input is fp32 [rows, n], contiguous; groups of G elements tile each row (gpr per
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

/* Helpers are inlined into each copy: one called from a copy would run the baseline build. */
#define INLINE static inline __attribute__((always_inline))

#define GMAX 64

typedef float v4sf __attribute__((vector_size(16)));
typedef int32_t v4si __attribute__((vector_size(16)));

INLINE uint64_t mix64(uint64_t z) {
    z ^= z >> 30;
    z *= 0xBF58476D1CE4E5B9ULL;
    z ^= z >> 27;
    z *= 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* Hash i (from 0) of stream key: xconv/rng.py's random_bits, the noise of every SR kernel. */
INLINE uint64_t stream_hash(int64_t i, uint64_t key) {
    return mix64(((uint64_t)(i + 1) ^ key) * 0x9E3779B97F4A7C15ULL);
}

INLINE uint32_t float_bits(float v) { uint32_t u; memcpy(&u, &v, 4); return u; }
INLINE float bits_float(uint32_t u) { float v; memcpy(&v, &u, 4); return v; }
INLINE float bf16_float(uint16_t b) { return bits_float((uint32_t)b << 16); }

/* bfloat16 bits of v rounded towards -inf (down) or +inf where not exact: quantize.py's _round_bf16. */
INLINE uint16_t bf16_directed(float v, int down) {
    if (isnan(v)) return 0x7FC0;
    uint32_t b = float_bits(v), cut = b & 0xFFFF0000u;
    int away = (b & 0xFFFFu) && (down ? v < 0 : v > 0) && isfinite(v);
    return (uint16_t)((away ? cut + 0x10000u : cut) >> 16);
}

/* a where the lane of mask (a vector comparison: all ones or zero) is set, else b */
INLINE v4sf blend(v4si mask, v4sf a, v4sf b) { return (v4sf)(((v4si)a & mask) | ((v4si)b & ~mask)); }

INLINE void min_max(const float *v, int64_t G, float *lo, float *hi) {
    float mn = v[0], mx = v[0];
    if (G % 8 == 0) { /* eight lanes in two vectors (GCC's vector types: a loop of scalars did not vectorise) */
        v4sf lo4[2], hi4[2], w;
        memcpy(lo4, v, sizeof lo4);
        memcpy(hi4, v, sizeof hi4);
        for (int64_t e = 8; e < G; e += 8)
            for (int j = 0; j < 2; j++) {
                memcpy(&w, v + e + 4 * j, sizeof w);
                lo4[j] = blend(w < lo4[j], w, lo4[j]);
                hi4[j] = blend(w > hi4[j], w, hi4[j]);
            }
        for (int k = 0; k < 8; k++) {
            mn = lo4[k / 4][k % 4] < mn ? lo4[k / 4][k % 4] : mn;
            mx = hi4[k / 4][k % 4] > mx ? hi4[k / 4][k % 4] : mx;
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

/* The bfloat16 grid of a group with extremes mn, mx: its offset and step bits, and the inverse step
 * and offset that map an element onto it. */
INLINE void grid(float mn, float mx, float levels, float shift, uint16_t *lo_out, uint16_t *step_out,
                 float *inverse, float *offset) {
    uint16_t lo16 = bf16_directed(mn, 1);
    float lo = bf16_float(lo16);
    uint16_t step16 = bf16_directed((mx - lo) / levels, 0);
    float step = bf16_float(step16);
    *inverse = step > 0 ? 1.0f / step : 0.0f;
    *offset = shift - lo * *inverse;
    *lo_out = lo16;
    *step_out = step16;
}

/* The G codes of elements v (element p0 first) with their noise, packed into packed. */
INLINE void codes_packed(const float *v, int64_t G, int64_t p0, float inverse, float offset, float levels,
                         uint64_t key, int bits, uint8_t *packed) {
    const int per = 8 / bits;
    uint8_t codes[GMAX];
    uint64_t hashes[GMAX / 4 + 2];
    int16_t lanes[4 * (GMAX / 4 + 2)];
    int64_t h0 = p0 >> 2, count = ((p0 & 3) + G + 3) >> 2;
    for (int64_t h = 0; h < count; h++) hashes[h] = stream_hash(h0 + h, key);
    /* the int16 lanes in memory order, as torch's view of the int64 hashes */
    memcpy(lanes, hashes, (size_t)count * sizeof(uint64_t));
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
        /* the codes of one byte read as one little-endian word: shifts move code j to bits j * bits
         * of the low byte (as xconv/_bits.py's pack_codes), which vectorises where byte gathers did not */
        uint8_t *out = packed + p0 / per;
        if (per == 2) {
            uint16_t words[GMAX / 2];
            memcpy(words, codes, (size_t)G);
            for (int64_t e = 0; e < G / 2; e++) out[e] = (uint8_t)(words[e] | words[e] >> 4);
        } else {
            uint32_t words[GMAX / 4];
            memcpy(words, codes, (size_t)G);
            for (int64_t e = 0; e < G / 4; e++)
                out[e] = (uint8_t)(words[e] | words[e] >> 6 | words[e] >> 12 | words[e] >> 18);
        }
    } else {
        for (int64_t e = 0; e < G; e++) {
            int64_t p = p0 + e;
            int shift_bits = (int)(p % per) * bits;
            packed[p / per] = shift_bits ? packed[p / per] | (uint8_t)(codes[e] << shift_bits) : codes[e];
        }
    }
}

/* Groups [g0, g0 + nb) of GMAX elements each, rows a multiple of GMAX long (most feature maps): each
 * group's extremes and grid form a latency chain, which the nb independent groups overlap when computed
 * a phase at a time; the constant group size lets every loop compile to whole vectors. */
#define BLOCK 16
INLINE void quantize_whole_groups(const float *x, int64_t n, int64_t gpr, int64_t g0, int nb, int bits, float levels,
                                  float shift, uint64_t key, uint8_t *packed, uint16_t *lo_out, uint16_t *step_out) {
    float mn[BLOCK], mx[BLOCK], inverse[BLOCK], offset[BLOCK];
    const float *v[BLOCK];
    for (int b = 0; b < nb; b++) {
        v[b] = x + ((g0 + b) / gpr) * n + ((g0 + b) % gpr) * GMAX;
        min_max(v[b], GMAX, &mn[b], &mx[b]);
    }
    for (int b = 0; b < nb; b++)
        grid(mn[b], mx[b], levels, shift, &lo_out[g0 + b], &step_out[g0 + b], &inverse[b], &offset[b]);
    for (int b = 0; b < nb; b++)
        codes_packed(v[b], GMAX, (g0 + b) * GMAX, inverse[b], offset[b], levels, key, bits, packed);
}

/* Quantize groups [g0, g1): codes into packed (byte p / per, bits (p % per) * bits, per = 8 / bits),
 * offsets and steps as bfloat16 bits. Threads must split at groups whose first element starts a byte. */
CLONES
void xconv_sr_quantize(const float *x, int64_t n, int64_t G, int64_t gpr, int64_t g0, int64_t g1, int bits,
                       int64_t key, uint8_t *packed, uint16_t *lo_out, uint16_t *step_out) {
    const float levels = (float)((1 << bits) - 1);
    const float shift = 0.5f + 0x1p-17f; /* u = (k + 32768.5) / 2^16 for the int16 k: see quantize.py */
    if (G == GMAX && n % GMAX == 0) {
        for (int64_t g = g0; g < g1; g += BLOCK)
            quantize_whole_groups(x, n, gpr, g, (int)(g1 - g < BLOCK ? g1 - g : BLOCK), bits, levels, shift,
                                  (uint64_t)key, packed, lo_out, step_out);
        return;
    }
    float v[GMAX];
    for (int64_t g = g0; g < g1; g++) {
        const float *row = x + (g / gpr) * n;
        int64_t start = (g % gpr) * G, m = start + G <= n ? G : n - start;
        memcpy(v, row + start, (size_t)m * sizeof(float));
        for (int64_t e = m; e < G; e++) v[e] = row[n - 1];
        float mn, mx, inverse, offset;
        min_max(v, G, &mn, &mx);
        grid(mn, mx, levels, shift, &lo_out[g], &step_out[g], &inverse, &offset);
        codes_packed(v, G, g * G, inverse, offset, levels, (uint64_t)key, bits, packed);
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
            if (per == 2) {
                for (int64_t e = 0; e < G / 2; e++) {
                    codes[2 * e] = in[e] & 15;
                    codes[2 * e + 1] = in[e] >> 4;
                }
            } else { /* as the packing, by words (faster here; not for 4 bits): code j to byte j of a word */
                uint32_t words[GMAX / 4];
                for (int64_t e = 0; e < G / 4; e++) {
                    uint32_t byte = in[e];
                    words[e] = (byte | byte << 6 | byte << 12 | byte << 18) & 0x03030303u;
                }
                memcpy(codes, words, (size_t)G);
            }
        } else {
            for (int64_t e = 0; e < G; e++) codes[e] = (packed[(p0 + e) / per] >> (((p0 + e) % per) * bits)) & mask;
        }
        float lo = bf16_float(lo_in[g]), step = bf16_float(step_in[g]);
        float *o = out + (g / gpr) * n + start;
        for (int64_t e = 0; e < m; e++) o[e] = step * (float)codes[e] + lo; /* an exact product: 8 by 8 bits */
    }
}

/* bfloat16 bits of fp32 bits plus noise (an int16 lane k of a hash): k + 2^15 added to the bits, which
 * are then cut to their high 16 (a NaN sum becomes 0x7FC0), as quantize.py's stochastic_round_bf16. */
INLINE uint16_t bf16_noisy(float v, uint64_t hash, int k) {
    uint32_t sum = (float_bits(v) + (uint32_t)((int32_t)(int16_t)(uint16_t)(hash >> (16 * k)) + 32768)) & 0xFFFF0000u;
    return (sum & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0 : (uint16_t)(sum >> 16);
}

/* x (fp32 [n], contiguous) stochastically rounded to bfloat16, elements [4 h0, min(4 h1, n)): element p
 * takes 16-bit lane p % 4 of splitmix64 hash p / 4 of the key, as the SR codes' noise. */
CLONES
void xconv_sr_bf16(const float *x, int64_t n, int64_t h0, int64_t h1, int64_t key, uint16_t *out) {
    int64_t whole = n / 4 < h1 ? n / 4 : h1;
    for (int64_t h = h0; h < whole; h++) {
        uint64_t hash = stream_hash(h, (uint64_t)key);
        for (int k = 0; k < 4; k++) out[4 * h + k] = bf16_noisy(x[4 * h + k], hash, k);
    }
    if (whole < h1) { /* the last, partial hash */
        uint64_t hash = stream_hash(whole, (uint64_t)key);
        for (int64_t p = 4 * whole; p < n; p++) out[p] = bf16_noisy(x[p], hash, (int)(p - 4 * whole));
    }
}

/* Whether the 1-bit (leaky) ReLU passes x's gradient: x > 0 (leaky), else !(x <= 0) (a NaN passes). */
INLINE uint8_t passes(float x, int leaky) { return leaky ? x > 0 : !(x <= 0); }

/* The 1-bit (leaky) ReLU's mask of elements [8 b0, min(8 b1, n)) of x, fp32 [n] contiguous: bit i % 8
 * of byte i / 8 is passes(x[i]), as xconv/_bits.py's sign_bits. */
CLONES
void xconv_sign_bits(const float *x, int64_t n, int64_t b0, int64_t b1, int leaky, uint8_t *packed) {
    int64_t whole = n / 8 < b1 ? n / 8 : b1;
    for (int64_t b = b0; b < whole; b++) {
        uint8_t set[8];
        uint64_t word;
        for (int k = 0; k < 8; k++) set[k] = passes(x[8 * b + k], leaky);
        /* the eight 0/1 bytes as one little-endian word: the product gathers byte k into bit 56 + k,
         * where no two partial products meet (a loop of shifts does not vectorise) */
        memcpy(&word, set, 8);
        packed[b] = (uint8_t)((word * 0x0102040810204080ULL) >> 56);
    }
    if (whole < b1) { /* the last, partial byte */
        uint8_t byte = 0;
        for (int64_t i = 8 * whole; i < n; i++) byte |= (uint8_t)(passes(x[i], leaky) << (i & 7));
        packed[whole] = byte;
    }
}

/* grad where bit is 1, else 0 (relu) or slope * grad: selected by bit masks, integer ops that
 * vectorise (a conditional per lane does not); the values of aten's threshold_backward and
 * leaky_relu_backward, which passes grad on as a product (one, here: a signalling NaN comes out
 * quiet, a denormal flushed where torch.set_flush_denormal is on). */
INLINE float masked(float grad, uint32_t bit, int relu, float slope, float one) {
    uint32_t keep = -bit, other = relu ? 0 : float_bits(grad * slope);
    uint32_t passed = relu ? float_bits(grad) : float_bits(grad * one);
    return bits_float((passed & keep) | (other & ~keep));
}

/* The (leaky) ReLU's input gradient of elements [8 b0, min(8 b1, n)) from grad and the xconv_sign_bits
 * mask, into out (fp32 [n], contiguous). */
CLONES
void xconv_sign_bits_backward(const float *grad, const uint8_t *packed, int64_t n, int64_t b0, int64_t b1, int relu,
                              float slope, float *out) {
    static volatile float unit = 1.0f; /* read at run time: a product by a literal one would be folded away */
    const float one = unit;
    int64_t whole = n / 8 < b1 ? n / 8 : b1;
    for (int64_t b = b0; b < whole; b++)
        for (int k = 0; k < 8; k++)
            out[8 * b + k] = masked(grad[8 * b + k], (packed[b] >> k) & 1, relu, slope, one);
    for (int64_t i = 8 * whole; i < n && whole < b1; i++) /* the last, partial byte */
        out[i] = masked(grad[i], (packed[whole] >> (i & 7)) & 1, relu, slope, one);
}

/* First window position along a dimension (kernel k, dilation d) at or after start that lies in [0, size),
 * as aten's `while (start < 0) start += d`: k where there is none (a window wholly in padding). */
INLINE int64_t first_inside(int64_t start, int64_t k, int64_t d, int64_t size) {
    int64_t first = start < 0 ? (-start + d - 1) / d : 0;
    return first < k && start + first * d < size ? first : k;
}

typedef float v8sf __attribute__((vector_size(32)));
typedef int32_t v8si __attribute__((vector_size(32)));

/* p[0], p[s], .., p[7 s], reading no further than p[7 s] */
INLINE v8sf load_strided(const float *p, int64_t s) {
    v8sf v, w;
    if (s == 1) {
        memcpy(&v, p, sizeof v);
    } else if (s == 2) { /* p[0..7] and p[7..14], interleaved lanes picked */
        memcpy(&v, p, sizeof v);
        memcpy(&w, p + 7, sizeof w);
        v = __builtin_shuffle(v, w, (v8si){0, 2, 4, 6, 9, 11, 13, 15});
    } else {
        for (int i = 0; i < 8; i++) v[i] = p[i * s];
    }
    return v;
}

/* The max of one window and its winner's code: aten's cpu_max_pool, which starts from -inf at the
 * window's first position inside the plane (kept where nothing beats it) and scans the window row by
 * row, a value replacing the max where greater, or NaN. top, left: the window's first position. */
INLINE void pool_window(const float *plane, int64_t H, int64_t W, int64_t top, int64_t left, int64_t kh, int64_t kw,
                        int64_t dh, int64_t dw, float *y, uint8_t *code) {
    int64_t ki0 = first_inside(top, kh, dh, H), kj0 = first_inside(left, kw, dw, W);
    float best = -INFINITY;
    uint8_t winner = (uint8_t)(ki0 * kw + kj0);
    for (int64_t ki = ki0; ki < kh && top + ki * dh < H; ki++)
        for (int64_t kj = kj0; kj < kw && left + kj * dw < W; kj++) {
            float v = plane[(top + ki * dh) * W + left + kj * dw];
            if (v > best || v != v) {
                best = v;
                winner = (uint8_t)(ki * kw + kj);
            }
        }
    *y = best;
    *code = winner;
}

/* pool_window for the eight outputs whose windows start at left, left + sw, .., all of whose columns lie
 * inside the plane: the scan in vector lanes. */
INLINE void pool_windows8(const float *plane, int64_t H, int64_t W, int64_t top, int64_t left, int64_t kh,
                          int64_t kw, int64_t sw, int64_t dh, int64_t dw, float *y, uint8_t *code) {
    int64_t ki0 = first_inside(top, kh, dh, H);
    v8sf best = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    v8si winner = (v8si){0, 0, 0, 0, 0, 0, 0, 0} + (int32_t)(ki0 * kw);
    for (int64_t ki = ki0; ki < kh && top + ki * dh < H; ki++)
        for (int64_t kj = 0; kj < kw; kj++) {
            v8sf v = load_strided(plane + (top + ki * dh) * W + left + kj * dw, sw);
            v8si take = (v > best) | (v != v);
            best = (v8sf)(((v8si)v & take) | ((v8si)best & ~take));
            winner = ((int32_t)(ki * kw + kj) & take) | (winner & ~take);
        }
    memcpy(y, &best, sizeof best);
    for (int i = 0; i < 8; i++) code[i] = (uint8_t)winner[i];
}

/* 2-d max pooling of planes [p0, p1) of x (fp32 [planes, H, W], contiguous) into y (fp32 [planes, OH, OW])
 * and, per output, its winner's window position ki * kw + kj (xconv/pooling.py's code) instead of aten's
 * int64 index: pool_window's values and winners. Every window must have a position in the plane. */
CLONES
void xconv_max_pool2d(const float *x, int64_t H, int64_t W, int64_t p0, int64_t p1, int64_t OH, int64_t OW,
                      int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                      float *y, uint8_t *codes) {
    /* outputs [lo, hi) have every window column inside the plane */
    int64_t lo = 0, hi;
    while (lo < OW && lo * sw - pw < 0) lo++;
    for (hi = OW; hi > lo && (hi - 1) * sw - pw + (kw - 1) * dw >= W; hi--) {}
    for (int64_t p = p0; p < p1; p++) {
        const float *plane = x + p * H * W;
        for (int64_t oh = 0; oh < OH; oh++) {
            int64_t top = oh * sh - ph, o = (p * OH + oh) * OW, ow = 0;
            for (; ow < lo; ow++)
                pool_window(plane, H, W, top, ow * sw - pw, kh, kw, dh, dw, y + o + ow, codes + o + ow);
            for (int64_t next = ow; next < hi && hi - lo >= 8; next += 8) {
                ow = next + 8 <= hi ? next : hi - 8; /* the last eight overlap the previous: written again, the same */
                if (sw == 2) /* the common strides as constants, so their loads are vector loads */
                    pool_windows8(plane, H, W, top, ow * 2 - pw, kh, kw, 2, dh, dw, y + o + ow, codes + o + ow);
                else if (sw == 1)
                    pool_windows8(plane, H, W, top, ow - pw, kh, kw, 1, dh, dw, y + o + ow, codes + o + ow);
                else
                    pool_windows8(plane, H, W, top, ow * sw - pw, kh, kw, sw, dh, dw, y + o + ow, codes + o + ow);
                ow += 8;
            }
            for (; ow < OW; ow++)
                pool_window(plane, H, W, top, ow * sw - pw, kh, kw, dh, dw, y + o + ow, codes + o + ow);
        }
    }
}

/* Max pooling's input gradient for planes [p0, p1): grad_x (fp32 [planes, H, W]) zeroed, then each
 * output's gradient (grad_y, fp32 [planes, OH, OW]) added at its winner, rebuilt from its code, in output
 * order: aten's cpu_max_pool_backward's sums, in its order. */
CLONES
void xconv_max_pool2d_backward(const float *grad_y, const uint8_t *codes, int64_t H, int64_t W, int64_t p0,
                               int64_t p1, int64_t OH, int64_t OW, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                               int64_t ph, int64_t pw, int64_t dh, int64_t dw, float *grad_x) {
    int64_t drow[256] = {0}, dcol[256] = {0}; /* each code's winner relative to its window's start */
    for (int64_t c = 0; c < kh * kw && c < 256; c++) {
        drow[c] = (c / kw) * dh;
        dcol[c] = (c % kw) * dw;
    }
    memset(grad_x + p0 * H * W, 0, (size_t)((p1 - p0) * H * W) * sizeof(float));
    for (int64_t p = p0; p < p1; p++) {
        float *plane = grad_x + p * H * W;
        const float *g = grad_y + p * OH * OW;
        const uint8_t *code = codes + p * OH * OW;
        for (int64_t oh = 0; oh < OH; oh++)
            for (int64_t ow = 0; ow < OW; ow++) {
                int64_t o = oh * OW + ow;
                plane[(oh * sh - ph + drow[code[o]]) * W + ow * sw - pw + dcol[code[o]]] += g[o];
            }
    }
}

/* The calling thread's floating-point mode (SSE's MXCSR: flush-to-zero, denormals-are-zero, rounding),
 * and setting it: torch.set_flush_denormal sets it per thread, and xconv's pool threads take the
 * caller's before each kernel call, so their results are the caller's. Elsewhere no mode is passed
 * (torch sets flush-denormal on x86 only). */
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
unsigned xconv_fp_mode(void) { return _mm_getcsr(); }
void xconv_set_fp_mode(unsigned mode) { _mm_setcsr(mode); }
#else
unsigned xconv_fp_mode(void) { return 0; }
void xconv_set_fp_mode(unsigned mode) { (void)mode; }
#endif
