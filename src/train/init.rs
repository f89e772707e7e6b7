//! Initial weights of a run: a fresh reference initialisation, or a checkpoint to fine-tune.
//!
//! Fine-tuning an IMDM model from an MDLM checkpoint follows the reference (spec 2.6): every
//! tensor the file has is loaded, and the missing eps MLP keeps its initialisation (`fc1`
//! trunc-normal, `fc2` zero), so the loaded IMDM computes exactly the MDLM at step 0.

use crate::error::{Error, Result};
use crate::model::checkpoint::{self, PREFIX};
use crate::model::init::init_params;
use crate::model::{Algo, DitConfig, DitParams};
use crate::stio::StFile;

/// Name of the eps MLP's first weight (present in every IMDM checkpoint).
const EPS_MLP_FIRST: &str = "vocab_embed.imdm_mlp.0.weight";

/// Weights for a run of `target`: `init_params(target, seed)` without a file, else the file's
/// tensors (an MDLM file into an IMDM target gets the initialised eps MLP added). The file's
/// sizes must match `target`; settings that do not change shapes (length, dropout, softcap,
/// noise type) are taken from `target`.
pub fn initial_params(
    target: &DitConfig,
    init: Option<&std::path::Path>,
    seed: u64,
) -> Result<DitParams> {
    let Some(path) = init else {
        return Ok(init_params(target, seed));
    };
    let file_algo = match checkpoint::read_config(path)? {
        Some(c) => c.algo,
        None => {
            let f = StFile::open(path)?;
            let st = f.parse()?;
            let has_eps = st
                .names()
                .iter()
                .any(|n| n.strip_prefix(PREFIX).unwrap_or(n) == EPS_MLP_FIRST);
            if has_eps {
                Algo::Imdm
            } else {
                Algo::Mdlm
            }
        }
    };
    let graft = target.algo == Algo::Imdm && file_algo == Algo::Mdlm;
    let mut as_file = target.clone();
    as_file.algo = file_algo;
    let loaded = checkpoint::load(path, Some(&as_file))?;
    let mut p = if graft {
        init_params(target, seed)
    } else {
        DitParams::zeros(target)
    };
    let mut src: std::collections::HashMap<String, &crate::tensor::Tensor> =
        loaded.named().into_iter().collect();
    for (name, slot) in p.named_mut() {
        match src.remove(&name) {
            Some(t) if t.shape == slot.shape => slot.data.copy_from_slice(&t.data),
            Some(t) => {
                return Err(Error::checkpoint(
                    path,
                    format!(
                        "tensor {name}: the file has shape {:?}, the chosen configuration needs \
                         {:?}",
                        t.shape, slot.shape
                    ),
                ))
            }
            None if graft && name.starts_with("vocab_embed.imdm_mlp") => {}
            None => {
                return Err(Error::checkpoint(
                    path,
                    format!("has no tensor {name} for the chosen configuration"),
                ))
            }
        }
    }
    if let Some(extra) = src.keys().next() {
        return Err(Error::checkpoint(
            path,
            format!(
                "tensor {extra} has no place in the chosen configuration (algo {}); choose \
                 --algo {}",
                target.algo.name(),
                file_algo.name()
            ),
        ));
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::init::random_params;

    fn cfg(algo: Algo) -> DitConfig {
        let mut c = DitConfig::minimini();
        c.vocab_size = 11;
        c.mask_index = 10;
        c.algo = algo;
        c.noise_dim = 6;
        c
    }

    #[test]
    fn mdlm_checkpoint_fine_tunes_into_imdm_with_a_zero_eps_branch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mdlm.safetensors");
        let mdlm = random_params(&cfg(Algo::Mdlm), 1);
        checkpoint::save(&path, &mdlm).unwrap();
        let mut target = cfg(Algo::Imdm);
        target.length = 7; // a shape-free setting follows the target
        let p = initial_params(&target, Some(&path), 3).unwrap();
        assert_eq!(p.config, target);
        assert_eq!(p.embedding, mdlm.embedding);
        assert_eq!(p.blocks, mdlm.blocks);
        let e = p.eps_mlp.as_ref().unwrap();
        assert!(e.fc2.weight.data.iter().all(|&x| x == 0.0));
        assert!(e.fc1.weight.data.iter().any(|&x| x != 0.0));
        assert_eq!(
            e,
            init_params(&target, 3).eps_mlp.as_ref().unwrap(),
            "the eps MLP is init_params' own"
        );
        // Same algorithm: loaded as is.
        let imdm = random_params(&target, 2);
        let path2 = dir.path().join("imdm.safetensors");
        checkpoint::save(&path2, &imdm).unwrap();
        assert_eq!(initial_params(&target, Some(&path2), 0).unwrap(), imdm);
        // IMDM file into an MDLM run: refused, naming the tensor.
        let e = initial_params(&cfg(Algo::Mdlm), Some(&path2), 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("algo"), "{e}");
        // Without a file: the reference initialisation.
        assert_eq!(
            initial_params(&target, None, 5).unwrap(),
            init_params(&target, 5)
        );
    }
}
