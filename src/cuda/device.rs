//! The CUDA backend: device context, stream, the embedded PTX modules and kernel lookup, on
//! cudarc with dynamic loading (no CUDA library is needed to build, only to run on a GPU).

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;

use crate::error::{Error, Result};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// PTX modules embedded at build time: (module name, PTX text).
pub const PTX: &[(&str, &str)] = embedded::PTX;
/// The architecture the PTX targets (`IMDM_CUDA_ARCH` at build time).
pub const ARCH: &str = embedded::ARCH;
/// SASS (cubin) for `ARCH` of every module ptxas assembled at build time: (module name, bytes).
pub const CUBIN: &[(&str, &[u8])] = embedded::CUBIN;

/// How a module was loaded: SASS needs no JIT; PTX is compiled by the driver at load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleCode {
    Cubin,
    Ptx,
}

/// Where to run: the `--device` flag of every subcommand.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceChoice {
    /// The CPU reference path.
    Cpu,
    /// The GPU; an error if there is none or the binary has no kernels.
    Cuda,
    /// The GPU when a device and kernels exist, else the CPU.
    Auto,
}

/// An open CUDA device with every kernel module loaded.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    modules: HashMap<&'static str, Arc<CudaModule>>,
    loaded_as: Vec<(&'static str, ModuleCode)>,
}

impl Gpu {
    /// Opens device `ordinal` and loads all embedded PTX. Fails cleanly (never panics) when the
    /// binary has no kernels, the driver library is absent, or there is no device.
    pub fn new(ordinal: usize) -> Result<Self> {
        if PTX.is_empty() {
            return Err(Error::NoKernels);
        }
        // cudarc panics if the driver library is missing, so look for it first.
        // SAFETY: this only tries to dlopen the driver library by its candidate names.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::NoDevice(
                "the CUDA driver library (libcuda.so) was not found".into(),
            ));
        }
        let n = CudaContext::device_count()?;
        if n as usize <= ordinal {
            return Err(Error::NoDevice(format!(
                "device {ordinal} requested, {n} device(s) present"
            )));
        }
        let ctx = CudaContext::new(ordinal)?;
        let stream = ctx.default_stream();
        let mut modules = HashMap::new();
        let mut loaded_as = Vec::new();
        let mut warned = false;
        for (name, src) in PTX {
            let cubin = CUBIN.iter().find(|(n, _)| n == name).map(|(_, b)| *b);
            let from_cubin =
                cubin.and_then(|b| match ctx.load_module(Ptx::from_binary(b.to_vec())) {
                    Ok(m) => Some(m),
                    Err(e) => {
                        if !warned {
                            eprintln!(
                                "imdm: the {ARCH} SASS of module {name} did not load ({e}); \
                             compiling the PTX instead (slower start-up)"
                            );
                            warned = true;
                        }
                        None
                    }
                });
            let (m, how) = match from_cubin {
                Some(m) => (m, ModuleCode::Cubin),
                None => {
                    let m = ctx.load_module(Ptx::from_src(*src)).map_err(|e| {
                        Error::Cuda(format!(
                            "loading PTX module {name} (built for {ARCH}) failed: {e}; \
                             PTX from a newer nvcc than the driver supports fails this way"
                        ))
                    })?;
                    (m, ModuleCode::Ptx)
                }
            };
            modules.insert(*name, m);
            loaded_as.push((*name, how));
        }
        Ok(Gpu {
            ctx,
            stream,
            modules,
            loaded_as,
        })
    }

    /// The kernel `function` of module `module` (the .cu file stem).
    pub fn function(&self, module: &str, function: &str) -> Result<CudaFunction> {
        let m = self
            .modules
            .get(module)
            .ok_or_else(|| Error::Cuda(format!("no PTX module named {module}")))?;
        m.load_function(function)
            .map_err(|e| Error::Cuda(format!("kernel {function} in module {module}: {e}")))
    }

    /// Device name as the driver reports it.
    pub fn name(&self) -> String {
        self.ctx
            .name()
            .unwrap_or_else(|_| "unknown CUDA device".into())
    }

    /// Peaks of this device (None: not known).
    pub fn peaks(&self) -> Option<DevicePeaks> {
        device_peaks(&self.name())
    }

    /// Dense bf16 tensor-core peak of this device in TFLOP/s, for MFU (None: not known).
    pub fn peak_bf16_tflops(&self) -> Option<f64> {
        peak_bf16_tflops(&self.name())
    }

    /// How each module was loaded (SASS or PTX by JIT), in load order.
    pub fn loaded_as(&self) -> &[(&'static str, ModuleCode)] {
        &self.loaded_as
    }

    /// Number of loaded modules.
    pub fn module_count(&self) -> usize {
        self.modules.len()
    }

    /// Waits for all queued work.
    pub fn sync(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }
}

/// The resolved backend for a `--device` choice.
pub enum Backend {
    Cpu,
    Cuda(Gpu),
}

impl Backend {
    /// `cpu` -> CPU; `cuda` -> the GPU or the reason it is unusable; `auto` -> the GPU if usable.
    pub fn resolve(choice: DeviceChoice) -> Result<Self> {
        match choice {
            DeviceChoice::Cpu => Ok(Backend::Cpu),
            DeviceChoice::Cuda => Gpu::new(0).map(Backend::Cuda),
            DeviceChoice::Auto => Ok(Gpu::new(0).map(Backend::Cuda).unwrap_or(Backend::Cpu)),
        }
    }
}

/// For GPU tests: the device, or `None` after printing "skipped: no CUDA device" — unless
/// `IMDM_REQUIRE_GPU=1`, where a missing device is a test failure (so nothing passes by
/// skipping on the GPU machine).
pub fn gpu_for_tests() -> Option<Gpu> {
    match Gpu::new(0) {
        Ok(g) => Some(g),
        Err(e) => {
            if std::env::var("IMDM_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("IMDM_REQUIRE_GPU=1 but the GPU is unusable: {e}");
            }
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    /// CI installs nvcc and sets IMDM_EXPECT_KERNELS=1: there a build without PTX is a failure,
    /// not a silent CPU-only binary.
    #[test]
    fn kernels_are_embedded_when_expected() {
        if std::env::var("IMDM_EXPECT_KERNELS").is_ok_and(|v| v == "1") {
            assert!(
                !super::PTX.is_empty(),
                "IMDM_EXPECT_KERNELS=1 but no PTX was embedded"
            );
            for (name, src) in super::PTX {
                assert!(src.contains(".entry"), "module {name} has no kernel entry");
            }
            // Every module has SASS beside its PTX, and it is an ELF image (the cubin format).
            for (name, _) in super::PTX {
                let cubin = super::CUBIN.iter().find(|(n, _)| n == name);
                let (_, bytes) = cubin.unwrap_or_else(|| panic!("module {name} has no cubin"));
                assert_eq!(
                    &bytes[..4],
                    b"\x7fELF",
                    "cubin of {name} is not an ELF image"
                );
            }
        }
    }

    /// Without a device (or without kernels) opening the GPU is an error, never a panic.
    #[test]
    fn opening_without_a_device_is_an_error_not_a_panic() {
        if let Err(e) = super::Gpu::new(0) {
            let msg = e.to_string();
            assert!(msg.contains("CUDA") || msg.contains("kernels"), "{msg}");
        }
    }
}

/// The denominators of the bench's percent-of-peak columns and of `train`'s MFU, per device.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DevicePeaks {
    /// Dense bf16 tensor-core peak, TFLOP/s (datasheet, SXM part).
    pub bf16_tflops: f64,
    /// Device-to-device copy bandwidth, GB/s (read + write), measured on that part; None where
    /// no measurement exists (the datasheet HBM figure is not reachable by a copy).
    pub copy_gbps: Option<f64>,
}

/// Peaks of a device by the name the driver reports (docs/benchmarks.md holds the sources).
/// None for devices not listed.
pub fn device_peaks(name: &str) -> Option<DevicePeaks> {
    const TABLE: [(&str, f64, Option<f64>); 4] = [
        ("H200", 989.0, Some(4300.0)),
        ("H100", 989.0, Some(3000.0)),
        ("A100", 312.0, None),
        ("L40S", 362.0, None),
    ];
    TABLE
        .iter()
        .find(|(k, _, _)| name.contains(k))
        .map(|&(_, bf16_tflops, copy_gbps)| DevicePeaks {
            bf16_tflops,
            copy_gbps,
        })
}

/// Dense bf16 tensor-core peak (TFLOP/s) of a device by its name: the denominator of the MFU that
/// `train` reports. None for devices not listed.
pub fn peak_bf16_tflops(name: &str) -> Option<f64> {
    device_peaks(name).map(|p| p.bf16_tflops)
}

#[cfg(test)]
mod peak_tests {
    #[test]
    fn peak_by_device_name() {
        assert_eq!(
            super::peak_bf16_tflops("NVIDIA H100 80GB HBM3"),
            Some(989.0)
        );
        assert_eq!(
            super::peak_bf16_tflops("NVIDIA A100-SXM4-80GB"),
            Some(312.0)
        );
        assert_eq!(super::peak_bf16_tflops("NVIDIA GeForce RTX 3090"), None);
    }

    /// The H200 shares the H100's compute but not its memory: the copy peaks differ.
    #[test]
    fn h100_and_h200_differ_in_copy_peak_only() {
        let h100 = super::device_peaks("NVIDIA H100 80GB HBM3").unwrap();
        let h200 = super::device_peaks("NVIDIA H200").unwrap();
        assert_eq!(h100.bf16_tflops, h200.bf16_tflops);
        assert_eq!(h100.copy_gbps, Some(3000.0));
        assert_eq!(h200.copy_gbps, Some(4300.0));
        assert_eq!(
            super::device_peaks("NVIDIA A100-SXM4-80GB")
                .unwrap()
                .copy_gbps,
            None
        );
    }
}
