/* Per-unit conservation laws in one pass over the parameters: values and the exact split.
 *
 * Built at run time by torch_conslaw/native.py with the machine's C compiler (OpenMP when the
 * compiler has it) and called through ctypes; see that module for the layout of the arguments.
 *
 * Each tracked tensor is read once, in its own dtype, in chunks of C elements; C divides the
 * run length of every reader, so a chunk lies in one row of a reader whose plan is (A, U, B)
 * with B > 1, and in U consecutive rows of a reader with B == 1. Each element is converted to
 * float64 (exact), the products (x*x; or a*a, b*(a-b), (a-b)*(a-b) for the split) are formed
 * in float64, and every reader of the tensor adds them to its rows: row and column sums of a
 * weight come from the same read. The work is cut into `parts` fixed ranges of elements, each
 * with its own accumulators, summed in part order at the end: the result depends on `parts`,
 * never on how many threads ran them, so it is the same bits on every thread and run.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

enum { TCL_F32 = 0, TCL_F64 = 1, TCL_BF16 = 2, TCL_F16 = 3 };

static inline double tcl_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return (double)f;
}

static inline double tcl_f16(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, u;
    if (exp == 0) {
        if (mant == 0) {
            u = sign;
        } else { /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while (!(mant & 0x400u)) {
                mant <<= 1;
                exp--;
            }
            u = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (mant << 13);
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return (double)f;
}

#define LOAD_F32(p, i) ((double)((const float *)(p))[i])
#define LOAD_F64(p, i) (((const double *)(p))[i])
#define LOAD_BF16(p, i) tcl_bf16(((const uint16_t *)(p))[i])
#define LOAD_F16(p, i) tcl_f16(((const uint16_t *)(p))[i])

/* The values ask for the cache lines PREFETCH_AHEAD bytes past chunk [i0, i0 + C) of p (ES
 * bytes an element) while the chunk is summed. Inside a training step θ has usually left the
 * caches (the forward and backward passes ran through them) and the hardware prefetcher stops
 * at every 4 KiB page: on the benchmark MLP, 1 thread, a 2-core EPYC VM, the values of the
 * first read after a step took 10-22 % less time (four A/B runs inside training steps). The
 * split reads two tensors and writes one; there the same prefetch cost 17-19 % more, so it
 * has none. The address is formed as an integer (it may lie past the tensor's end, where a
 * prefetch does not fault). Results do not change: only when the lines arrive. */
#define PREFETCH_AHEAD 4096
#if defined(__GNUC__) || defined(__clang__)
#define PREFETCH(p, i0, C, ES)                                                                    \
    for (int64_t pf = 0; pf < (C) * (ES); pf += 64)                                               \
        __builtin_prefetch((const void *)((uintptr_t)(p) + (uintptr_t)((i0) * (ES) + PREFETCH_AHEAD + pf)), 0, 3)
#else
#define PREFETCH(p, i0, C, ES) ((void)0)
#endif

/* chunks [c0, c1) of one tensor: readers r0..r1 (U, B, offset of their rows in acc). The first
 * reader with B == 1 (a column reader: one accumulator per element of the chunk) gets the
 * squares in the same loop that sums them for the readers with B > 1 (one row per chunk);
 * further B == 1 readers (rare) form them again. */
#define VALUES(NAME, LOAD, ES)                                                                        \
    static void NAME(const void *x, int64_t C, int64_t c0, int64_t c1, const int64_t *U,          \
                     const int64_t *B, const int64_t *off, int64_t r0, int64_t r1, double *acc) { \
        int64_t col = -1;                                                                         \
        for (int64_t r = r0; r < r1 && col < 0; r++)                                              \
            if (B[r] <= 1) col = r;                                                               \
        for (int64_t c = c0; c < c1; c++) {                                                       \
            const int64_t i0 = c * C;                                                             \
            PREFETCH(x, i0, C, ES);                                                               \
            double s = 0.0;                                                                       \
            if (col >= 0) {                                                                       \
                double *q = acc + off[col] + i0 % U[col];                                         \
                _Pragma("omp simd reduction(+:s)") for (int64_t j = 0; j < C; j++) {              \
                    const double v = LOAD(x, i0 + j), sq = v * v;                                 \
                    s += sq;                                                                      \
                    q[j] += sq;                                                                   \
                }                                                                                 \
            } else {                                                                              \
                _Pragma("omp simd reduction(+:s)") for (int64_t j = 0; j < C; j++) {              \
                    const double v = LOAD(x, i0 + j);                                             \
                    s += v * v;                                                                   \
                }                                                                                 \
            }                                                                                     \
            for (int64_t r = r0; r < r1; r++) {                                                   \
                if (B[r] > 1) {                                                                   \
                    acc[off[r] + (i0 / B[r]) % U[r]] += s;                                        \
                } else if (r != col) {                                                            \
                    double *q = acc + off[r] + i0 % U[r];                                         \
                    _Pragma("omp simd") for (int64_t j = 0; j < C; j++) {                         \
                        const double v = LOAD(x, i0 + j);                                         \
                        q[j] += v * v;                                                            \
                    }                                                                             \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
    }

/* the same for the split: rows 0, 1, 2 of acc (stride w) get a*a, b*(a-b), (a-b)*(a-b); with
 * `advance`, each chunk of a (ES bytes an element) is then copied over b: b becomes θ⁺ */
#define SPLIT(NAME, LOAD, ES)                                                                     \
    static void NAME(void *xb, const void *xa, int64_t C, int64_t c0, int64_t c1,                 \
                     const int64_t *U, const int64_t *B, const int64_t *off, int64_t r0,          \
                     int64_t r1, double *acc, int64_t w, int advance) {                           \
        int64_t col = -1;                                                                         \
        for (int64_t r = r0; r < r1 && col < 0; r++)                                              \
            if (B[r] <= 1) col = r;                                                               \
        for (int64_t c = c0; c < c1; c++) {                                                       \
            const int64_t i0 = c * C;                                                             \
            double s0 = 0.0, s1 = 0.0, s2 = 0.0;                                                  \
            if (col >= 0) {                                                                       \
                double *q = acc + off[col] + i0 % U[col];                                         \
                _Pragma("omp simd reduction(+:s0,s1,s2)") for (int64_t j = 0; j < C; j++) {       \
                    const double a = LOAD(xa, i0 + j), b = LOAD(xb, i0 + j), d = a - b;           \
                    const double p0 = a * a, p1 = b * d, p2 = d * d;                              \
                    s0 += p0;                                                                     \
                    s1 += p1;                                                                     \
                    s2 += p2;                                                                     \
                    q[j] += p0;                                                                   \
                    q[w + j] += p1;                                                               \
                    q[2 * w + j] += p2;                                                           \
                }                                                                                 \
            } else {                                                                              \
                _Pragma("omp simd reduction(+:s0,s1,s2)") for (int64_t j = 0; j < C; j++) {       \
                    const double a = LOAD(xa, i0 + j), b = LOAD(xb, i0 + j), d = a - b;           \
                    s0 += a * a;                                                                  \
                    s1 += b * d;                                                                  \
                    s2 += d * d;                                                                  \
                }                                                                                 \
            }                                                                                     \
            for (int64_t r = r0; r < r1; r++) {                                                   \
                if (B[r] > 1) {                                                                   \
                    const int64_t k = off[r] + (i0 / B[r]) % U[r];                                \
                    acc[k] += s0;                                                                 \
                    acc[w + k] += s1;                                                             \
                    acc[2 * w + k] += s2;                                                         \
                } else if (r != col) {                                                            \
                    double *q = acc + off[r] + i0 % U[r];                                         \
                    _Pragma("omp simd") for (int64_t j = 0; j < C; j++) {                         \
                        const double a = LOAD(xa, i0 + j), b = LOAD(xb, i0 + j), d = a - b;       \
                        q[j] += a * a;                                                            \
                        q[w + j] += b * d;                                                        \
                        q[2 * w + j] += d * d;                                                    \
                    }                                                                             \
                }                                                                                 \
            }                                                                                     \
            if (advance) memcpy((char *)xb + i0 * (ES), (const char *)xa + i0 * (ES), (size_t)(C * (ES))); \
        }                                                                                         \
    }

VALUES(values_f32, LOAD_F32, 4)
VALUES(values_f64, LOAD_F64, 8)
VALUES(values_bf16, LOAD_BF16, 2)
VALUES(values_f16, LOAD_F16, 2)
SPLIT(split_f32, LOAD_F32, 4)
SPLIT(split_f64, LOAD_F64, 8)
SPLIT(split_bf16, LOAD_BF16, 2)
SPLIT(split_f16, LOAD_F16, 2)

/* the chunks of tensor t (elements e0 .. e0 + n, chunk C) whose first element lies in [lo, hi) */
static void chunk_range(int64_t e0, int64_t n, int64_t C, int64_t lo, int64_t hi, int64_t *c0, int64_t *c1) {
    int64_t a = lo - e0, b = hi - e0, len = n / C;
    a = a <= 0 ? 0 : (a + C - 1) / C;
    b = b <= 0 ? 0 : (b + C - 1) / C;
    *c0 = a < len ? a : len;
    *c1 = b < len ? b : len;
}

/* The plan of a record, one int64 array: [tensors, width, parts, laws, groups, then at these
 * offsets from the start: n, C, rs, U, B, off, G]. Tensor t: numel n[t], chunk C[t], readers
 * rs[t] .. rs[t+1]. Reader r: plan rows U[r], run B[r], its rows at off[r] in an accumulator of
 * `width` doubles. G: per group [first law, laws, incoming readers, outgoing readers, their row
 * offsets...]; its law j = sum over incoming of acc[offset + j] - degree[group] * (the same over
 * outgoing). */
enum { P_NT, P_WIDTH, P_PARTS, P_LAWS, P_GROUPS, P_N, P_C, P_RS, P_U, P_B, P_OFF, P_G };

/* One record. rows = 1 (values; `before` unused) or 3 (split; with `advance`, `before` holds
 * θ⁺ afterwards). dtype[t]: the tensors' dtype codes. scratch: parts * rows * width doubles.
 * Writes row k of law l to out[k * laws + l] (row 1, the first order, times 2). Returns 0, or
 * 1 for an unknown dtype. */
int64_t tcl_laws(const int64_t *plan, const double *degree, int64_t rows, void *const *before,
                 const void *const *after, const int64_t *dtype, int64_t threads, double *scratch,
                 double *out, int64_t advance) {
    const int64_t nt = plan[P_NT], width = plan[P_WIDTH], parts = plan[P_PARTS], laws = plan[P_LAWS];
    const int64_t *n = plan + plan[P_N], *C = plan + plan[P_C], *rs = plan + plan[P_RS];
    const int64_t *U = plan + plan[P_U], *B = plan + plan[P_B], *off = plan + plan[P_OFF];
    for (int64_t t = 0; t < nt; t++)
        if (dtype[t] < TCL_F32 || dtype[t] > TCL_F16) return 1;
    int64_t total = 0;
    for (int64_t t = 0; t < nt; t++) total += n[t];
    const int64_t stride = rows * width;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t q = 0; q < parts; q++) {
        double *acc = scratch + q * stride;
        memset(acc, 0, (size_t)stride * sizeof(double));
        const int64_t lo = total * q / parts, hi = total * (q + 1) / parts;
        int64_t e0 = 0;
        for (int64_t t = 0; t < nt; t++) {
            int64_t c0, c1;
            chunk_range(e0, n[t], C[t], lo, hi, &c0, &c1);
            e0 += n[t];
            if (c0 >= c1) continue;
            const int64_t r0 = rs[t], r1 = rs[t + 1];
            if (rows == 1) {
                switch (dtype[t]) {
                    case TCL_F32: values_f32(after[t], C[t], c0, c1, U, B, off, r0, r1, acc); break;
                    case TCL_F64: values_f64(after[t], C[t], c0, c1, U, B, off, r0, r1, acc); break;
                    case TCL_BF16: values_bf16(after[t], C[t], c0, c1, U, B, off, r0, r1, acc); break;
                    default: values_f16(after[t], C[t], c0, c1, U, B, off, r0, r1, acc); break;
                }
            } else {
                switch (dtype[t]) {
                    case TCL_F32: split_f32(before[t], after[t], C[t], c0, c1, U, B, off, r0, r1, acc, width, (int)advance); break;
                    case TCL_F64: split_f64(before[t], after[t], C[t], c0, c1, U, B, off, r0, r1, acc, width, (int)advance); break;
                    case TCL_BF16: split_bf16(before[t], after[t], C[t], c0, c1, U, B, off, r0, r1, acc, width, (int)advance); break;
                    default: split_f16(before[t], after[t], C[t], c0, c1, U, B, off, r0, r1, acc, width, (int)advance); break;
                }
            }
        }
    }
    for (int64_t q = 1; q < parts; q++)
        for (int64_t i = 0; i < stride; i++) scratch[i] += scratch[q * stride + i];
    for (int64_t k = 0; k < rows; k++) {
        const double *acc = scratch + k * width;
        const double scale = k == 1 ? 2.0 : 1.0;
        const int64_t *g = plan + plan[P_G];
        for (int64_t i = 0; i < plan[P_GROUPS]; i++) {
            const int64_t first = g[0], count = g[1], n_in = g[2], n_out = g[3];
            const int64_t *starts = g + 4;
            for (int64_t j = 0; j < count; j++) {
                double inc = 0.0, outg = 0.0;
                for (int64_t r = 0; r < n_in; r++) inc += acc[starts[r] + j];
                for (int64_t r = n_in; r < n_in + n_out; r++) outg += acc[starts[r] + j];
                out[k * laws + first + j] = scale * (inc - degree[i] * outg);
            }
            g = starts + n_in + n_out;
        }
    }
    return 0;
}

/* The running maxima of a record's table ([rows, laws]): running = max(running, |table - base|),
 * 0 where invalid[l] (invalid may be NULL). Returns 1 and changes nothing when an entry of
 * |table - base| is not finite (the caller marks those laws invalid and folds again). */
int64_t tcl_fold(int64_t rows, int64_t laws, const double *table, const double *base, double *running,
                 const uint8_t *invalid) {
    for (int64_t i = 0; i < rows * laws; i++) {
        const double d = table[i] - base[i];
        if (!(d - d == 0.0) && !(invalid && invalid[i % laws])) return 1;
    }
    for (int64_t i = 0; i < rows * laws; i++) {
        const double d = (invalid && invalid[i % laws]) ? 0.0 : fabs(table[i] - base[i]);
        if (d > running[i]) running[i] = d;
    }
    return 0;
}
