//! Compiles every `kernels/*.cu` to PTX with nvcc and embeds it (`$OUT_DIR/kernels.rs`).
//!
//! nvcc is looked up in this order: `$NVCC`, `$CUDA_HOME/bin/nvcc`, the repo-local toolchain
//! that `scripts/setup-cuda.sh` installs (`.cuda/nvidia/cu13/bin/nvcc`), then `PATH`. The target
//! is `$IMDM_CUDA_ARCH` (default `sm_90a`, H100/H200). Only kernels whose PTX is older than their
//! source (or than `kernels/common.cuh`) are recompiled. Without nvcc the crate still builds,
//! with a warning, and the GPU backend reports `Error::NoKernels` at run time.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

fn find_nvcc(root: &Path) -> Option<PathBuf> {
    if let Ok(p) = env::var("NVCC") {
        return Some(PathBuf::from(p));
    }
    if let Ok(h) = env::var("CUDA_HOME") {
        let p = Path::new(&h).join("bin/nvcc");
        if p.exists() {
            return Some(p);
        }
    }
    let local = root.join(".cuda/nvidia/cu13/bin/nvcc");
    if local.exists() {
        return Some(local);
    }
    env::var_os("PATH").and_then(|paths| {
        env::split_paths(&paths)
            .map(|d| d.join("nvcc"))
            .find(|p| p.is_file())
    })
}

fn mtime(p: &Path) -> SystemTime {
    fs::metadata(p)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

fn main() {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let kdir = root.join("kernels");
    println!("cargo:rerun-if-changed=kernels");
    for var in [
        "NVCC",
        "CUDA_HOME",
        "IMDM_CUDA_ARCH",
        "IMDM_EXPECT_KERNELS",
        "PATH",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=.cuda/.installed");

    let mut sources: Vec<PathBuf> = fs::read_dir(&kdir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    sources.retain(|p| p.extension().is_some_and(|e| e == "cu"));
    sources.sort();
    let header_time = mtime(&kdir.join("common.cuh"));

    let nvcc = find_nvcc(&root);
    let arch = env::var("IMDM_CUDA_ARCH").unwrap_or_else(|_| "sm_90a".to_string());
    let mut entries = Vec::new();
    match &nvcc {
        None if env::var("IMDM_EXPECT_KERNELS").is_ok_and(|v| v == "1") => {
            panic!("IMDM_EXPECT_KERNELS=1 but nvcc was not found (run scripts/setup-cuda.sh)")
        }
        None => println!(
            "cargo:warning=nvcc not found: building without CUDA kernels \
             (run scripts/setup-cuda.sh, or set NVCC / CUDA_HOME, then rebuild)"
        ),
        Some(nvcc) => {
            // The wheel layout keeps CUDA headers next to bin/.
            let include = nvcc
                .parent()
                .and_then(|b| b.parent())
                .map(|p| p.join("include"));
            for src in &sources {
                println!("cargo:rerun-if-changed={}", src.display());
                let stem = src.file_stem().unwrap().to_string_lossy().to_string();
                let ptx = out.join(format!("{stem}.ptx"));
                let stale = mtime(&ptx) < mtime(src).max(header_time) || !ptx.exists();
                let arch_stamp = out.join(format!("{stem}.arch"));
                let arch_changed = fs::read_to_string(&arch_stamp).ok().as_deref() != Some(&arch);
                if stale || arch_changed {
                    let mut cmd = Command::new(nvcc);
                    cmd.args(["-ptx", "-O3", "-std=c++17", "-lineinfo"])
                        .arg(format!("-arch={arch}"))
                        .arg("-I")
                        .arg(&kdir);
                    if let Some(inc) = include.as_ref().filter(|p| p.exists()) {
                        cmd.arg("-I").arg(inc);
                    }
                    cmd.arg("-o").arg(&ptx).arg(src);
                    let res = cmd.output().unwrap_or_else(|e| {
                        panic!("could not run nvcc at {}: {e}", nvcc.display())
                    });
                    if !res.status.success() {
                        panic!(
                            "nvcc failed on {}:\n{}{}",
                            src.display(),
                            String::from_utf8_lossy(&res.stdout),
                            String::from_utf8_lossy(&res.stderr)
                        );
                    }
                    fs::write(&arch_stamp, &arch).unwrap();
                }
                entries.push((stem, ptx));
            }
        }
    }

    let mut code = String::from(
        "/// (module name, PTX source) for every kernels/*.cu, compiled by build.rs.\n\
         pub const PTX: &[(&str, &str)] = &[\n",
    );
    for (stem, ptx) in &entries {
        code.push_str(&format!(
            "    ({stem:?}, include_str!({:?})),\n",
            ptx.display().to_string()
        ));
    }
    code.push_str("];\n");
    code.push_str(&format!(
        "/// Target architecture the PTX was built for.\npub const ARCH: &str = {arch:?};\n"
    ));
    fs::write(out.join("kernels.rs"), code).unwrap();
}
