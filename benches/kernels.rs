//! Every forward kernel at the DiT-small and DiT-large shapes (the same code as
//! `imdm-engine bench kernels`). Needs a GPU; prints why not otherwise.

fn main() {
    match imdm_engine::cuda::Gpu::new(0) {
        Ok(gpu) => {
            println!("device: {}", gpu.name());
            match imdm_engine::bench::kernels(&gpu) {
                Ok(rows) => imdm_engine::bench::timing::print_table(&rows),
                Err(e) => eprintln!("bench failed: {e}"),
            }
        }
        Err(e) => println!("skipped: {e}"),
    }
}
