//! `imdm-engine bench`: kernel and whole-forward benchmarks on the GPU, printed as tables and
//! written as JSON. Figures depend on the device: report them with its name and the date.

use clap::{Args, Subcommand};
use std::path::PathBuf;

use crate::bench::{self, timing, Shape};
use crate::cuda::Gpu;
use crate::error::{Error, Result};
use crate::model::{Algo, Preset};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
    /// Write the results as JSON here (atomically).
    #[arg(long, global = true)]
    pub json: Option<PathBuf>,
    /// Record the GPU time of every NVTX range (CUDA events) and write a Chrome trace here
    /// (Perfetto opens it), then print the per-range summary.
    #[arg(long, global = true)]
    pub trace: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum BenchWhat {
    /// Every forward kernel at the DiT-small (OWT, LM1B) and DiT-large (OWT) shapes, with
    /// TFLOP/s or GB/s and the share of the device's peak (H100, H200: 989 TFLOP/s bf16; copy
    /// 3.0 and 4.3 TB/s).
    Kernels,
    /// One DiT forward (random weights): ms to f32 logits and with SUBS, TFLOP/s, memory.
    Forward {
        #[arg(long, value_enum, default_value = "small")]
        preset: Preset,
        #[arg(long, value_enum, default_value = "owt")]
        shape: Shape,
        /// mdlm is the denoiser the PyTorch figures in docs/benchmarks.md measure.
        #[arg(long, value_enum, default_value = "mdlm")]
        algo: Algo,
    },
    /// The sampler: ms per step (forward + fused posterior/draw kernel) and samples/s for 8
    /// and 32 steps (random weights, all-mask start), beside the PyTorch sample step.
    Sample {
        #[arg(long, value_enum, default_value = "small")]
        preset: Preset,
        #[arg(long, value_enum, default_value = "owt")]
        shape: Shape,
        /// Also time a whole run of this many steps.
        #[arg(long, default_value_t = 8)]
        steps: usize,
        /// imdm: IMDM model and posterior (V+1 categories); mdlm: MDLM model and posterior.
        #[arg(long, value_enum, default_value = "imdm")]
        algo: Algo,
    },
    /// GPU training steps (reference init, random tokens): ms per step, tok/s, MFU (6N, and
    /// with attention FLOPs) and memory, beside the PyTorch training figures of docs/benchmarks.md.
    Train {
        #[arg(long, value_enum, default_value = "small")]
        preset: Preset,
        #[arg(long, value_enum, default_value = "owt")]
        shape: Shape,
        /// mdlm is the model the PyTorch figures in docs/benchmarks.md measure.
        #[arg(long, value_enum, default_value = "mdlm")]
        algo: Algo,
        /// Timed steps (after 2 warm-up steps).
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Sequences per forward/backward (gradients accumulate); default: the whole batch.
        #[arg(long)]
        micro_batch: Option<usize>,
        /// Autotune the cuBLASLt GEMMs on first use (training runs keep it off for
        /// bit-reproducibility).
        #[arg(long)]
        autotune: bool,
    },
    /// GPU SDTT distillation steps (K = 2, kl-bwd; random student and teacher): ms per step
    /// split into the teacher rollout and the student's forward/backward/update, tok/s, and
    /// the reference's cost (3 forwards + 1 backward) from our forward and backward times.
    Distill {
        #[arg(long, value_enum, default_value = "small")]
        preset: Preset,
        #[arg(long, value_enum, default_value = "owt")]
        shape: Shape,
        /// imdm: IM-SDTT (IMDM student and teacher); mdlm: SDTT.
        #[arg(long, value_enum, default_value = "imdm")]
        algo: Algo,
        /// Timed steps (after 1 warm-up step).
        #[arg(long, default_value_t = 2)]
        steps: usize,
        /// Sequences per rollout and forward/backward (the host holds three B·L·V f32 arrays
        /// of a micro-batch during its rollout).
        #[arg(long, default_value_t = 8)]
        micro_batch: usize,
    },
}

fn write_json(path: &Option<PathBuf>, value: serde_json::Value) -> Result<()> {
    if let Some(p) = path {
        let text = serde_json::to_string_pretty(&value).expect("json");
        crate::outputs::write_bytes(p, text.as_bytes())?;
        println!("wrote {}", p.display());
    }
    Ok(())
}

pub fn run(a: BenchArgs) -> Result<()> {
    let gpu = Gpu::new(0).map_err(|e| match e {
        Error::NoDevice(m) => {
            Error::NoDevice(format!("{m}; `imdm-engine bench` measures the GPU only"))
        }
        Error::NoKernels => Error::Config(format!(
            "{}; `imdm-engine bench` measures the GPU only",
            Error::NoKernels
        )),
        e => e,
    })?;
    let device = gpu.name();
    println!("device: {device}");
    let trace = a.trace.clone();
    if trace.is_some() {
        crate::cuda::trace::start(&gpu.ctx, &gpu.stream)?;
    }
    run_what(a, gpu)?;
    if let Some(p) = &trace {
        let (spans, dropped) = crate::cuda::trace::finish()?;
        crate::cuda::trace::write(p, &spans, dropped, &device)?;
    }
    Ok(())
}

fn run_what(a: BenchArgs, gpu: Gpu) -> Result<()> {
    match a.what {
        BenchWhat::Kernels => {
            let rows = bench::kernels(&gpu)?;
            timing::print_table(&rows);
            write_json(
                &a.json,
                serde_json::json!({ "device": gpu.name(), "kernels": rows }),
            )
        }
        BenchWhat::Forward {
            preset,
            shape,
            algo,
        } => {
            let r = bench::forward(&gpu, preset, shape, algo)?;
            println!(
                "{} {} {} B={} L={} V={}: {:.2} ms to logits ({:.1} TFLOP/s on {:.2} TFLOP), \
                 {:.2} ms with SUBS log-softmax; model + workspace {:.1} GiB",
                r.preset,
                r.algo,
                r.shape,
                r.batch,
                r.len,
                r.vocab,
                r.ms_logits,
                r.tflops,
                r.tflop,
                r.ms_subs,
                r.memory_gib
            );
            write_json(
                &a.json,
                serde_json::json!({ "device": gpu.name(), "forward": r }),
            )
        }
        BenchWhat::Sample {
            preset,
            shape,
            steps,
            algo,
        } => {
            if steps == 0 {
                return Err(Error::Config("--steps must be at least 1".into()));
            }
            let r = bench::sample::sample(&gpu, preset, shape, algo, steps)?;
            bench::sample::print(&r);
            write_json(
                &a.json,
                serde_json::json!({ "device": gpu.name(), "sample": r }),
            )
        }
        BenchWhat::Train {
            preset,
            shape,
            algo,
            steps,
            micro_batch,
            autotune,
        } => {
            let name = gpu.name();
            let r = bench::train::train(gpu, preset, shape, algo, steps, micro_batch, autotune)?;
            bench::train::print(&r);
            write_json(&a.json, serde_json::json!({ "device": name, "train": r }))
        }
        BenchWhat::Distill {
            preset,
            shape,
            algo,
            steps,
            micro_batch,
        } => {
            let name = gpu.name();
            let r = bench::distill::distill(gpu, preset, shape, algo, steps, micro_batch)?;
            bench::distill::print(&r);
            write_json(&a.json, serde_json::json!({ "device": name, "distill": r }))
        }
    }
}
