//! Tests of `stats`.

use super::*;

#[test]
fn chi_square_sf_matches_tables() {
    // (x, dof, P(χ² ≥ x)) from standard tables.
    for (x, dof, p) in [
        (3.841458820694124, 1, 0.05),
        (6.634896601021214, 1, 0.01),
        (18.307038053275146, 10, 0.05),
        (124.34211340400407, 100, 0.05),
        (44.26322494417497, 15, 1e-4),
        (42.579464, 15, 0.00018294051019306556),
        (2.0, 2, (-1.0f64).exp()),
    ] {
        let got = chi_square_sf(x, dof);
        assert!(
            (got - p).abs() < 1e-6 * p.max(1e-3),
            "x {x} dof {dof}: {got} vs {p}"
        );
    }
}

#[test]
fn gof_and_binomial_bounds() {
    let (stat, dof, p) = chi_square_gof(&[25, 25, 50], &[1.0, 1.0, 2.0]);
    assert_eq!((stat, dof), (0.0, 2));
    assert!((p - 1.0).abs() < 1e-12);
    let (_, _, p) = chi_square_gof(&[90, 10], &[0.5, 0.5]);
    assert!(p < 1e-10, "{p}");
    assert_eq!(chi_square_gof(&[5, 1], &[1.0, 0.0]).2, 0.0);
    let z = normal_two_sided_critical(0.05);
    assert!((z - 1.959963984540054).abs() < 1e-9, "{z}");
    assert!(binomial_within(5000, 10000, 0.5, 1e-4));
    assert!(!binomial_within(5300, 10000, 0.5, 1e-4));
}
