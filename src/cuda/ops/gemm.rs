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

/// Most elements one operand view may span (rows · ld): the GEMMs over the logits gradient
/// (f32 rows read as bf16 with stride 2 · ld) are split by rows so that no view crosses 2^31,
/// which keeps every cuBLASLt offset inside 32-bit range whatever its kernels index with.
pub const MAX_VIEW_ELEMS: usize = (1 << 31) - 1;

/// Splits `rows` rows of a row-major view (row stride `ld`, `cols` used per row) into
/// contiguous `(start, len)` chunks of near-equal length whose span `(len - 1) · ld + cols` is at
/// most `max`. One chunk when the whole view fits; `rows = 0` gives none.
pub fn row_chunks(rows: usize, ld: usize, cols: usize, max: usize) -> Result<Vec<(usize, usize)>> {
    if cols > ld || cols > max {
        return Err(Error::Shape(format!(
            "gemm split: a row of {cols} elements (row stride {ld}) cannot fit a view of {max}"
        )));
    }
    if rows == 0 {
        return Ok(Vec::new());
    }
    // Largest r with (r - 1) · ld + cols <= max.
    let most = (max - cols) / ld + 1;
    let n = rows.div_ceil(most);
    let len = rows.div_ceil(n);
    Ok((0..n)
        .map(|i| (i * len, len.min(rows.saturating_sub(i * len))))
        .filter(|&(_, l)| l > 0)
        .collect())
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
    pub fn matmul_strided<
        T: GemmOut,
        C: DevicePtrMut<T>,
        A: DevicePtr<bf16>,
        B: DevicePtr<bf16>,
    >(
        &self,
        gpu: &Gpu,
        c: &mut C,
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
    fn launch<T: GemmOut, C: DevicePtrMut<T>, A: DevicePtr<bf16>, B: DevicePtr<bf16>>(
        &self,
        gpu: &Gpu,
        c: &mut C,
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
#[path = "gemm_tests.rs"]
mod tests;
