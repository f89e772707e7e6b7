//! Opening a judge language model by file or name.

use crate::error::{Error, Result};
use crate::eval::lm::Judge;

/// Opens the judge `spec` names (a GGUF file or a fetched judge's name).
pub fn open(spec: &str) -> Result<Box<dyn Judge>> {
    let _ = spec;
    Err(Error::Config("GGUF judges are not built in".into()))
}
