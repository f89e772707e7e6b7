//! Tests of `trainer`.

use super::*;

#[test]
fn out_of_memory_errors_name_the_allocation() {
    let e = oom(
        Error::Cuda("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into()),
        || "a micro-batch of 512 sequences".into(),
    );
    assert!(e.to_string().contains("micro-batch of 512"), "{e}");
    let other = oom(Error::Config("x".into()), || unreachable!());
    assert_eq!(other.to_string(), "configuration: x");
}
