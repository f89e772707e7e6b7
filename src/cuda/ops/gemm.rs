//! GEMMs through cuBLASLt (bf16 inputs, fp32 accumulation, bf16 or f32 output) with fused
//! epilogues: bias, and bias + GELU (saving the pre-activation for the backward). Not a kernel
//! of ours: cuBLASLt runs the H100's tensor cores better than a hand-written GEMM would, so this
//! module only plans, caches and launches; its CPU twin is a plain f64 matmul.
//!
//! Everything is row-major. `C (M, N) = op(A) · op(B)` with `op(A)` (M, K) and `op(B)` (K, N);
//! A is stored (M, K), or (K, M) when `ta`; B is stored (K, N), or (N, K) when `tb`. cuBLASLt is
//! column-major, so the call computes `C^T = op(B)^T · op(A)^T`: operands swap, M and N swap.
//! A linear layer `y = x W^T + b` (W stored (out, in) as PyTorch does) is
//! `matmul(y, x, false, W, true, rows, out, in)`.
//!
//! [`Gemm::matmul_strided`] (added for the training backward) also takes row strides `lda`,
//! `ldb` for the operands and accepts views (`CudaView`), so the fused SUBS loss's in-place
//! bf16 gradient over f32 logits (row stride `2 * ld`, see `kernels/subs.cu`) feeds the dW,
//! d-input and bias-sum GEMMs without a copy. Its key and plan carry the strides; the dense
//! entry points are unchanged.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use half::bf16;

use crate::cuda::Gpu;
use crate::error::{Error, Result};

/// Output element types the GEMMs write.
pub trait GemmOut: cudarc::driver::DeviceRepr {
    const CUDA: sys::cudaDataType;
}
impl GemmOut for bf16 {
    const CUDA: sys::cudaDataType = sys::cudaDataType::CUDA_R_16BF;
}
impl GemmOut for f32 {
    const CUDA: sys::cudaDataType = sys::cudaDataType::CUDA_R_32F;
}

/// The fused epilogue. Bias vectors have N elements (one per output column) and the output's
/// dtype; `aux` receives the pre-activation (M, N) for the GELU backward.
pub enum Epilogue<'a, T> {
    None,
    Bias(&'a CudaSlice<T>),
    /// `gelu(acc + bias)` with cuBLASLt's GELU (the tanh form; `tests::gelu_epilogue_is_tanh`
    /// checks this on the GPU, since the block MLPs need exactly that form).
    GeluBias {
        bias: &'a CudaSlice<T>,
        aux: Option<&'a mut CudaSlice<T>>,
    },
}

/// One planned problem: descriptors, the heuristic's candidate algorithms and the chosen one,
/// reused on every call.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    candidates: Vec<sys::cublasLtMatmulAlgo_t>,
    chosen: usize,
    tuned: bool,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: the handles were created by cuBLASLt for this plan and are destroyed once.
        unsafe {
            let _ = lt::destroy_matmul_desc(self.desc);
            for l in self.layouts {
                let _ = lt::destroy_matrix_layout(l);
            }
        }
    }
}

/// (M, N, K, ldc, ta, tb, output dtype, epilogue, accumulate, lda, ldb)
type Key = (
    usize,
    usize,
    usize,
    usize,
    bool,
    bool,
    i32,
    u32,
    bool,
    usize,
    usize,
);

/// How many heuristic candidates are timed on first use (autotuning).
const CANDIDATES: usize = 8;

/// A cuBLASLt handle, its workspace and the plan cache. One per [`Gpu`] stream.
pub struct Gemm {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    plans: Mutex<HashMap<Key, Plan>>,
    /// Time the heuristic's candidates on first use and keep the fastest (default). Off: always
    /// the heuristic's first candidate, so two `Gemm`s (two processes, a resumed run) pick the
    /// same algorithm and give bit-identical results; on, the timing can pick differently.
    autotune: bool,
}

const WORKSPACE: usize = 32 << 20;

fn lt_err(what: &str, e: lt::CublasError) -> Error {
    Error::Cuda(format!("cuBLASLt {what}: {e}"))
}

impl Gemm {
    pub fn new(gpu: &Gpu) -> Result<Self> {
        // cudarc panics when libcublasLt is missing; report it instead.
        // SAFETY: this only tries to dlopen the library by its candidate names.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::Cuda("libcublasLt was not found".into()));
        }
        gpu.ctx.bind_to_thread()?;
        let handle = lt::create_handle().map_err(|e| lt_err("create handle", e))?;
        Ok(Gemm {
            handle,
            workspace: gpu.stream.alloc_zeros::<u8>(WORKSPACE)?,
            plans: Mutex::new(HashMap::new()),
            autotune: true,
        })
    }

    /// Turns first-use autotuning on or off (see the field). Training turns it off so that
    /// runs and resumed runs are bit-reproducible across processes.
    pub fn set_autotune(&mut self, on: bool) {
        self.autotune = on;
    }

    #[allow(clippy::too_many_arguments)]
    fn plan(
        &self,
        key: Key,
        out: sys::cudaDataType,
        epilogue: sys::cublasLtEpilogue_t,
    ) -> Result<Plan> {
        let (m, n, k, ldc, ta, tb, _, _, _, lda, ldb) = key;
        let bf = sys::cudaDataType::CUDA_R_16BF;
        // Column-major view: first operand is B (N x K after op), second is A.
        let (b_rows, b_cols) = if tb { (k, n) } else { (n, k) };
        let (a_rows, a_cols) = if ta { (m, k) } else { (k, m) };
        let mk = |t, r: usize, c: usize, ld: usize| {
            lt::create_matrix_layout(t, r as u64, c as u64, ld as i64)
                .map_err(|e| lt_err("matrix layout", e))
        };
        // A row-major operand with row stride ld is a column-major one with leading dim ld.
        let layouts = [
            mk(bf, b_rows, b_cols, ldb)?,
            mk(bf, a_rows, a_cols, lda)?,
            mk(out, n, m, ldc)?,
        ];
        let desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )
        .map_err(|e| lt_err("matmul desc", e))?;
        let mut plan = Plan {
            desc,
            layouts,
            candidates: Vec::new(),
            chosen: 0,
            tuned: false,
        };
        // cublasOperation_t as i32: 0 = N, 1 = T.
        let op = |t: bool| t as i32;
        // SAFETY: each attribute value is a live local of the type cuBLASLt documents for it.
        unsafe {
            let set = |attr, p: *const c_void, size: usize| {
                lt::set_matmul_desc_attribute(plan.desc, attr, p, size)
                    .map_err(|e| lt_err("desc attribute", e))
            };
            let (opb, opa) = (op(tb), op(ta));
            set(
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                &opb as *const _ as *const c_void,
                std::mem::size_of_val(&opb),
            )?;
            set(
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                &opa as *const _ as *const c_void,
                std::mem::size_of_val(&opa),
            )?;
            set(
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
                &epilogue as *const _ as *const c_void,
                std::mem::size_of_val(&epilogue),
            )?;
            let pref = lt::create_matmul_pref().map_err(|e| lt_err("preference", e))?;
            let ws = WORKSPACE;
            lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const _ as *const c_void,
                std::mem::size_of_val(&ws),
            )
            .map_err(|e| lt_err("preference", e))?;
            // SAFETY (zeroed): plain-old-data results that the call overwrites.
            let mut results: [sys::cublasLtMatmulHeuristicResult_t; CANDIDATES] =
                std::mem::zeroed();
            let mut count = 0i32;
            let status = sys::cublasLtMatmulAlgoGetHeuristic(
                self.handle,
                plan.desc,
                plan.layouts[0],
                plan.layouts[1],
                plan.layouts[2],
                plan.layouts[2],
                pref,
                CANDIDATES as i32,
                results.as_mut_ptr(),
                &mut count,
            );
            let _ = lt::destroy_matmul_pref(pref);
            status
                .result()
                .map_err(|e| lt_err(&format!("heuristic for M={m} N={n} K={k}"), e))?;
            plan.candidates = results[..count.max(0) as usize]
                .iter()
                .filter(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
                .map(|r| r.algo)
                .collect();
            if plan.candidates.is_empty() {
                return Err(Error::Cuda(format!(
                    "cuBLASLt has no algorithm for M={m} N={n} K={k} ldc={ldc}"
                )));
            }
        }
        Ok(plan)
    }

    /// `C = op(A) · op(B)` (+ `beta · C` when `beta != 0`, for gradient accumulation) with an
    /// optional fused epilogue. Shapes are checked against every buffer before launching.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul<T: GemmOut>(
        &self,
        gpu: &Gpu,
        c: &mut CudaSlice<T>,
        a: &CudaSlice<bf16>,
        ta: bool,
        b: &CudaSlice<bf16>,
        tb: bool,
        (m, n, k): (usize, usize, usize),
        beta: f32,
        epi: Epilogue<'_, T>,
    ) -> Result<()> {
        self.matmul_ld(gpu, c, a, ta, b, tb, (m, n, k), n, beta, epi)
    }

    /// As [`Gemm::matmul`] with C's row stride `ldc >= N` (columns N..ldc are left alone).
    /// Padding rows to a multiple of 64 elements keeps every row 16-byte aligned, which
    /// cuBLASLt needs for its fast kernels (3-4x faster logits at V = 50258).
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_ld<T: GemmOut>(
        &self,
        gpu: &Gpu,
        c: &mut CudaSlice<T>,
        a: &CudaSlice<bf16>,
        ta: bool,
        b: &CudaSlice<bf16>,
        tb: bool,
        (m, n, k): (usize, usize, usize),
        ldc: usize,
        beta: f32,
        epi: Epilogue<'_, T>,
    ) -> Result<()> {
        if a.len() != m * k || b.len() != k * n || c.len() != m * ldc || ldc < n {
            return Err(Error::Shape(format!(
                "gemm M={m} N={n} K={k} ldc={ldc}: A has {}, B {}, C {} elements \
                 (expected {}, {}, {})",
                a.len(),
                b.len(),
                c.len(),
                m * k,
                k * n,
                m * ldc
            )));
        }
        let (lda, ldb) = (if ta { m } else { k }, if tb { k } else { n });
        self.launch(gpu, c, a, lda, ta, b, ldb, tb, (m, n, k), ldc, beta, epi)
    }

    /// The general form: `C = op(A) · op(B) (+ beta · C)` where A is stored row-major with row
    /// stride `lda` ((M, K) rows of K, or (K, M) rows of M when `ta`) and B with row stride
    /// `ldb` ((K, N), or (N, K) when `tb`); A and B may be views (`CudaView`) and hold at least
    /// `(rows - 1) · ld + cols` elements. C is (M, ldc) as in [`Gemm::matmul_ld`].
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_strided<T: GemmOut, A: DevicePtr<bf16>, B: DevicePtr<bf16>>(
        &self,
        gpu: &Gpu,
        c: &mut CudaSlice<T>,
        a: &A,
        lda: usize,
        ta: bool,
        b: &B,
        ldb: usize,
        tb: bool,
        (m, n, k): (usize, usize, usize),
        ldc: usize,
        beta: f32,
        epi: Epilogue<'_, T>,
    ) -> Result<()> {
        // (rows, cols) of each operand as stored.
        let (ar, ac) = if ta { (k, m) } else { (m, k) };
        let (br, bc) = if tb { (n, k) } else { (k, n) };
        let need = |r: usize, c: usize, ld: usize| if r == 0 { 0 } else { (r - 1) * ld + c };
        if lda < ac
            || ldb < bc
            || ldc < n
            || a.len() < need(ar, ac, lda)
            || b.len() < need(br, bc, ldb)
            || c.len() != m * ldc
        {
            return Err(Error::Shape(format!(
                "gemm M={m} N={n} K={k} lda={lda} ldb={ldb} ldc={ldc} (ta={ta}, tb={tb}): A has \
                 {} elements (needs {} with lda >= {ac}), B {} (needs {} with ldb >= {bc}), C {} \
                 (expected {})",
                a.len(),
                need(ar, ac, lda),
                b.len(),
                need(br, bc, ldb),
                c.len(),
                m * ldc
            )));
        }
        self.launch(gpu, c, a, lda, ta, b, ldb, tb, (m, n, k), ldc, beta, epi)
    }

    /// Plans (cached) and runs one checked problem.
    #[allow(clippy::too_many_arguments)]
    fn launch<T: GemmOut, A: DevicePtr<bf16>, B: DevicePtr<bf16>>(
        &self,
        gpu: &Gpu,
        c: &mut CudaSlice<T>,
        a: &A,
        lda: usize,
        ta: bool,
        b: &B,
        ldb: usize,
        tb: bool,
        (m, n, k): (usize, usize, usize),
        ldc: usize,
        beta: f32,
        epi: Epilogue<'_, T>,
    ) -> Result<()> {
        let (epi_kind, bias, aux) = match epi {
            Epilogue::None => (
                sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT,
                None,
                None,
            ),
            Epilogue::Bias(b) => (
                sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
                Some(b),
                None,
            ),
            Epilogue::GeluBias { bias, aux: None } => (
                sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_BIAS,
                Some(bias),
                None,
            ),
            Epilogue::GeluBias { bias, aux: Some(x) } => (
                sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_AUX_BIAS,
                Some(bias),
                Some(x),
            ),
        };
        if let Some(bias) = bias {
            if bias.len() != n {
                return Err(Error::Shape(format!(
                    "gemm bias has {} elements, N is {n}",
                    bias.len()
                )));
            }
        }
        if let Some(x) = &aux {
            if x.len() != m * n || n % 8 != 0 || ldc != n {
                return Err(Error::Shape(format!(
                    "gemm GELU aux has {} elements for M={m} N={n} (N must be a multiple of 8, \
                     C dense)",
                    x.len()
                )));
            }
        }
        let key: Key = (
            m,
            n,
            k,
            ldc,
            ta,
            tb,
            T::CUDA as i32,
            epi_kind as u32,
            beta != 0.0,
            lda,
            ldb,
        );
        let mut plans = self.plans.lock().expect("gemm plan cache poisoned");
        if !plans.contains_key(&key) {
            let p = self.plan(key, T::CUDA, epi_kind)?;
            plans.insert(key, p);
        }
        let plan = plans.get_mut(&key).expect("planned");
        let s = &gpu.stream;
        let (pa, _ra) = a.device_ptr(s);
        let (pb, _rb) = b.device_ptr(s);
        let (pw, _rw) = self.workspace.device_ptr(s);
        let bias_ptr = bias.map(|b| b.device_ptr(s));
        let mut aux = aux;
        let aux_ptr = aux.as_mut().map(|x| x.device_ptr_mut(s));
        let (pc, _rc) = c.device_ptr_mut(s);
        // SAFETY: the plan's layouts describe exactly the checked buffer sizes; bias/aux pointers
        // are set on the plan's descriptor right before the call, on this thread, under the lock;
        // the workspace outlives the call, and all pointers belong to `gpu`'s context.
        unsafe {
            if let Some((p, _)) = &bias_ptr {
                lt::set_matmul_desc_attribute(
                    plan.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    p as *const _ as *const c_void,
                    std::mem::size_of_val(p),
                )
                .map_err(|e| lt_err("bias pointer", e))?;
            }
            if let Some((p, _)) = &aux_ptr {
                let ld = n as i64;
                lt::set_matmul_desc_attribute(
                    plan.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER,
                    p as *const _ as *const c_void,
                    std::mem::size_of_val(p),
                )
                .map_err(|e| lt_err("aux pointer", e))?;
                lt::set_matmul_desc_attribute(
                    plan.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD,
                    &ld as *const _ as *const c_void,
                    std::mem::size_of_val(&ld),
                )
                .map_err(|e| lt_err("aux ld", e))?;
            }
            let run = |algo: &sys::cublasLtMatmulAlgo_t| {
                let alpha = 1f32;
                lt::matmul(
                    self.handle,
                    plan.desc,
                    &alpha as *const f32 as *const c_void,
                    &beta as *const f32 as *const c_void,
                    pb as *const c_void,
                    plan.layouts[0],
                    pa as *const c_void,
                    plan.layouts[1],
                    pc as *const c_void,
                    plan.layouts[2],
                    pc as *mut c_void,
                    plan.layouts[2],
                    algo,
                    pw as *mut c_void,
                    WORKSPACE,
                    s.cu_stream() as sys::cudaStream_t,
                )
                .map_err(|e| lt_err(&format!("matmul M={m} N={n} K={k}"), e))
            };
            // Autotune on first use (unless turned off): time every candidate on the real
            // buffers. Only when the call overwrites C (beta = 0): the timing runs write C (and
            // aux) before the real one.
            if self.autotune && !plan.tuned && beta == 0.0 && plan.candidates.len() > 1 {
                plan.chosen = self.tune(gpu, &plan.candidates, run)?;
            }
            plan.tuned = true;
            run(&plan.candidates[plan.chosen])?;
        }
        Ok(())
    }

    /// Index of the fastest candidate (median of 3 timed runs each, after one warm-up);
    /// candidates that fail to launch are skipped.
    fn tune(
        &self,
        gpu: &Gpu,
        candidates: &[sys::cublasLtMatmulAlgo_t],
        run: impl Fn(&sys::cublasLtMatmulAlgo_t) -> Result<()>,
    ) -> Result<usize> {
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let (start, stop) = (gpu.ctx.new_event(flags)?, gpu.ctx.new_event(flags)?);
        let mut best = (f32::INFINITY, 0usize);
        for (i, algo) in candidates.iter().enumerate() {
            if run(algo).is_err() {
                continue;
            }
            let mut times = [0f32; 3];
            for t in &mut times {
                start.record(&gpu.stream)?;
                run(algo)?;
                stop.record(&gpu.stream)?;
                stop.synchronize()?;
                *t = start.elapsed_ms(&stop)?;
            }
            times.sort_by(|a, b| a.total_cmp(b));
            if times[1] < best.0 {
                best = (times[1], i);
            }
        }
        Ok(best.1)
    }
}

impl Drop for Gemm {
    fn drop(&mut self) {
        self.plans.lock().map(|mut p| p.clear()).ok();
        // SAFETY: the handle was created in `new` and is destroyed once, after its plans.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

/// FLOPs of one GEMM (2·M·N·K).
pub fn flops(m: usize, n: usize, k: usize) -> f64 {
    2.0 * m as f64 * n as f64 * k as f64
}

/// CPU twin: row-major `op(A) · op(B)` with f64 accumulation.
pub mod cpu {
    use rayon::prelude::*;

    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        a: &[f32],
        ta: bool,
        b: &[f32],
        tb: bool,
        m: usize,
        n: usize,
        k: usize,
    ) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        c.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
            for (j, out) in row.iter_mut().enumerate() {
                let mut acc = 0f64;
                for p in 0..k {
                    let av = if ta { a[p * m + i] } else { a[i * k + p] };
                    let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                    acc += av as f64 * bv as f64;
                }
                *out = acc as f32;
            }
        });
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::gpu_for_tests;
    use crate::model::dit_ref::{gelu_exact, gelu_tanh};
    use crate::testing::{assert_close, compare, Tol};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Random values already rounded to bf16, so the twin sees exactly the GPU's inputs.
    fn rand_bf16(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| bf16::from_f32(rng.random_range(-scale..scale)).to_f32())
            .collect()
    }

    fn to_dev(gpu: &Gpu, v: &[f32]) -> CudaSlice<bf16> {
        let h: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
        gpu.stream.clone_htod(&h).unwrap()
    }

    #[test]
    fn twin_transposes_agree() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let (m, n, k) = (3, 5, 4);
        let a = rand_bf16(&mut rng, m * k, 1.0);
        let b = rand_bf16(&mut rng, k * n, 1.0);
        let c = cpu::matmul(&a, false, &b, false, m, n, k);
        // Transposed storage of the same matrices gives the same product.
        let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        assert_eq!(c, cpu::matmul(&at, true, &bt, true, m, n, k));
        // Identity.
        let eye: Vec<f32> = (0..k * k)
            .map(|i| if i / k == i % k { 1.0 } else { 0.0 })
            .collect();
        assert_eq!(cpu::matmul(&a, false, &eye, false, m, k, k), a);
    }

    #[test]
    fn gpu_matches_twin() {
        let Some(gpu) = gpu_for_tests() else { return };
        let g = Gemm::new(&gpu).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        // (M, N, K): DiT-small qkv / MLP / logits-like and awkward shapes.
        for &(m, n, k) in &[
            (256, 2304, 768),
            (128, 768, 3072),
            (77, 1000, 768),
            (7, 24, 40),
            (1, 8, 16),
        ] {
            for (ta, tb) in [(false, true), (false, false), (true, false)] {
                let a = rand_bf16(&mut rng, m * k, 1.0);
                let b = rand_bf16(&mut rng, k * n, 1.0);
                let want = cpu::matmul(&a, ta, &b, tb, m, n, k);
                let mut c32 = gpu.stream.alloc_zeros::<f32>(m * n).unwrap();
                g.matmul(
                    &gpu,
                    &mut c32,
                    &to_dev(&gpu, &a),
                    ta,
                    &to_dev(&gpu, &b),
                    tb,
                    (m, n, k),
                    0.0,
                    Epilogue::None,
                )
                .unwrap();
                let got = gpu.stream.clone_dtoh(&c32).unwrap();
                // Exact bf16 inputs: only fp32 accumulation order differs.
                let tol = Tol {
                    abs: 1e-4 * (k as f64).sqrt(),
                    rel: 1e-4,
                };
                assert_close(
                    &format!("gemm f32 {m}x{n}x{k} ta={ta} tb={tb}"),
                    &got,
                    &want,
                    tol,
                );
                // beta = 1 accumulates into C.
                g.matmul(
                    &gpu,
                    &mut c32,
                    &to_dev(&gpu, &a),
                    ta,
                    &to_dev(&gpu, &b),
                    tb,
                    (m, n, k),
                    1.0,
                    Epilogue::None,
                )
                .unwrap();
                let twice: Vec<f32> = want.iter().map(|x| 2.0 * x).collect();
                assert_close(
                    "gemm beta=1",
                    &gpu.stream.clone_dtoh(&c32).unwrap(),
                    &twice,
                    Tol {
                        abs: 2.0 * tol.abs,
                        rel: tol.rel,
                    },
                );
                // bf16 output with bias.
                let bias = rand_bf16(&mut rng, n, 1.0);
                let mut c16 = gpu.stream.alloc_zeros::<bf16>(m * n).unwrap();
                let db = to_dev(&gpu, &bias);
                g.matmul(
                    &gpu,
                    &mut c16,
                    &to_dev(&gpu, &a),
                    ta,
                    &to_dev(&gpu, &b),
                    tb,
                    (m, n, k),
                    0.0,
                    Epilogue::Bias(&db),
                )
                .unwrap();
                let got: Vec<f32> = gpu
                    .stream
                    .clone_dtoh(&c16)
                    .unwrap()
                    .iter()
                    .map(|x| x.to_f32())
                    .collect();
                let want_b: Vec<f32> = want
                    .iter()
                    .enumerate()
                    .map(|(i, x)| x + bias[i % n])
                    .collect();
                assert_close(
                    &format!("gemm bf16+bias {m}x{n}x{k}"),
                    &got,
                    &want_b,
                    Tol::BF16,
                );
            }
        }
    }

    /// A padded output stride writes only the first N columns of each row.
    #[test]
    fn strided_output_leaves_padding_alone() {
        let Some(gpu) = gpu_for_tests() else { return };
        let g = Gemm::new(&gpu).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (m, n, k, ldc) = (33, 50, 64, 64);
        let a = rand_bf16(&mut rng, m * k, 1.0);
        let b = rand_bf16(&mut rng, n * k, 1.0);
        let bias = rand_bf16(&mut rng, n, 1.0);
        let want = cpu::matmul(&a, false, &b, true, m, n, k);
        let mut c = gpu.stream.clone_htod(&vec![7.0f32; m * ldc]).unwrap();
        let db = gpu.stream.clone_htod(&bias).unwrap();
        g.matmul_ld(
            &gpu,
            &mut c,
            &to_dev(&gpu, &a),
            false,
            &to_dev(&gpu, &b),
            true,
            (m, n, k),
            ldc,
            0.0,
            Epilogue::Bias(&db),
        )
        .unwrap();
        let got = gpu.stream.clone_dtoh(&c).unwrap();
        for r in 0..m {
            let row: Vec<f32> = (0..n).map(|j| want[r * n + j] + bias[j]).collect();
            assert_close(
                &format!("strided row {r}"),
                &got[r * ldc..r * ldc + n],
                &row,
                Tol {
                    abs: 1e-3,
                    rel: 1e-4,
                },
            );
            assert!(
                got[r * ldc + n..(r + 1) * ldc].iter().all(|&x| x == 7.0),
                "padding of row {r} was written"
            );
        }
    }

    /// Strided operands (padding columns that must be ignored) and a view of a bf16 matrix
    /// living in an f32 buffer (the fused SUBS gradient's layout, lda = 2 ld) match the dense
    /// twin, for every transpose combination the training backward uses.
    #[test]
    fn strided_operands_and_views_match_twin() {
        let Some(gpu) = gpu_for_tests() else { return };
        let g = Gemm::new(&gpu).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        for &(m, n, k) in &[(40, 24, 72), (1, 50, 33), (64, 8, 16)] {
            for (ta, tb) in [(false, false), (true, false), (false, true)] {
                let a = rand_bf16(&mut rng, m * k, 1.0);
                let b = rand_bf16(&mut rng, k * n, 1.0);
                let want = cpu::matmul(&a, ta, &b, tb, m, n, k);
                let (ar, ac) = if ta { (k, m) } else { (m, k) };
                let (br, bc) = if tb { (n, k) } else { (k, n) };
                // A padded to lda = ac + 5 with junk in the padding; B inside an f32 buffer with
                // row stride 2 * ldb bf16 elements (the first half of each f32 row).
                let lda = ac + 5;
                let mut ap = vec![bf16::from_f32(9.0); ar * lda];
                for r in 0..ar {
                    for j in 0..ac {
                        ap[r * lda + j] = bf16::from_f32(a[r * ac + j]);
                    }
                }
                let ldf = bc.next_multiple_of(4);
                let mut bf = vec![bf16::from_f32(-7.0); br * 2 * ldf];
                for r in 0..br {
                    for j in 0..bc {
                        bf[r * 2 * ldf + j] = bf16::from_f32(b[r * bc + j]);
                    }
                }
                let words: Vec<f32> = bf
                    .chunks(2)
                    .map(|p| f32::from_bits((p[1].to_bits() as u32) << 16 | p[0].to_bits() as u32))
                    .collect();
                let da = gpu.stream.clone_htod(&ap).unwrap();
                let db32 = gpu.stream.clone_htod(&words).unwrap();
                // SAFETY: the f32 buffer holds br * ldf f32 = br * 2 * ldf bf16 elements.
                let dbv = unsafe { db32.transmute::<bf16>(br * 2 * ldf) }.unwrap();
                let mut c = gpu.stream.alloc_zeros::<f32>(m * n).unwrap();
                g.matmul_strided(
                    &gpu,
                    &mut c,
                    &da,
                    lda,
                    ta,
                    &dbv,
                    2 * ldf,
                    tb,
                    (m, n, k),
                    n,
                    0.0,
                    Epilogue::None,
                )
                .unwrap();
                assert_close(
                    &format!("strided gemm {m}x{n}x{k} ta={ta} tb={tb}"),
                    &gpu.stream.clone_dtoh(&c).unwrap(),
                    &want,
                    Tol {
                        abs: 1e-4 * (k as f64).sqrt(),
                        rel: 1e-4,
                    },
                );
            }
        }
    }

    /// cuBLASLt's GELU epilogue must be the tanh form the block MLPs use (spec 2.3). With f32
    /// output the two forms (up to 4.7e-4 apart) are far outside the accumulation error.
    #[test]
    fn gelu_epilogue_is_tanh_and_saves_the_pre_activation() {
        let Some(gpu) = gpu_for_tests() else { return };
        let g = Gemm::new(&gpu).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let (m, n, k) = (64, 256, 64);
        let a = rand_bf16(&mut rng, m * k, 0.5);
        let b = rand_bf16(&mut rng, n * k, 0.5);
        let bias: Vec<f32> = rand_bf16(&mut rng, n, 1.0);
        let pre: Vec<f32> = cpu::matmul(&a, false, &b, true, m, n, k)
            .iter()
            .enumerate()
            .map(|(i, x)| x + bias[i % n])
            .collect();
        let mut c = gpu.stream.alloc_zeros::<f32>(m * n).unwrap();
        let mut aux = gpu.stream.alloc_zeros::<f32>(m * n).unwrap();
        let db = gpu.stream.clone_htod(&bias).unwrap();
        g.matmul(
            &gpu,
            &mut c,
            &to_dev(&gpu, &a),
            false,
            &to_dev(&gpu, &b),
            true,
            (m, n, k),
            0.0,
            Epilogue::GeluBias {
                bias: &db,
                aux: Some(&mut aux),
            },
        )
        .unwrap();
        let got = gpu.stream.clone_dtoh(&c).unwrap();
        let tanh: Vec<f32> = pre.iter().map(|&x| gelu_tanh(x as f64) as f32).collect();
        let exact: Vec<f32> = pre.iter().map(|&x| gelu_exact(x as f64) as f32).collect();
        let tol = Tol {
            abs: 2e-5,
            rel: 1e-4,
        };
        let (_, _, _, r_exact) = compare(&got, &exact, tol);
        assert_close("GELU epilogue vs tanh GELU", &got, &tanh, tol);
        assert!(
            r_exact > 1.0,
            "the epilogue also matches exact GELU: test inputs too small"
        );
        assert_close("GELU aux", &gpu.stream.clone_dtoh(&aux).unwrap(), &pre, tol);
    }

    /// The two forms the inference forward added: GELU + bias without saving the
    /// pre-activation, and an f32 output accumulated in place with beta = 1 plus a bias (the
    /// gate-folded residual `h += x W^T + b`).
    #[test]
    fn gelu_without_aux_and_accumulating_f32_output() {
        let Some(gpu) = gpu_for_tests() else { return };
        let g = Gemm::new(&gpu).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (m, n, k) = (96, 128, 192);
        let a = rand_bf16(&mut rng, m * k, 0.5);
        let b = rand_bf16(&mut rng, n * k, 0.5);
        let bias: Vec<f32> = rand_bf16(&mut rng, n, 1.0);
        let h0: Vec<f32> = rand_bf16(&mut rng, m * n, 3.0);
        let pre: Vec<f32> = cpu::matmul(&a, false, &b, true, m, n, k)
            .iter()
            .enumerate()
            .map(|(i, x)| x + bias[i % n])
            .collect();
        let tol = Tol {
            abs: 2e-5,
            rel: 1e-4,
        };
        let db = gpu.stream.clone_htod(&bias).unwrap();
        let (da, dw) = (to_dev(&gpu, &a), to_dev(&gpu, &b));
        let mut c = gpu.stream.alloc_zeros::<f32>(m * n).unwrap();
        let epi = Epilogue::GeluBias {
            bias: &db,
            aux: None,
        };
        g.matmul(&gpu, &mut c, &da, false, &dw, true, (m, n, k), 0.0, epi)
            .unwrap();
        let tanh: Vec<f32> = pre.iter().map(|&x| gelu_tanh(x as f64) as f32).collect();
        assert_close(
            "GELU epilogue without aux",
            &gpu.stream.clone_dtoh(&c).unwrap(),
            &tanh,
            tol,
        );
        let mut h = gpu.stream.clone_htod(&h0).unwrap();
        g.matmul(
            &gpu,
            &mut h,
            &da,
            false,
            &dw,
            true,
            (m, n, k),
            1.0,
            Epilogue::Bias(&db),
        )
        .unwrap();
        let want: Vec<f32> = h0.iter().zip(&pre).map(|(x, p)| x + p).collect();
        assert_close(
            "h += x W^T + b",
            &gpu.stream.clone_dtoh(&h).unwrap(),
            &want,
            tol,
        );
    }
}
