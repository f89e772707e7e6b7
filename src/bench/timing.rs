//! The one timing helper of `imdm-engine bench` and `benches/`: CUDA events around each
//! repeat, warm-up first, the L2 cache flushed between repeats (so a kernel never reads its
//! inputs from a warm 50 MB L2), median of N. Figures carry their napkin maths: bytes or FLOPs,
//! achieved GB/s or TFLOP/s, and the share of the device's peak (`device_peaks` by its name;
//! the percentage is NaN, printed "-", on a device not listed).

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaSlice;

use crate::cuda::{DevicePeaks, Gpu};
use crate::error::Result;

static PEAKS: std::sync::OnceLock<Option<DevicePeaks>> = std::sync::OnceLock::new();

/// Dense bf16 peak of the benchmarked device in TFLOP/s (NaN when not known).
pub fn peak_tflops() -> f64 {
    PEAKS
        .get()
        .copied()
        .flatten()
        .map_or(f64::NAN, |p| p.bf16_tflops)
}

/// Copy bandwidth of the benchmarked device in GB/s (NaN when not known).
pub fn peak_gbps() -> f64 {
    PEAKS
        .get()
        .copied()
        .flatten()
        .and_then(|p| p.copy_gbps)
        .unwrap_or(f64::NAN)
}

/// Timer state: a buffer larger than L2 to overwrite between repeats.
pub struct Timer {
    flush: CudaSlice<u8>,
    pub warmup: usize,
    pub repeats: usize,
}

impl Timer {
    /// Also fixes the peaks of the percentage columns to `gpu`'s (one device per process).
    pub fn new(gpu: &Gpu) -> Result<Self> {
        let _ = PEAKS.set(gpu.peaks());
        Ok(Timer {
            flush: gpu.stream.alloc_zeros::<u8>(128 << 20)?,
            warmup: 3,
            repeats: 20,
        })
    }

    /// Median milliseconds of `f` (which only enqueues work on `gpu.stream`).
    pub fn time(&mut self, gpu: &Gpu, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
        for _ in 0..self.warmup {
            f()?;
        }
        let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let (start, stop) = (gpu.ctx.new_event(flags)?, gpu.ctx.new_event(flags)?);
        let mut ms = Vec::with_capacity(self.repeats);
        for _ in 0..self.repeats {
            gpu.stream.memset_zeros(&mut self.flush)?;
            start.record(&gpu.stream)?;
            f()?;
            stop.record(&gpu.stream)?;
            stop.synchronize()?;
            ms.push(start.elapsed_ms(&stop)? as f64);
        }
        ms.sort_by(|a, b| a.total_cmp(b));
        Ok(ms[ms.len() / 2])
    }
}

/// What a benchmark row measures.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    pub name: String,
    pub shape: String,
    pub ms: f64,
    /// TFLOP/s for compute-bound ops (0 when not meaningful).
    pub tflops: f64,
    /// GB/s for memory-bound ops (0 when not meaningful).
    pub gbps: f64,
    /// Share of the relevant peak, in percent.
    pub pct_peak: f64,
}

impl Row {
    /// A compute-bound row from its FLOP count.
    pub fn compute(name: &str, shape: String, ms: f64, flops: f64) -> Self {
        let tflops = flops / (ms * 1e-3) / 1e12;
        Row {
            name: name.into(),
            shape,
            ms,
            tflops,
            gbps: 0.0,
            pct_peak: 100.0 * tflops / peak_tflops(),
        }
    }

    /// A memory-bound row from the bytes it must read and write.
    pub fn memory(name: &str, shape: String, ms: f64, bytes: f64) -> Self {
        let gbps = bytes / (ms * 1e-3) / 1e9;
        Row {
            name: name.into(),
            shape,
            ms,
            tflops: 0.0,
            gbps,
            pct_peak: 100.0 * gbps / peak_gbps(),
        }
    }
}

/// Prints rows as an aligned table.
pub fn print_table(rows: &[Row]) {
    println!(
        "{:<28} {:<34} {:>9} {:>9} {:>9} {:>7}",
        "kernel", "shape", "ms", "TFLOP/s", "GB/s", "%peak"
    );
    for r in rows {
        let f = |x: f64| {
            if x > 0.0 {
                format!("{x:.1}")
            } else {
                "-".into()
            }
        };
        let pct = if r.pct_peak.is_finite() {
            format!("{:.1}%", r.pct_peak)
        } else {
            "-".into()
        };
        println!(
            "{:<28} {:<34} {:>9.4} {:>9} {:>9} {:>7}",
            r.name,
            r.shape,
            r.ms,
            f(r.tflops),
            f(r.gbps),
            pct
        );
    }
}
