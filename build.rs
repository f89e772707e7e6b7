//! Compiles every `kernels/*.cu` and `kernels/dev/*.cu` (kernels kept only to check others) to
//! PTX with nvcc, assembles that PTX to SASS (a cubin, `ptxas -arch=$IMDM_CUDA_ARCH`, the same as
//! `-gencode=arch=compute_90a,code=sm_90a` for the default) and embeds both
//! (`$OUT_DIR/kernels.rs`); a module is named by its file stem. The device loads the cubin (no JIT
//! at start-up) and falls back to the PTX where the cubin does not load (another GPU).
//!
//! nvcc is looked up in this order: `$NVCC`, `$CUDA_HOME/bin/nvcc`, the repo-local toolchain
//! that `scripts/setup-cuda.sh` installs (`.cuda/nvidia/cu13/bin/nvcc`), then `PATH`. The target
//! is `$IMDM_CUDA_ARCH` (default `sm_90a`, H100/H200). Only kernels whose PTX is older than their
//! source (or than any `kernels/*.cuh`) are recompiled. Without nvcc the crate still builds,
//! with a warning, and the GPU backend reports `Error::NoKernels` at run time.
//!
//! Whether or not nvcc exists, the integer `#define`s and `static_assert(sizeof(T) == N)` of the
//! kernel sources are written to `$OUT_DIR/kernel_defines.rs`, so tests can assert that every
//! constant the launchers mirror (block sizes, params-struct sizes) equals the kernel's.

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

/// `(file, name, value)` of every `#define NAME <integer>` and `(file, type, bytes)` of every
/// `static_assert(sizeof(T) == N` in the kernel sources.
fn kernel_defines(files: &[PathBuf]) -> String {
    let int = |t: &str| -> Option<u64> {
        let t = t.trim_end_matches(['u', 'U']);
        match t.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16).ok(),
            None => t.parse().ok(),
        }
    };
    let (mut defines, mut sizes) = (String::new(), String::new());
    for f in files {
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        for line in fs::read_to_string(f).unwrap_or_default().lines() {
            let mut w = line.split_whitespace();
            if let (Some("#define"), Some(k), Some(v)) = (w.next(), w.next(), w.next()) {
                if let Some(v) = int(v) {
                    defines.push_str(&format!("    ({name:?}, {k:?}, {v}),\n"));
                }
            }
            if let Some(rest) = line.trim().strip_prefix("static_assert(sizeof(") {
                let (ty, rest) = rest.split_once(')').unwrap_or(("", ""));
                let n = rest
                    .trim_start_matches([' ', '='])
                    .split([',', ' ', ')'])
                    .next();
                if let Some(n) = n.and_then(int) {
                    sizes.push_str(&format!("    ({name:?}, {ty:?}, {n}),\n"));
                }
            }
        }
    }
    format!(
        "/// (file, name, value) of every integer `#define` in kernels/.\n\
         pub const DEFINES: &[(&str, &str, u64)] = &[\n{defines}];\n\
         /// (file, type, bytes) of every `static_assert(sizeof(T) == N)` in kernels/.\n\
         pub const SIZES: &[(&str, &str, u64)] = &[\n{sizes}];\n"
    )
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

    let list = |dir: &Path| -> Vec<PathBuf> {
        fs::read_dir(dir)
            .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    let has_ext = |p: &Path, ext: &str| p.extension().is_some_and(|e| e == ext);
    let mut sources: Vec<PathBuf> = list(&kdir)
        .into_iter()
        .chain(list(&kdir.join("dev")))
        .filter(|p| has_ext(p, "cu"))
        .collect();
    sources.sort();
    let header_time = list(&kdir)
        .iter()
        .filter(|p| has_ext(p, "cuh"))
        .map(|p| mtime(p))
        .max()
        .unwrap_or(SystemTime::UNIX_EPOCH);
    {
        let mut stems: Vec<_> = sources.iter().map(|p| p.file_stem().unwrap()).collect();
        stems.sort();
        let n = stems.len();
        stems.dedup();
        assert_eq!(
            n,
            stems.len(),
            "two kernel files share a module name (file stem)"
        );
    }

    let headers: Vec<PathBuf> = list(&kdir)
        .into_iter()
        .filter(|p| has_ext(p, "cuh"))
        .collect();
    let all: Vec<PathBuf> = headers.iter().chain(&sources).cloned().collect();
    fs::write(out.join("kernel_defines.rs"), kernel_defines(&all)).unwrap();

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
                let stale = stale || !out.join(format!("{stem}.cubin")).exists();
                let arch_stamp = out.join(format!("{stem}.arch"));
                let cubin = out.join(format!("{stem}.cubin"));
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
                    // ptxas sits beside nvcc in every CUDA layout; the cubin is optional (the PTX
                    // still loads by JIT), so a missing ptxas is a warning.
                    let ptxas = nvcc.with_file_name("ptxas");
                    let res = Command::new(&ptxas)
                        .arg(format!("-arch={arch}"))
                        .arg("-O3")
                        .arg("-o")
                        .arg(&cubin)
                        .arg(&ptx)
                        .output();
                    match res {
                        Ok(r) if r.status.success() => {}
                        Ok(r) => panic!(
                            "ptxas failed on {}:\n{}",
                            ptx.display(),
                            String::from_utf8_lossy(&r.stderr)
                        ),
                        Err(e) => {
                            println!(
                                "cargo:warning=no cubin for {stem}: could not run {}: {e}",
                                ptxas.display()
                            );
                            let _ = fs::remove_file(&cubin);
                        }
                    }
                    fs::write(&arch_stamp, &arch).unwrap();
                }
                entries.push((stem, ptx, cubin));
            }
        }
    }

    let mut code = String::from(
        "/// (module name, PTX source) for every kernels/*.cu and kernels/dev/*.cu, compiled by \
         build.rs.\n\
         pub const PTX: &[(&str, &str)] = &[\n",
    );
    for (stem, ptx, _) in &entries {
        code.push_str(&format!(
            "    ({stem:?}, include_str!({:?})),\n",
            ptx.display().to_string()
        ));
    }
    code.push_str("];\n");
    code.push_str(
        "/// (module name, SASS cubin for ARCH) for every module whose PTX ptxas assembled.\n\
         pub const CUBIN: &[(&str, &[u8])] = &[\n",
    );
    for (stem, _, cubin) in &entries {
        if cubin.exists() {
            code.push_str(&format!(
                "    ({stem:?}, include_bytes!({:?})),\n",
                cubin.display().to_string()
            ));
        }
    }
    code.push_str("];\n");
    code.push_str(&format!(
        "/// Target architecture the PTX was built for.\npub const ARCH: &str = {arch:?};\n"
    ));
    fs::write(out.join("kernels.rs"), code).unwrap();
}
