/*
 * fedgate HE kernels: Montgomery arithmetic and batch Paillier entry points.
 *
 * One source, two compilers:
 *   - CUDA (NVRTC through CuPy's RawModule, see ../gpu.py): every FG_ENTRY is an extern "C" __global__
 *     kernel, one thread per batch element;
 *   - plain C (cc -O2 -shared -fPIC -x c): every FG_ENTRY is a host function looping over the batch.
 *     CI builds it with gcc and checks its arithmetic against gmpy2 (tests/compute/test_kernels.py).
 *
 * Rules of this file:
 *   1. Numbers are fixed-width little-endian arrays of 32-bit limbs; nothing here allocates.
 *   2. No headers: NVRTC has no libc, so the integer types are spelled out below.
 *   3. FG_MAX_LIMBS (compile-time) bounds every local array; the widths actually used (nl, nh, ph) are
 *      run-time arguments <= FG_MAX_LIMBS. 128 limbs covers n^2 of a 2048-bit key.
 *   4. A "Montgomery context" for an odd modulus m of nl limbs is one u32 array:
 *        m[nl] | r2[nl] = R^2 mod m | r4[nl] = R^4 mod m | one[nl] = R mod m | minv[1] = -m^-1 mod 2^32
 *      with R = 2^(32*nl). Host code builds it (gpu.py: mont_context).
 *   5. Secret-key material only ever arrives as a context blob from the gateway's own process.
 */
#ifndef FG_MONTGOMERY_H
#define FG_MONTGOMERY_H

#ifndef FG_MAX_LIMBS
#define FG_MAX_LIMBS 128
#endif

typedef unsigned int fg_u32;
typedef unsigned long long fg_u64;

#ifdef __CUDACC__
#define FG_FN static __device__ __forceinline__
#define FG_ENTRY extern "C" __global__ void
#define FG_LOOP(count) \
    int i = (int)(blockIdx.x * blockDim.x + threadIdx.x); \
    if (i < (count))
#else
#define FG_FN static inline
#define FG_ENTRY void
#define FG_LOOP(count) for (int i = 0; i < (count); i++)
#endif

#define FG_CTX_M(ctx, nl) (ctx)
#define FG_CTX_R2(ctx, nl) ((ctx) + (nl))
#define FG_CTX_R4(ctx, nl) ((ctx) + 2 * (nl))
#define FG_CTX_ONE(ctx, nl) ((ctx) + 3 * (nl))
#define FG_CTX_MINV(ctx, nl) ((ctx)[4 * (nl)])
#define FG_CTX_SIZE(nl) (4 * (nl) + 1)

/* ---- limb helpers ------------------------------------------------------------------------- */
FG_FN void fg_copy(fg_u32 *r, const fg_u32 *a, int n) {
    for (int i = 0; i < n; i++) r[i] = a[i];
}

FG_FN void fg_zero(fg_u32 *r, int n) {
    for (int i = 0; i < n; i++) r[i] = 0;
}

/* -1, 0, 1 as a <, ==, > b */
FG_FN int fg_cmp(const fg_u32 *a, const fg_u32 *b, int n) {
    for (int i = n - 1; i >= 0; i--) {
        if (a[i] != b[i]) return a[i] < b[i] ? -1 : 1;
    }
    return 0;
}

/* r = a - b mod 2^(32n); returns the borrow */
FG_FN fg_u32 fg_sub(fg_u32 *r, const fg_u32 *a, const fg_u32 *b, int n) {
    fg_u64 borrow = 0;
    for (int i = 0; i < n; i++) {
        fg_u64 d = (fg_u64)a[i] - b[i] - borrow;
        r[i] = (fg_u32)d;
        borrow = (d >> 32) & 1;
    }
    return (fg_u32)borrow;
}

/* r = a + b mod 2^(32n); returns the carry */
FG_FN fg_u32 fg_add(fg_u32 *r, const fg_u32 *a, const fg_u32 *b, int n) {
    fg_u64 c = 0;
    for (int i = 0; i < n; i++) {
        c += (fg_u64)a[i] + b[i];
        r[i] = (fg_u32)c;
        c >>= 32;
    }
    return (fg_u32)c;
}

/* r[0 .. na+nb) = a[na] * b[nb] (schoolbook); r must not alias a or b */
FG_FN void fg_mul_full(fg_u32 *r, const fg_u32 *a, int na, const fg_u32 *b, int nb) {
    fg_zero(r, na + nb);
    for (int i = 0; i < nb; i++) {
        fg_u64 c = 0;
        for (int j = 0; j < na; j++) {
            c += (fg_u64)a[j] * b[i] + r[i + j];
            r[i + j] = (fg_u32)c;
            c >>= 32;
        }
        r[i + na] = (fg_u32)c;
    }
}

/* r[0 .. n) = a * b mod 2^(32n) */
FG_FN void fg_mul_lo(fg_u32 *r, const fg_u32 *a, const fg_u32 *b, int n) {
    fg_u32 t[FG_MAX_LIMBS];
    fg_zero(t, n);
    for (int i = 0; i < n; i++) {
        fg_u64 c = 0;
        for (int j = 0; i + j < n; j++) {
            c += (fg_u64)a[j] * b[i] + t[i + j];
            t[i + j] = (fg_u32)c;
            c >>= 32;
        }
    }
    fg_copy(r, t, n);
}

/* ---- Montgomery arithmetic ---------------------------------------------------------------- */

/* r = a * b * R^-1 mod m (CIOS). Needs a < m and b < R; r may alias a or b. */
FG_FN void fg_mont_mul(fg_u32 *r, const fg_u32 *a, const fg_u32 *b, const fg_u32 *m, fg_u32 minv, int nl) {
    fg_u32 t[FG_MAX_LIMBS + 2];
    fg_zero(t, nl + 2);
    for (int i = 0; i < nl; i++) {
        fg_u64 c = 0;
        fg_u32 bi = b[i];
        for (int j = 0; j < nl; j++) {
            c += (fg_u64)a[j] * bi + t[j];
            t[j] = (fg_u32)c;
            c >>= 32;
        }
        c += t[nl];
        t[nl] = (fg_u32)c;
        t[nl + 1] = (fg_u32)(c >> 32);
        fg_u32 u = t[0] * minv;
        c = ((fg_u64)u * m[0] + t[0]) >> 32;
        for (int j = 1; j < nl; j++) {
            c += (fg_u64)u * m[j] + t[j];
            t[j - 1] = (fg_u32)c;
            c >>= 32;
        }
        c += t[nl];
        t[nl - 1] = (fg_u32)c;
        t[nl] = t[nl + 1] + (fg_u32)(c >> 32);
    }
    if (t[nl] || fg_cmp(t, m, nl) >= 0) {
        fg_sub(r, t, m, nl);
    } else {
        fg_copy(r, t, nl);
    }
}

/* One REDC pass in place: t (2 nl + 1 limbs) becomes (t + U m) / R in t[nl .. 2 nl] (nl + 1 limbs). */
FG_FN void fg_redc_pass(fg_u32 *t, const fg_u32 *m, fg_u32 minv, int nl) {
    for (int i = 0; i < nl; i++) {
        fg_u32 u = t[i] * minv;
        fg_u64 c = 0;
        for (int j = 0; j < nl; j++) {
            c += (fg_u64)u * m[j] + t[i + j];
            t[i + j] = (fg_u32)c;
            c >>= 32;
        }
        for (int k = i + nl; c && k <= 2 * nl; k++) {
            c += t[k];
            t[k] = (fg_u32)c;
            c >>= 32;
        }
    }
}

/* r = T * R mod m (Montgomery form of T mod m) for any T of tl <= 2*nl limbs (T may exceed m).
   Two REDC passes bring any T < R^2 below m + 2 whatever the size of m against R (a single pass
   only guarantees < R + m, which can be many multiples of a short m); then one multiplication by
   R^4 mod m restores the factors: T R^-2 R^4 R^-1 = T R. */
FG_FN void fg_to_mont_wide(fg_u32 *r, const fg_u32 *T, int tl, const fg_u32 *ctx, int nl) {
    const fg_u32 *m = FG_CTX_M(ctx, nl);
    fg_u32 minv = FG_CTX_MINV(ctx, nl);
    fg_u32 t[2 * FG_MAX_LIMBS + 1];
    fg_zero(t, 2 * nl + 1);
    fg_copy(t, T, tl);
    fg_redc_pass(t, m, minv, nl); /* t[nl .. 2nl] < T / R + m < R + m */
    for (int i = 0; i <= nl; i++) t[i] = t[nl + i];
    for (int i = nl + 1; i <= 2 * nl; i++) t[i] = 0;
    fg_redc_pass(t, m, minv, nl); /* t[nl .. 2nl] < 2 + m */
    fg_u32 *hi = t + nl;
    if (hi[nl] || fg_cmp(hi, m, nl) >= 0) hi[nl] -= fg_sub(hi, hi, m, nl);
    fg_mont_mul(r, hi, FG_CTX_R4(ctx, nl), m, minv, nl);
}

/* r = x * R^-1 mod m: leaves Montgomery form (x < m) */
FG_FN void fg_from_mont(fg_u32 *r, const fg_u32 *x, const fg_u32 *ctx, int nl) {
    fg_u32 one[FG_MAX_LIMBS];
    fg_zero(one, nl);
    one[0] = 1;
    fg_mont_mul(r, x, one, FG_CTX_M(ctx, nl), FG_CTX_MINV(ctx, nl), nl);
}

/* r = base^exp in Montgomery form; base_m in Montgomery form; exp has el limbs; 4-bit fixed window,
   left to right (square four times, multiply by the window's table entry). */
FG_FN void fg_mont_pow(fg_u32 *r, const fg_u32 *base_m, const fg_u32 *exp, int el, const fg_u32 *ctx, int nl) {
    const fg_u32 *m = FG_CTX_M(ctx, nl);
    fg_u32 minv = FG_CTX_MINV(ctx, nl);
    fg_u32 tab[16][FG_MAX_LIMBS];
    fg_u32 acc[FG_MAX_LIMBS];
    fg_copy(tab[0], FG_CTX_ONE(ctx, nl), nl);
    fg_copy(tab[1], base_m, nl);
    for (int k = 2; k < 16; k++) fg_mont_mul(tab[k], tab[k - 1], base_m, m, minv, nl);
    fg_copy(acc, FG_CTX_ONE(ctx, nl), nl);
    int started = 0;
    for (int i = el * 8 - 1; i >= 0; i--) {
        fg_u32 d = (exp[i >> 3] >> ((i & 7) * 4)) & 15u;
        if (started) {
            for (int s = 0; s < 4; s++) fg_mont_mul(acc, acc, acc, m, minv, nl);
        }
        if (d) {
            fg_mont_mul(acc, acc, tab[d], m, minv, nl);
            started = 1;
        }
    }
    fg_copy(r, acc, nl);
}

/* ---- element operations --------------------------------------------------------------------- */

/* out = base^exp mod m; base of bl <= 2 nl limbs (any value), exp of el limbs, out of nl limbs */
FG_FN void fg_powm_elem(fg_u32 *out, const fg_u32 *base, int bl, const fg_u32 *exp, int el, const fg_u32 *ctx,
                        int nl) {
    fg_u32 x[FG_MAX_LIMBS];
    fg_to_mont_wide(x, base, bl, ctx, nl);
    fg_mont_pow(x, x, exp, el, ctx, nl);
    fg_from_mont(out, x, ctx, nl);
}

/* gm = 1 + msg * n (< n^2 when msg < n); msg and n have nh limbs, gm 2*nh */
FG_FN void fg_encode_elem(fg_u32 *gm, const fg_u32 *msg, const fg_u32 *n, int nh) {
    fg_u32 one[2 * FG_MAX_LIMBS];
    fg_mul_full(gm, msg, nh, n, nh);
    fg_zero(one, 2 * nh);
    one[0] = 1;
    fg_add(gm, gm, one, 2 * nh);
}

/* ---- batch entry points (kernels under CUDA, loops under C) ----------------------------------- */

/* out[i] (nl limbs) = base[i]^exp[i] mod m; base elements have bl <= 2 nl limbs, exponents el limbs;
   a stride of 0 lets all elements share one base or one exponent */
FG_ENTRY fg_powm(fg_u32 *out, const fg_u32 *base, int bl, int base_stride, const fg_u32 *exp, int exp_stride,
                 int el, const fg_u32 *ctx, int nl, int count) {
    FG_LOOP(count) { fg_powm_elem(out + i * nl, base + i * base_stride, bl, exp + i * exp_stride, el, ctx, nl); }
}

/* out[i] = a[i] * b[i] mod m */
FG_ENTRY fg_mulmod(fg_u32 *out, const fg_u32 *a, const fg_u32 *b, const fg_u32 *ctx, int nl, int count) {
    FG_LOOP(count) {
        fg_u32 x[FG_MAX_LIMBS];
        fg_to_mont_wide(x, a + i * nl, nl, ctx, nl);
        fg_mont_mul(out + i * nl, x, b + i * nl, FG_CTX_M(ctx, nl), FG_CTX_MINV(ctx, nl), nl);
    }
}

/* out[i] = 1 + msg[i] * n: the unobfuscated encryption */
FG_ENTRY fg_encode(fg_u32 *out, const fg_u32 *msg, const fg_u32 *n, int nh, int count) {
    FG_LOOP(count) { fg_encode_elem(out + i * 2 * nh, msg + i * nh, n, nh); }
}

/* Textbook / short-exponent encryption: out[i] = (1 + msg[i] n) * rbase[i]^rexp[i] mod n^2.
   ctx is the context of n^2 (nl = 2 nh limbs); n has nh limbs. */
FG_ENTRY fg_encrypt(fg_u32 *out, const fg_u32 *msg, const fg_u32 *rbase, int base_stride, const fg_u32 *rexp,
                    int exp_stride, int el, const fg_u32 *n, const fg_u32 *ctx, int nh, int count) {
    FG_LOOP(count) {
        int nl = 2 * nh;
        fg_u32 x[FG_MAX_LIMBS];
        fg_u32 gm[FG_MAX_LIMBS];
        fg_to_mont_wide(x, rbase + i * base_stride, nl, ctx, nl);
        fg_mont_pow(x, x, rexp + i * exp_stride, el, ctx, nl);
        fg_encode_elem(gm, msg + i * nh, n, nh);
        /* plain * Montgomery-form = plain product */
        fg_mont_mul(out + i * nl, gm, x, FG_CTX_M(ctx, nl), FG_CTX_MINV(ctx, nl), nl);
    }
}

/* DJN fixed-base encryption: r^n = hs^a from a table of Montgomery-form powers
   table[(w_i * 2^window + d) * nl] = hs^(d * 2^(window * w_i)) * R mod n^2, a has el limbs. */
FG_ENTRY fg_encrypt_fixed_base(fg_u32 *out, const fg_u32 *msg, const fg_u32 *a, int el, const fg_u32 *table,
                               int window, int nwin, const fg_u32 *n, const fg_u32 *ctx, int nh, int count) {
    FG_LOOP(count) {
        int nl = 2 * nh;
        const fg_u32 *m = FG_CTX_M(ctx, nl);
        fg_u32 minv = FG_CTX_MINV(ctx, nl);
        const fg_u32 *ai = a + i * el;
        fg_u32 acc[FG_MAX_LIMBS];
        fg_u32 gm[FG_MAX_LIMBS];
        fg_copy(acc, FG_CTX_ONE(ctx, nl), nl);
        fg_u32 mask = (1u << window) - 1u;
        for (int w = 0; w < nwin; w++) {
            int bit = w * window;
            int limb = bit >> 5, off = bit & 31;
            fg_u32 d = 0;
            if (limb < el) {
                d = ai[limb] >> off;
                if (off + window > 32 && limb + 1 < el) d |= ai[limb + 1] << (32 - off);
                d &= mask;
            }
            if (d) fg_mont_mul(acc, acc, table + ((fg_u64)w * (mask + 1u) + d) * nl, m, minv, nl);
        }
        fg_encode_elem(gm, msg + i * nh, n, nh);
        fg_mont_mul(out + i * nl, gm, acc, m, minv, nl);
    }
}

/* CRT decryption. key blob (ph = limbs of p and q, nh = limbs of n):
     ctx(p^2, nh) | ctx(q^2, nh) | ctx(p, ph) | ctx(q, ph) |
     p-1[ph] | q-1[ph] | p^-1 mod 2^(32 ph)[ph] | q^-1 mod 2^(32 ph)[ph] | hp[ph] | hq[ph] | p^-1 mod q[ph]
   out[i] (nh limbs) = m; c[i] has 2 nh limbs. */
FG_FN void fg_decrypt_half(fg_u32 *mp, const fg_u32 *c, const fg_u32 *ctx2, const fg_u32 *ctx1, const fg_u32 *pm1,
                           const fg_u32 *pinv, const fg_u32 *hp, int nh, int ph) {
    fg_u32 x[FG_MAX_LIMBS];
    fg_u32 one[FG_MAX_LIMBS];
    fg_to_mont_wide(x, c, 2 * nh, ctx2, nh);
    fg_mont_pow(x, x, pm1, ph, ctx2, nh);
    fg_from_mont(x, x, ctx2, nh); /* u = c^(p-1) mod p^2, u = 1 mod p */
    fg_zero(one, nh);
    one[0] = 1;
    fg_sub(x, x, one, nh);
    fg_mul_lo(x, x, pinv, ph); /* exact division (u-1)/p: the quotient is < p */
    /* mp = L * hp mod p = mont(mont(L, hp), R^2) */
    const fg_u32 *p = FG_CTX_M(ctx1, ph);
    fg_u32 minv = FG_CTX_MINV(ctx1, ph);
    fg_mont_mul(x, x, hp, p, minv, ph);
    fg_mont_mul(mp, x, FG_CTX_R2(ctx1, ph), p, minv, ph);
}

FG_ENTRY fg_decrypt(fg_u32 *out, const fg_u32 *c, const fg_u32 *key, int nh, int ph, int count) {
    FG_LOOP(count) {
        const fg_u32 *ctx_p2 = key;
        const fg_u32 *ctx_q2 = ctx_p2 + FG_CTX_SIZE(nh);
        const fg_u32 *ctx_p = ctx_q2 + FG_CTX_SIZE(nh);
        const fg_u32 *ctx_q = ctx_p + FG_CTX_SIZE(ph);
        const fg_u32 *pm1 = ctx_q + FG_CTX_SIZE(ph);
        const fg_u32 *qm1 = pm1 + ph;
        const fg_u32 *pinv = qm1 + ph;
        const fg_u32 *qinv = pinv + ph;
        const fg_u32 *hp = qinv + ph;
        const fg_u32 *hq = hp + ph;
        const fg_u32 *p_inv_q = hq + ph;
        const fg_u32 *ci = c + i * 2 * nh;
        fg_u32 mp[FG_MAX_LIMBS];
        fg_u32 mq[FG_MAX_LIMBS];
        fg_u32 h[FG_MAX_LIMBS];
        fg_u32 full[FG_MAX_LIMBS];
        fg_decrypt_half(mp, ci, ctx_p2, ctx_p, pm1, pinv, hp, nh, ph);
        fg_decrypt_half(mq, ci, ctx_q2, ctx_q, qm1, qinv, hq, nh, ph);
        /* m = mp + p * ((mq - mp) * p^-1 mod q); mp < p < q */
        const fg_u32 *q = FG_CTX_M(ctx_q, ph);
        fg_u32 qminv = FG_CTX_MINV(ctx_q, ph);
        if (fg_sub(h, mq, mp, ph)) fg_add(h, h, q, ph);
        fg_mont_mul(h, h, p_inv_q, q, qminv, ph);
        fg_mont_mul(h, h, FG_CTX_R2(ctx_q, ph), q, qminv, ph);
        fg_mul_full(full, FG_CTX_M(ctx_p, ph), ph, h, ph);
        fg_zero(mq, nh);
        fg_copy(mq, mp, ph);
        fg_add(out + i * nh, full, mq, nh);
    }
}

#endif /* FG_MONTGOMERY_H */
