//! Sizes derived from user input, checked before anything is allocated: checked arithmetic
//! and a bound of the machine's memory, so an absurd flag is an error that names it and the
//! bytes it needs instead of an abort in the allocator.

use crate::error::{Error, Result};
use crate::model::DitConfig;

/// Physical memory in bytes (`MemTotal` of `/proc/meminfo`), when known.
pub fn total_memory() -> Option<u128> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u128 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn gib(b: u128) -> String {
    format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
}

/// Bytes of `elem_bytes`-sized elements over `dims`, refused (naming `what`, e.g. "--batch
/// 100000000 x L 1024 x V 50258 logits") when the product overflows or exceeds the memory.
pub fn check(what: &str, dims: &[usize], elem_bytes: usize) -> Result<u128> {
    let bytes = dims
        .iter()
        .try_fold(elem_bytes as u128, |a, &d| a.checked_mul(d as u128));
    let Some(bytes) = bytes.filter(|b| *b < u64::MAX as u128) else {
        return Err(Error::Config(format!(
            "{what}: the size overflows 64 bits; choose smaller values"
        )));
    };
    if let Some(mem) = total_memory().filter(|m| bytes > *m) {
        return Err(Error::Config(format!(
            "{what}: needs {bytes} bytes ({}), more than this machine's memory ({}); choose \
             smaller values",
            gib(bytes),
            gib(mem)
        )));
    }
    Ok(bytes)
}

/// An upper estimate of a model's parameter count (embedding, output layer, blocks, eps MLP,
/// conditioning), from its configuration alone, in checked arithmetic (`None`: overflow).
pub fn approx_params(c: &DitConfig) -> Option<usize> {
    let (v, d, k, n) = (c.vocab_size, c.hidden, c.cond_dim, c.noise_dim);
    let mlp = d.checked_mul(c.mlp_ratio)?;
    // Per block: attention (4 D^2), MLP (2 D·mlp), adaLN (6 k·D), biases and norms.
    let block = d
        .checked_mul(d)?
        .checked_mul(4)?
        .checked_add(d.checked_mul(mlp)?.checked_mul(2)?)?
        .checked_add(k.checked_mul(d)?.checked_mul(6)?)?
        .checked_add(mlp.checked_add(d.checked_mul(16)?)?)?;
    // Embedding and output (2 V·D + V), eps MLP (n·mlp + mlp·D), time MLP, final adaLN.
    let rest = v
        .checked_mul(d)?
        .checked_mul(2)?
        .checked_add(v)?
        .checked_add(n.checked_add(d)?.checked_add(2)?.checked_mul(mlp)?)?
        .checked_add(d.checked_mul(d)?.checked_mul(2)?)?
        .checked_add(k.checked_mul(k.checked_add(264)?)?)?
        .checked_add(k.checked_mul(d)?.checked_mul(2)?)?
        .checked_add(d.checked_mul(16)?)?;
    block.checked_mul(c.blocks)?.checked_add(rest)
}

/// Checks that `copies` f32 copies of the model of `c` fit (e.g. 2 for init, 5 for training:
/// weights, gradients, two AdamW moments, EMA).
pub fn check_model(c: &DitConfig, copies: usize) -> Result<()> {
    let what = format!(
        "the model (V {}, hidden {}, {} blocks) x {copies} copies",
        c.vocab_size, c.hidden, c.blocks
    );
    match approx_params(c) {
        Some(n) => check(&what, &[n, copies], 4).map(|_| ()),
        None => Err(Error::Config(format!(
            "{what}: the parameter count overflows; choose smaller sizes"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_overflow_and_more_than_memory() {
        let e = check("--batch", &[usize::MAX, 4], 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--batch") && e.contains("overflows"), "{e}");
        if total_memory().is_some() {
            let e = check("--batch", &[1 << 40, 1 << 10], 4)
                .unwrap_err()
                .to_string();
            assert!(e.contains("--batch") && e.contains("bytes"), "{e}");
        }
        assert_eq!(check("x", &[3, 5], 4).unwrap(), 60);
        let c = DitConfig::minimini();
        let mut p = crate::model::init::init_params(&c, 0).count();
        assert!(approx_params(&c).unwrap() >= p, "an upper estimate");
        p = p.max(1);
        assert!(approx_params(&c).unwrap() < 3 * p, "a close one");
    }
}
