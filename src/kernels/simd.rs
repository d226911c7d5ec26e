//! Row kernels of the direct CPU paths, written so that their loops vectorise: a Cephes exp,
//! reductions in [`LANES`] accumulators, and [`vectorised!`], which compiles a kernel for
//! AVX-512 or AVX2 + FMA and picks one at run time.

/// Defines `$name` running the `#[inline(always)]` function `$body` compiled for AVX-512 or
/// AVX2 + FMA when the CPU has them, so that its loops vectorise.
macro_rules! vectorised {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $body:ident) => {
        $(#[$doc])*
        pub(super) fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                fn v4($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn v3($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                if is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F.
                    return unsafe { v4($($arg),*) };
                }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has AVX2 and FMA.
                    return unsafe { v3($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}
pub(super) use vectorised;

vectorised! {
    /// Unnormalised softmax of one row of scores over its first `visible` keys minus padded
    /// ones: `exp(x - max)` there, 0 everywhere else; returns their max and 1 / the sum of the
    /// exponentials (-inf and 0 when no key is visible).
    fn softmax_row(row: &mut [f32], visible: usize, padding: Option<&[bool]>) -> (f32, f32) = softmax_row_body
}

vectorised! {
    /// Softmax probabilities of one row of scores from its log-sum-exp `lse` (as
    /// [`softmax_row`] masks: keys from `visible` on and padded keys get 0), in place.
    fn probs_row(row: &mut [f32], visible: usize, padding: Option<&[bool]>, lse: f32) -> () = probs_row_body
}

vectorised! {
    /// The gradients of `silu(g) * u` given the output's gradient `d_out`.
    fn silu_mul_grad_slice(d_gate: &mut [f32], d_up: &mut [f32], d_out: &[f32], gate: &[f32], up: &[f32]) -> () = silu_mul_grad_body
}

vectorised! {
    /// RMSNorm of one row, `out = x w / rms(x)`; returns `1 / rms(x)`.
    fn rms_norm_row(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) -> f32 = rms_norm_body
}

vectorised! {
    /// The gradient of one row's RMSNorm input given its output's gradient and `1 / rms(x)`.
    fn rms_norm_grad_row(dx: &mut [f32], dy: &[f32], x: &[f32], w: &[f32], inv_rms: f32) -> () = rms_norm_grad_body
}

vectorised! {
    /// Rotary embedding (rotate-half layout) of rows of `d` elements, times `scale`; with
    /// `transpose`, its backward pass. See [`rope_body`].
    fn rope_rows(out: &mut [f32], x: &[f32], cos: &[f32], sin: &[f32], d: usize, scale: f32, transpose: bool) -> () = rope_body
}

vectorised! {
    fn logsumexp_row(row: &[f32]) -> f32 = logsumexp_row_body
}

vectorised! {
    fn silu_mul_slice(out: &mut [f32], gate: &[f32], up: &[f32]) -> () = silu_mul_body
}

vectorised! {
    /// Inverted-dropout factors of elements `first..first + out.len()` of one mask: `scale`
    /// where a counter-based hash of (seed, index) is below `threshold`, else 0. The same seed
    /// gives the same mask, so a backward pass regenerates its forward pass's mask.
    fn dropout_scales(out: &mut [f32], first: u32, seed: u64, threshold: u32, scale: f32) -> () = dropout_body
}

#[inline(always)]
fn softmax_row_body(row: &mut [f32], visible: usize, padding: Option<&[bool]>) -> (f32, f32) {
    let (live, hidden) = row.split_at_mut(visible);
    hidden.fill(0.0);
    if let Some(pad) = padding {
        for (x, &p) in live.iter_mut().zip(pad) {
            if p {
                *x = f32::NEG_INFINITY;
            }
        }
    }
    let max = lane_fold(live, f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        live.fill(0.0);
        return (max, 0.0);
    }
    let mut acc = [0f32; LANES];
    let mut chunks = live.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *x = exp(*x - max);
            *a += *x;
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for x in chunks.into_remainder() {
        *x = exp(*x - max);
        sum += *x;
    }
    (max, 1.0 / sum)
}

#[inline(always)]
fn probs_row_body(row: &mut [f32], visible: usize, padding: Option<&[bool]>, lse: f32) {
    let (live, hidden) = row.split_at_mut(visible);
    hidden.fill(0.0);
    if lse == f32::NEG_INFINITY {
        live.fill(0.0);
        return;
    }
    for x in live.iter_mut() {
        *x = exp(*x - lse);
    }
    if let Some(pad) = padding {
        for (x, &p) in live.iter_mut().zip(pad) {
            if p {
                *x = 0.0;
            }
        }
    }
}

#[inline(always)]
fn silu_mul_grad_body(
    d_gate: &mut [f32],
    d_up: &mut [f32],
    d_out: &[f32],
    gate: &[f32],
    up: &[f32],
) {
    let rows = d_gate
        .iter_mut()
        .zip(d_up.iter_mut())
        .zip(d_out)
        .zip(gate)
        .zip(up);
    for ((((dg, du), &d), &g), &u) in rows {
        let sig = 1.0 / (1.0 + exp(-g));
        *du = d * g * sig;
        *dg = d * u * sig * (1.0 + g * (1.0 - sig));
    }
}

#[inline(always)]
fn rms_norm_body(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) -> f32 {
    let mean = lane_sum(x, |v| v * v) / x.len() as f32;
    let inv = 1.0 / (mean + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(w) {
        *o = v * inv * w;
    }
    inv
}

/// d/dx of `x_k w_k r` with `r = 1 / rms(x)`: `r w_k dy_k - x_k r^3 sum_j(w_j dy_j x_j) / n`.
#[inline(always)]
fn rms_norm_grad_body(dx: &mut [f32], dy: &[f32], x: &[f32], w: &[f32], inv_rms: f32) {
    let sum = lane_sum3(dy, x, w, |d, x, w| w * d * x);
    let c = inv_rms * inv_rms * inv_rms * sum / x.len() as f32;
    for (((o, &d), &x), &w) in dx.iter_mut().zip(dy).zip(x).zip(w) {
        *o = inv_rms * w * d - x * c;
    }
}

/// Rows of `d` elements; `cos` and `sin` hold one row of `d` per row of `x`. Forward:
/// `y = (x cos + [-x2, x1] sin) scale`; transpose: `dx = (dy cos + [(dy sin)2, -(dy sin)1]) scale`.
#[inline(always)]
fn rope_body(
    out: &mut [f32],
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    d: usize,
    scale: f32,
    transpose: bool,
) {
    let half = d / 2;
    let rows = out.chunks_exact_mut(d).zip(x.chunks_exact(d));
    for ((o, x), (c, s)) in rows.zip(cos.chunks_exact(d).zip(sin.chunks_exact(d))) {
        let (o1, o2) = o.split_at_mut(half);
        let (x1, x2) = x.split_at(half);
        let (c1, c2) = c.split_at(half);
        let (s1, s2) = s.split_at(half);
        for i in 0..half {
            (o1[i], o2[i]) = if transpose {
                (
                    (x1[i] * c1[i] + x2[i] * s2[i]) * scale,
                    (x2[i] * c2[i] - x1[i] * s1[i]) * scale,
                )
            } else {
                (
                    (x1[i] * c1[i] - x2[i] * s1[i]) * scale,
                    (x2[i] * c2[i] + x1[i] * s2[i]) * scale,
                )
            };
        }
    }
}

#[inline(always)]
fn logsumexp_row_body(row: &[f32]) -> f32 {
    logsumexp_scaled(row, 1.0)
}

/// `log(sum(exp(row x scale)))` for `scale > 0`; inline it into a [`vectorised!`] kernel.
#[inline(always)]
pub(super) fn logsumexp_scaled(row: &[f32], scale: f32) -> f32 {
    let max = lane_fold(row, f32::NEG_INFINITY, f32::max) * scale;
    if max == f32::NEG_INFINITY {
        return max;
    }
    lane_sum(row, |x| exp(x * scale - max)).ln() + max
}

#[inline(always)]
fn silu_mul_body(out: &mut [f32], gate: &[f32], up: &[f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + exp(-g)) * u;
    }
}

#[inline(always)]
fn dropout_body(out: &mut [f32], first: u32, seed: u64, threshold: u32, scale: f32) {
    let (lo, hi) = (seed as u32, (seed >> 32) as u32);
    for (i, o) in (first..).zip(out.iter_mut()) {
        let h = mix32(mix32(i ^ lo) ^ hi);
        *o = if h < threshold { scale } else { 0.0 };
    }
}

/// Chris Wellons' `lowbias32` integer hash.
#[inline(always)]
fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

/// Lanes of the reductions, so that they vectorise.
pub(super) const LANES: usize = 16;

/// Folds `xs` with `f` in [`LANES`] independent accumulators, then folds those.
#[inline(always)]
pub(super) fn lane_fold(xs: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = f(*a, x);
        }
    }
    let lanes = acc.into_iter().fold(init, &f);
    tail.iter().fold(lanes, |a, &x| f(a, x))
}

/// `sum f(x)` over `xs` in [`LANES`] independent accumulators.
#[inline(always)]
pub(super) fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    lane_sum3(xs, xs, xs, |x, _, _| f(x))
}

/// `sum f(a_i, b_i, c_i)` over three slices of one length, in [`LANES`] independent
/// accumulators.
#[inline(always)]
pub(super) fn lane_sum3(a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let (mut ac, mut bc, mut cc) = (
        a.chunks_exact(LANES),
        b.chunks_exact(LANES),
        c.chunks_exact(LANES),
    );
    for ((a, b), c) in (&mut ac).zip(&mut bc).zip(&mut cc) {
        for (((s, &a), &b), &c) in acc.iter_mut().zip(a).zip(b).zip(c) {
            *s += f(a, b, c);
        }
    }
    let tail = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .zip(cc.remainder());
    let tail: f32 = tail.map(|((&a, &b), &c)| f(a, b, c)).sum();
    acc.iter().sum::<f32>() + tail
}

/// `e^x` to about 1 ulp (Cephes' expf polynomial), branch-free so that loops over it vectorise;
/// `-inf` gives 0 and large `x` saturates at `e^88.38`.
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to an integer kept in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let underflow = x < -87.336_55;
    let x = x.clamp(-87.336_55, 88.376_26);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_2e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e = p * r * r + r + 1.0;
    let scale = f32::from_bits(((t.to_bits() as i32 - ROUND.to_bits() as i32 + 127) << 23) as u32);
    if underflow {
        0.0
    } else {
        e * scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std() {
        let mut worst = 0f32;
        for i in -8700..=8800 {
            let x = i as f32 * 0.01;
            let rel = ((exp(x) - x.exp()) / x.exp()).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
    }

    #[test]
    fn softmax_masks_future_and_padding() {
        let mut row = vec![1.0, 2.0, 3.0, 4.0];
        let (max, inv) = softmax_row(&mut row, 3, Some(&[false, true, false, false]));
        assert_eq!(max, 3.0);
        let e = [1f32.exp(), 0.0, 3f32.exp()];
        let sum: f32 = e.iter().sum();
        for (got, want) in row.iter().zip(e.iter().map(|x| x / sum).chain([0.0])) {
            assert!((got * inv - want).abs() < 1e-6, "{row:?}");
        }
    }

    #[test]
    fn row_kernels_match_scalar_math() {
        let row: Vec<f32> = (0..1003)
            .map(|i| ((i * 37) % 101) as f32 * 0.21 - 9.0)
            .collect();
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let lse = row.iter().map(|x| (x - max).exp()).sum::<f32>().ln() + max;
        assert!((logsumexp_row(&row) - lse).abs() < 1e-5);
        let up: Vec<f32> = row.iter().map(|x| x * 0.5 + 1.0).collect();
        let mut out = vec![0.0; row.len()];
        silu_mul_slice(&mut out, &row, &up);
        for ((o, g), u) in out.iter().zip(&row).zip(&up) {
            let want = g / (1.0 + (-g).exp()) * u;
            assert!(
                (o - want).abs() <= 1e-6 * want.abs().max(1.0),
                "{o} vs {want}"
            );
        }
    }
}
