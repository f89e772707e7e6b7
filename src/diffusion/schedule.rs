//! The log-linear noise schedule (spec 4.1) and antithetic time sampling (spec 4.5).
//!
//! `α(t) = 1 − (1 − ε_s)·t` with ε_s = 1e-3: α(0) = 1, α(1) = 1e-3 (never fully masked).
//! The network is blind to t (spec 4.2), so the schedule only enters through the masking
//! probability, the NELBO weight and the sampler's posterior.

use rand::Rng;

/// `sampling_eps` of training: α(1) = 1e-3 and t ≥ 1e-3.
pub const SAMPLING_EPS: f64 = 1e-3;

/// α(t), the probability that a token is still clean at time t.
pub fn alpha(t: f64) -> f64 {
    1.0 - (1.0 - SAMPLING_EPS) * t
}

/// dα/dt, constant for this schedule.
pub fn alpha_prime() -> f64 {
    -(1.0 - SAMPLING_EPS)
}

/// NELBO weight per masked token, `−α'(t) / (1 − α(t))`, which is `1/t` for this schedule
/// (spec 4.6). Computed from the schedule rather than as 1/t so a remap stays consistent.
pub fn nelbo_weight(t: f64) -> f64 {
    -alpha_prime() / (1.0 - alpha(t))
}

/// Antithetic (stratified) times for a global batch of `n` (spec 4.5):
/// `t̃_i = (u_i/n + i/n) mod 1`, `t = (1 − ε_s)·t̃ + ε_s`. Consecutive chunks of the result
/// go to consecutive micro-batches, so each micro-batch sees a narrow band of t (quirk 19,
/// reproduced on purpose so loss curves compare with the reference).
pub fn antithetic_times<R: Rng>(rng: &mut R, n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| {
            let u: f64 = rng.random();
            let tt = (u / n as f64 + i as f64 / n as f64).rem_euclid(1.0);
            (1.0 - SAMPLING_EPS) * tt + SAMPLING_EPS
        })
        .collect()
}

#[cfg(test)]
#[path = "schedule_tests.rs"]
mod tests;
