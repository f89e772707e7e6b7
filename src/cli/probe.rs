//! `imdm-engine probe`: opens the GPU, loads every embedded PTX module, runs each kernel at a
//! real model shape and compares it with its CPU twin. Exits non-zero on any mismatch.

use clap::Args;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::cuda::ops::ln_modulate;
use crate::cuda::ops::modulation::{HostMod, ModIn, ModRows};
use crate::cuda::{Gpu, ARCH, PTX};
use crate::error::{Error, Result};
use crate::testing::{compare, Tol};

#[derive(Args, Debug)]
pub struct ProbeArgs {
    /// Rows (B*L) of the test input; the default is DiT-small's OWT batch, 32 x 1024.
    #[arg(long, default_value_t = 32 * 1024)]
    pub rows: usize,
    /// Row width D (768 = DiT-small).
    #[arg(long, default_value_t = 768)]
    pub width: usize,
}

pub fn run(a: ProbeArgs) -> Result<()> {
    let gpu = Gpu::new(0)?;
    println!(
        "device {}: {} PTX module(s) built for {ARCH}: {}",
        gpu.name(),
        gpu.module_count(),
        PTX.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
    );
    let jit: Vec<&str> = gpu
        .loaded_as()
        .iter()
        .filter(|(_, how)| *how == crate::cuda::device::ModuleCode::Ptx)
        .map(|(n, _)| *n)
        .collect();
    if jit.is_empty() {
        println!("modules loaded from {ARCH} SASS (no JIT)");
    } else {
        println!(
            "modules compiled from PTX by the driver (JIT): {}",
            jit.join(", ")
        );
    }
    let (rows, d) = (a.rows, a.width);
    let len = 1024.min(rows);
    let rows = rows / len * len;
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut r = |n: usize, lo: f32, hi: f32| {
        (0..n)
            .map(|_| rng.random_range(lo..hi))
            .collect::<Vec<f32>>()
    };
    // (shift, scale) per sequence: a (B, 2D) modulation buffer.
    let (x, w, modulation) = (
        r(rows * d, -3.0, 3.0),
        r(d, 0.5, 1.5),
        r(rows / len * 2 * d, -0.5, 0.5),
    );
    let layout = ModRows::PerSequence { stride: 2 * d };
    let s = &gpu.stream;
    let (dx, dw, dm) = (
        s.clone_htod(&x)?,
        s.clone_htod(&w)?,
        s.clone_htod(&modulation)?,
    );
    let mut out = ln_modulate::LnModulateOut::new(&gpu, rows, d)?;
    let m = ModIn {
        buf: &dm,
        chunk: 0,
        rows: layout,
    };
    ln_modulate::ln_modulate_fwd(&gpu, &mut out, &dx, &dw, Some(m), rows, d, len)?;
    let y: Vec<f32> = s.clone_dtoh(&out.y)?.iter().map(|v| v.to_f32()).collect();
    let rstd = s.clone_dtoh(&out.rstd)?;
    let hm = HostMod {
        buf: &modulation[..],
        chunk: 0,
        rows: layout,
    };
    let (y_ref, _, rstd_ref) = ln_modulate::cpu::ln_modulate_fwd(&x, &w, Some(hm), d, len);
    let mut ok = true;
    for (name, got, want, tol) in [
        ("y (bf16)", &y, &y_ref, Tol::BF16),
        ("rstd (f32)", &rstd, &rstd_ref, Tol::F32),
    ] {
        let (max_abs, max_rel, worst, ratio) = compare(got, want, tol);
        let pass = ratio <= 1.0;
        ok &= pass;
        println!(
            "ln_modulate_fwd_bf16 rows={rows} d={d} {name}: max abs {max_abs:.2e}, max rel {max_rel:.2e}, \
             worst [{worst}] got {} want {} -> {}",
            got[worst],
            want[worst],
            if pass { "PASS" } else { "FAIL" }
        );
    }
    if ok {
        println!("probe: all kernels match their CPU twins");
        Ok(())
    } else {
        Err(Error::Cuda(
            "probe: a kernel disagrees with its CPU twin".into(),
        ))
    }
}
