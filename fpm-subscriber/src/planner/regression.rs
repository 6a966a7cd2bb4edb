//! Ordinary least squares with an intercept, computed the way scikit-learn's
//! `LinearRegression().fit(X, y)` does for dense inputs, so results agree to ~1e-12.
//!
//! scikit-learn centres `X` and `y` on their means (`numpy.mean`: pairwise summation over a
//! 1-D array, row-by-row summation down the columns of a 2-D one), solves the centred
//! problem with `scipy.linalg.lstsq(X, y, cond=1e-6)` (LAPACK `gelsd`: an SVD in which
//! singular values `<= 1e-6 * s_max` count as zero, giving the minimum-norm solution on
//! rank-deficient data) and sets `intercept = y_mean - x_mean . coef`. We follow LAPACK's
//! path for a tall matrix with at most two columns: a Householder QR (nalgebra), then the
//! SVD of the 2x2 triangular factor with a port of LAPACK's `dlasv2`, then the truncated
//! solve. Hand-written on purpose: nalgebra's general SVD (and a normal-equations solve) lose
//! relative accuracy in the small coefficient of collinear decode batches
//! (`sum_decode_kv_tokens` proportional to `num_decode_requests`, where upstream returns the
//! minimum-norm split) — measured 20-45% off there, against ~1e-13 with `dlasv2`.

use nalgebra::{DMatrix, DVector};

/// Minimum-norm least squares of `xc * coef = yc` (`ndim` columns, 1 or 2), singular values
/// `<= RCOND * s_max` dropped, as LAPACK `gelsd` does.
fn solve_truncated(xc: DMatrix<f64>, mut yc: DVector<f64>, ndim: usize) -> [f64; 2] {
    let n = xc.nrows();
    let qr = xc.qr();
    let r = qr.r();
    qr.q_tr_mul(&mut yc);
    let b = [yc[0], if n > 1 { yc[1] } else { 0.0 }];
    if ndim == 1 {
        let f = r[(0, 0)];
        return if f == 0.0 { [0.0; 2] } else { [b[0] / f, 0.0] };
    }
    let (f, g) = (r[(0, 0)], r[(0, 1)]);
    let h = if n > 1 { r[(1, 1)] } else { 0.0 };
    let sv = dlasv2(f, g, h);
    // [f g; 0 h] = U diag(ssmax, ssmin) V^T with U = [csl -snl; snl csl], V = [csr -snr; snr csr].
    let pairs = [
        (sv.ssmax, [sv.csl, sv.snl], [sv.csr, sv.snr]),
        (sv.ssmin, [-sv.snl, sv.csl], [-sv.snr, sv.csr]),
    ];
    let s_max = sv.ssmax.abs().max(sv.ssmin.abs());
    let mut coef = [0.0; 2];
    for (s, u, v) in pairs {
        if s.abs() <= RCOND * s_max {
            continue;
        }
        let t = (u[0] * b[0] + u[1] * b[1]) / s;
        coef[0] += v[0] * t;
        coef[1] += v[1] * t;
    }
    coef
}

/// Result of [`dlasv2`]: signed singular values and the rotations.
struct Svd2 {
    ssmin: f64,
    ssmax: f64,
    snr: f64,
    csr: f64,
    snl: f64,
    csl: f64,
}

fn sign(a: f64, b: f64) -> f64 {
    if b >= 0.0 && !(b == 0.0 && b.is_sign_negative()) {
        a.abs()
    } else {
        -a.abs()
    }
}

/// LAPACK `dlasv2`: SVD of the upper triangular `[f g; 0 h]` to high relative accuracy.
#[allow(clippy::many_single_char_names)] // LAPACK's names, kept for checking against it
fn dlasv2(f: f64, g: f64, h: f64) -> Svd2 {
    const EPS: f64 = f64::EPSILON / 2.0; // dlamch('EPS')
    let (mut ft, mut fa, mut ht, mut ha) = (f, f.abs(), h, h.abs());
    let mut pmax = 1;
    let swap = ha > fa;
    if swap {
        pmax = 3;
        std::mem::swap(&mut ft, &mut ht);
        std::mem::swap(&mut fa, &mut ha);
    }
    let (gt, ga) = (g, g.abs());
    let (ssmin, ssmax, clt, crt, slt, srt);
    if ga == 0.0 {
        (ssmin, ssmax) = (ha, fa);
        (clt, crt, slt, srt) = (1.0, 1.0, 0.0, 0.0);
    } else {
        let mut gasmal = true;
        let mut out = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
        if ga > fa {
            pmax = 2;
            if fa / ga < EPS {
                gasmal = false;
                let smin = if ha > 1.0 {
                    fa / (ga / ha)
                } else {
                    (fa / ga) * ha
                };
                out = (smin, ga, 1.0, ft / gt, ht / gt, 1.0);
            }
        }
        if gasmal {
            let d = fa - ha;
            let mut l = if d == fa { 1.0 } else { d / fa };
            let m = gt / ft;
            let mut t = 2.0 - l;
            let mm = m * m;
            let tt = t * t;
            let s = (tt + mm).sqrt();
            let r = if l == 0.0 {
                m.abs()
            } else {
                (l * l + mm).sqrt()
            };
            let a = 0.5 * (s + r);
            let smin = ha / a;
            let smax = fa * a;
            if mm == 0.0 {
                t = if l == 0.0 {
                    sign(2.0, ft) * sign(1.0, gt)
                } else {
                    gt / sign(d, ft) + m / t
                };
            } else {
                t = (m / (s + t) + m / (r + l)) * (1.0 + a);
            }
            l = (t * t + 4.0).sqrt();
            let crt = 2.0 / l;
            let srt = t / l;
            let clt = (crt + srt * m) / a;
            let slt = (ht / ft) * srt / a;
            out = (smin, smax, clt, crt, slt, srt);
        }
        (ssmin, ssmax, clt, crt, slt, srt) = out;
    }
    let (csl, snl, csr, snr) = if swap {
        (srt, crt, slt, clt)
    } else {
        (clt, slt, crt, srt)
    };
    let tsign = match pmax {
        1 => sign(1.0, csr) * sign(1.0, csl) * sign(1.0, f),
        2 => sign(1.0, snr) * sign(1.0, csl) * sign(1.0, g),
        _ => sign(1.0, snr) * sign(1.0, snl) * sign(1.0, h),
    };
    Svd2 {
        ssmax: sign(ssmax, tsign),
        ssmin: sign(ssmin, tsign * sign(1.0, f) * sign(1.0, h)),
        snr,
        csr,
        snl,
        csl,
    }
}

use super::buckets::Sample;
use super::FitError;

/// `LinearRegression.tol`, passed to `lstsq` as `cond`.
const RCOND: f64 = 1e-6;

/// numpy's pairwise summation (`pairwise_sum_DOUBLE`, block 128, 8 accumulators), which
/// `numpy.mean` uses on a contiguous 1-D array. Matching it keeps the centred targets
/// bit-identical to upstream's.
pub(crate) fn numpy_pairwise_sum(a: &[f64]) -> f64 {
    let n = a.len();
    if n < 8 {
        let mut res = -0.0;
        for &v in a {
            res += v;
        }
        res
    } else if n <= 128 {
        let mut r = [0.0; 8];
        r.copy_from_slice(&a[..8]);
        let mut i = 8;
        while i < n - n % 8 {
            for j in 0..8 {
                r[j] += a[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        while i < n {
            res += a[i];
            i += 1;
        }
        res
    } else {
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        numpy_pairwise_sum(&a[..n2]) + numpy_pairwise_sum(&a[n2..])
    }
}

/// A fitted linear model: `wall_time = coef . x + intercept`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fit {
    coef: [f64; 2],
    ndim: u8,
    intercept: f64,
}

impl Fit {
    /// One coefficient per feature (after the decode model's clamp, when it applied).
    pub fn coef(&self) -> &[f64] {
        &self.coef[..self.ndim as usize]
    }

    /// The intercept (seconds).
    pub fn intercept(&self) -> f64 {
        self.intercept
    }

    /// `coef . x + intercept` (scikit-learn's `predict` for one row), not clamped.
    pub fn predict(&self, x: &[f64]) -> f64 {
        let mut dot = 0.0;
        for (c, v) in self.coef().iter().zip(x) {
            dot += c * v;
        }
        dot + self.intercept
    }

    pub(crate) fn coef_mut(&mut self) -> &mut [f64] {
        &mut self.coef[..self.ndim as usize]
    }
}

/// Least squares with intercept over `samples` (each with `ndim` features).
///
/// # Errors
///
/// [`FitError::NoSamples`] on an empty input and [`FitError::NonFinite`] when a target (or a
/// centred value) is NaN or infinite: scikit-learn raises `ValueError` in both cases.
pub(crate) fn least_squares(samples: &[Sample], ndim: usize) -> Result<Fit, FitError> {
    let n = samples.len();
    if n == 0 {
        return Err(FitError::NoSamples);
    }
    let y: Vec<f64> = samples.iter().map(Sample::wall_time).collect();
    if y.iter().any(|v| !v.is_finite()) {
        return Err(FitError::NonFinite);
    }
    let mut x_mean = [0.0; 2];
    if ndim == 1 {
        let col: Vec<f64> = samples.iter().map(|s| s.features()[0]).collect();
        x_mean[0] = numpy_pairwise_sum(&col) / n as f64;
    } else {
        for s in samples {
            for (m, v) in x_mean.iter_mut().zip(s.features()) {
                *m += v;
            }
        }
        for m in &mut x_mean {
            *m /= n as f64;
        }
    }
    let y_mean = numpy_pairwise_sum(&y) / n as f64;
    let xc = DMatrix::from_fn(n, ndim, |i, j| samples[i].features()[j] - x_mean[j]);
    let yc = DVector::from_iterator(n, y.iter().map(|v| v - y_mean));
    if xc.iter().chain(yc.iter()).any(|v| !v.is_finite()) {
        return Err(FitError::NonFinite);
    }

    let coef = solve_truncated(xc, yc, ndim);
    let mut x_dot = 0.0;
    for j in 0..ndim {
        x_dot += x_mean[j] * coef[j];
    }
    Ok(Fit {
        coef,
        ndim: ndim as u8,
        intercept: y_mean - x_dot,
    })
}

/// Fit quality over the retained samples (not in upstream): coefficient of determination and
/// the 99th percentile of absolute residuals.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct FitQuality {
    /// R² = 1 - SS_res / SS_tot; with constant targets, 1.0 for a perfect fit, else 0.0
    /// (scikit-learn's `r2_score` convention).
    pub r_squared: f64,
    /// 99th percentile (nearest rank) of |wall_time - prediction|, in seconds.
    pub residual_p99: f64,
    /// How many samples the report is over.
    pub samples: usize,
}

pub(crate) fn quality(fit: &Fit, samples: &[Sample]) -> FitQuality {
    let n = samples.len();
    let mean = samples.iter().map(Sample::wall_time).sum::<f64>() / n as f64;
    let mut ss_res = 0.0;
    let mut ss_tot = 0.0;
    let mut abs_res: Vec<f64> = Vec::with_capacity(n);
    for s in samples {
        let r = s.wall_time() - fit.predict(s.features());
        ss_res += r * r;
        ss_tot += (s.wall_time() - mean).powi(2);
        abs_res.push(r.abs());
    }
    let r_squared = if ss_tot > 0.0 {
        1.0 - ss_res / ss_tot
    } else if ss_res == 0.0 {
        1.0
    } else {
        0.0
    };
    abs_res.sort_by(f64::total_cmp);
    let rank = (0.99 * n as f64).ceil() as usize;
    FitQuality {
        r_squared,
        residual_p99: abs_res[rank.clamp(1, n) - 1],
        samples: n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(rows: &[(&[f64], f64)]) -> Vec<Sample> {
        rows.iter().map(|(x, y)| Sample::new(x, *y)).collect()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * a.abs().max(b.abs()).max(1e-300)
    }

    #[test]
    fn pairwise_sum_matches_numpy_not_sequential() {
        // numpy.array(v).sum() for v = [0.1] * 10 is 1.0 (pairwise); a loop gives 0.9999999999999999.
        let v = [0.1; 10];
        assert_eq!(numpy_pairwise_sum(&v), 1.0);
        assert_eq!(v.iter().fold(0.0, |a, b| a + b), 0.9999999999999999);
        let big: Vec<f64> = (0..1000).map(|i| f64::from(i) * 0.37).collect();
        let exact: f64 = (0..1000).map(|i| f64::from(i) * 0.37).sum();
        assert!((numpy_pairwise_sum(&big) - exact).abs() < 1e-9);
    }

    #[test]
    fn dlasv2_reconstructs_the_triangle() {
        for (f, g, h) in [
            (3.0, 4.0, 5.0),
            (1.0, 3759.0, 1e-13),
            (-2.0, 1e-20, 7.0),
            (0.0, 1.0, 0.0),
            (5.0, 0.0, -3.0),
            (1e-300, 1e300, 1.0),
        ] {
            let s = dlasv2(f, g, h);
            // B = U diag(ssmax, ssmin) V^T, U = [csl -snl; snl csl], V = [csr -snr; snr csr].
            let b = |i: usize, j: usize| {
                let u = [[s.csl, -s.snl], [s.snl, s.csl]];
                let v = [[s.csr, -s.snr], [s.snr, s.csr]];
                u[i][0] * s.ssmax * v[j][0] + u[i][1] * s.ssmin * v[j][1]
            };
            let scale = f.abs().max(g.abs()).max(h.abs());
            for (i, j, want) in [(0, 0, f), (0, 1, g), (1, 0, 0.0), (1, 1, h)] {
                assert!(
                    (b(i, j) - want).abs() <= 4.0 * f64::EPSILON * scale,
                    "{f} {g} {h}: ({i},{j})"
                );
            }
            assert!(s.ssmax.abs() >= s.ssmin.abs());
        }
    }

    #[test]
    fn exact_line_is_recovered() {
        let s = samples(&[(&[1.0], 3.0), (&[2.0], 5.0), (&[4.0], 9.0)]);
        let f = least_squares(&s, 1).unwrap();
        assert!(
            close(f.coef()[0], 2.0) && close(f.intercept(), 1.0),
            "{f:?}"
        );
        let s = samples(&[
            (&[1.0, 0.0], 1.5),
            (&[0.0, 1.0], 2.5),
            (&[1.0, 1.0], 3.5),
            (&[2.0, 3.0], 8.5),
        ]);
        let f = least_squares(&s, 2).unwrap();
        assert!(close(f.coef()[0], 1.0) && close(f.coef()[1], 2.0), "{f:?}");
        assert!(close(f.intercept(), 0.5));
    }

    #[test]
    fn constant_feature_gets_zero_coefficient() {
        let s = samples(&[(&[3.0, 7.0], 1.0), (&[5.0, 7.0], 2.0), (&[9.0, 7.0], 4.0)]);
        let f = least_squares(&s, 2).unwrap();
        assert_eq!(f.coef()[1], 0.0);
        assert!(close(f.coef()[0], 0.5));
        let one = least_squares(&samples(&[(&[3.0], 2.0)]), 1).unwrap();
        assert_eq!((one.coef()[0], one.intercept()), (0.0, 2.0));
    }

    #[test]
    fn collinear_features_get_the_minimum_norm_split() {
        // x1 = 10 * x0 exactly: y = 0.1 * x1 = x0; minimum-norm split of slope 1 along
        // (1, 10) is coef = (1, 10) / 101.
        let s = samples(&[
            (&[1.0, 10.0], 1.0),
            (&[2.0, 20.0], 2.0),
            (&[5.0, 50.0], 5.0),
        ]);
        let f = least_squares(&s, 2).unwrap();
        assert!(close(f.coef()[0], 1.0 / 101.0), "{f:?}");
        assert!(close(f.coef()[1], 10.0 / 101.0), "{f:?}");
        assert!(f.intercept().abs() < 1e-14);
    }

    #[test]
    fn nan_target_and_empty_input_are_errors() {
        let s = samples(&[(&[1.0], f64::NAN), (&[2.0], 1.0)]);
        assert_eq!(least_squares(&s, 1), Err(FitError::NonFinite));
        assert_eq!(least_squares(&[], 1), Err(FitError::NoSamples));
        let s = samples(&[(&[1.0], f64::MAX), (&[2.0], f64::MAX)]); // mean overflows
        assert_eq!(least_squares(&s, 1), Err(FitError::NonFinite));
    }

    #[test]
    fn quality_of_a_perfect_and_a_noisy_fit() {
        let s = samples(&[(&[1.0], 3.0), (&[2.0], 5.0), (&[4.0], 9.0)]);
        let f = least_squares(&s, 1).unwrap();
        let q = quality(&f, &s);
        assert!((q.r_squared - 1.0).abs() < 1e-12 && q.residual_p99 < 1e-12 && q.samples == 3);
        let s = samples(&[(&[0.0], 0.0), (&[1.0], 2.0), (&[2.0], 0.0), (&[3.0], 2.0)]);
        let f = least_squares(&s, 1).unwrap(); // y = 0.4 x + 0.4, residuals -0.4 0.8 -1.2 0.4
        let q = quality(&f, &s);
        assert!((q.r_squared - 0.2).abs() < 1e-12, "{q:?}");
        assert!((q.residual_p99 - 1.2).abs() < 1e-12, "{q:?}");
    }
}
