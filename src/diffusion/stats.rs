//! Small statistical tests for samplers (docs/testing.md 4: chi-square on categorical draws,
//! binomial bounds on frequencies), computed properly rather than with rules of thumb: the
//! chi-square survival function is the regularised upper incomplete gamma function
//! Q(k/2, x/2), and normal critical values invert `erfc` by bisection.

/// Regularised upper incomplete gamma Q(a, x) = Γ(a, x)/Γ(a), for a > 0, x ≥ 0
/// (series for x < a + 1, Lentz continued fraction otherwise; relative accuracy ~1e-14).
pub fn gamma_q(a: f64, x: f64) -> f64 {
    assert!(a > 0.0 && x >= 0.0, "gamma_q({a}, {x})");
    if x == 0.0 {
        return 1.0;
    }
    let ln_pre = -x + a * x.ln() - libm::lgamma(a);
    if x < a + 1.0 {
        // P(a, x) = e^{-x} x^a / Γ(a) · Σ x^n / (a (a+1) ... (a+n)).
        let (mut term, mut sum, mut ap) = (1.0 / a, 1.0 / a, a);
        for _ in 0..10_000 {
            ap += 1.0;
            term *= x / ap;
            sum += term;
            if term.abs() < sum.abs() * 1e-16 {
                break;
            }
        }
        1.0 - sum * ln_pre.exp()
    } else {
        // Q(a, x) = e^{-x} x^a / Γ(a) · 1/(x+1−a− 1·(1−a)/(x+3−a− 2·(2−a)/(x+5−a− ...))).
        let tiny = 1e-300;
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / tiny;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..10_000 {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < tiny {
                d = tiny;
            }
            c = b + an / c;
            if c.abs() < tiny {
                c = tiny;
            }
            d = 1.0 / d;
            let del = d * c;
            h *= del;
            if (del - 1.0).abs() < 1e-16 {
                break;
            }
        }
        ln_pre.exp() * h
    }
}

/// P(χ²_dof ≥ x).
pub fn chi_square_sf(x: f64, dof: usize) -> f64 {
    gamma_q(dof as f64 / 2.0, x.max(0.0) / 2.0)
}

/// Pearson's goodness-of-fit test of `counts` against the probabilities `probs` (normalised
/// here). Categories with zero probability are left out of the statistic, but a single
/// observation in one gives p-value 0. Returns (statistic, degrees of freedom, p-value).
pub fn chi_square_gof(counts: &[u64], probs: &[f64]) -> (f64, usize, f64) {
    assert_eq!(
        counts.len(),
        probs.len(),
        "counts and probs differ in length"
    );
    let n: u64 = counts.iter().sum();
    let z: f64 = probs.iter().sum();
    let (mut stat, mut cats) = (0.0, 0usize);
    for (&c, &p) in counts.iter().zip(probs) {
        if p <= 0.0 {
            if c > 0 {
                return (f64::INFINITY, 0, 0.0);
            }
            continue;
        }
        let e = n as f64 * p / z;
        stat += (c as f64 - e).powi(2) / e;
        cats += 1;
    }
    let dof = cats.saturating_sub(1).max(1);
    (stat, dof, chi_square_sf(stat, dof))
}

/// Two-sided standard normal critical value: the z with P(|Z| > z) = `p`.
pub fn normal_two_sided_critical(p: f64) -> f64 {
    assert!(p > 0.0 && p < 1.0);
    // P(|Z| > z) = erfc(z / √2), decreasing in z.
    let (mut lo, mut hi) = (0.0f64, 40.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if libm::erfc(mid / std::f64::consts::SQRT_2) > p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// Whether `k` successes in `n` Bernoulli(`p`) trials are within the two-sided normal bound of
/// level `alpha`: |k − np| ≤ z_alpha · sqrt(np(1−p)) (+0.5 continuity correction).
pub fn binomial_within(k: u64, n: u64, p: f64, alpha: f64) -> bool {
    let mean = n as f64 * p;
    let sd = (n as f64 * p * (1.0 - p)).sqrt();
    (k as f64 - mean).abs() <= normal_two_sided_critical(alpha) * sd + 0.5
}

#[cfg(test)]
#[path = "stats_tests.rs"]
mod tests;
