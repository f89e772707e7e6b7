//! ReDi coupling data (spec 6.2-6.3): pairs ((x_T, ε(seed)), x0_gen) with the time t each x_T
//! was noised at. Stored as one safetensors file with the reference's array names (`xT`, `x0`,
//! `ts`, `seeds`, as its `.npy` files), written atomically, checked on load.
//!
//! Training on couplings (IM-ReDi, spec 6.3) is the MDLM NELBO with target x0_gen: x_t = x_T
//! exactly, t as stored, ε = the seeded noise of the generator (`rng::seeded_eps`), weight
//! `schedule::nelbo_weight(t)` at masked positions. `ignore_seed` replaces ε by fresh noise, as
//! the reference does for couplings made by an MDLM teacher.

use std::collections::HashMap;
use std::path::Path;

use rand::Rng;

use crate::diffusion::schedule::nelbo_weight;
use crate::error::{Error, Result};
use crate::model::DitConfig;
use crate::rng::seeded_eps;
use crate::stio::{view_to_f32, view_to_ids, write_atomic, OutTensor, StFile};
use crate::tensor::{Tensor, Tokens};

/// Metadata key holding the vocabulary size the ids were checked against.
const META_VOCAB: &str = "vocab_size";

/// A set of S couplings of length L.
#[derive(Clone, Debug, PartialEq)]
pub struct Couplings {
    /// (S, L) the partially (or fully) masked inputs.
    pub xt: Tokens,
    /// (S, L) what the generator produced from them.
    pub x0: Tokens,
    /// (S) the time x_T was noised at (1 = all masked).
    pub t: Vec<f32>,
    /// (S) the seed of the generator's initial ε (spec 5.8).
    pub seeds: Vec<i64>,
}

/// Owned inputs of one coupling (micro-)batch; `LossBatch` borrows from it.
#[derive(Clone, Debug)]
pub struct CouplingBatch {
    pub xt: Tokens,
    pub x0: Tokens,
    /// (B, L, noise_dim), absent for models without the eps MLP.
    pub eps: Option<Tensor>,
    /// (B·L) NELBO weight at masked positions, 0 elsewhere.
    pub weight: Vec<f32>,
}

impl Couplings {
    pub fn len(&self) -> usize {
        self.t.len()
    }

    pub fn is_empty(&self) -> bool {
        self.t.is_empty()
    }

    /// Appends `other` (same length L).
    pub fn extend(&mut self, other: &Couplings) -> Result<()> {
        if other.xt.len != self.xt.len {
            return Err(Error::Shape(format!(
                "couplings: cannot join length {} with length {}",
                self.xt.len, other.xt.len
            )));
        }
        self.xt.ids.extend_from_slice(&other.xt.ids);
        self.xt.batch += other.xt.batch;
        self.x0.ids.extend_from_slice(&other.x0.ids);
        self.x0.batch += other.x0.batch;
        self.t.extend_from_slice(&other.t);
        self.seeds.extend_from_slice(&other.seeds);
        Ok(())
    }

    /// Splits off the last `n` couplings (held out for validation) and returns them.
    pub fn split_off_last(&mut self, n: usize) -> Couplings {
        let (s, l) = (self.len(), self.xt.len);
        let at = s - n.min(s);
        let tail = |t: &mut Tokens| Tokens {
            batch: s - at,
            len: l,
            ids: t.ids.split_off(at * l),
        };
        let out = Couplings {
            xt: tail(&mut self.xt),
            x0: tail(&mut self.x0),
            t: self.t.split_off(at),
            seeds: self.seeds.split_off(at),
        };
        self.xt.batch = at;
        self.x0.batch = at;
        out
    }

    /// The loss inputs of rows `rows` for a model with configuration `c`. With `ignore_seed`
    /// ε is drawn fresh from `rng` instead of from the stored seeds.
    pub fn batch<R: Rng>(
        &self,
        rows: &[usize],
        c: &DitConfig,
        ignore_seed: bool,
        rng: &mut R,
    ) -> CouplingBatch {
        let l = self.xt.len;
        let pick = |t: &Tokens| Tokens {
            batch: rows.len(),
            len: l,
            ids: rows
                .iter()
                .flat_map(|&r| t.ids[r * l..(r + 1) * l].iter().copied())
                .collect(),
        };
        let (xt, x0) = (pick(&self.xt), pick(&self.x0));
        let mut weight = vec![0f32; rows.len() * l];
        for (b, &r) in rows.iter().enumerate() {
            let w = nelbo_weight(self.t[r] as f64) as f32;
            for j in 0..l {
                if xt.ids[b * l + j] as usize == c.mask_index {
                    weight[b * l + j] = w;
                }
            }
        }
        let eps = c.has_eps_mlp().then(|| {
            let seeds: Vec<i64> = match ignore_seed {
                false => rows.iter().map(|&r| self.seeds[r]).collect(),
                // Fresh seeds from the training RNG give fresh ε with the same distribution.
                true => rows.iter().map(|_| rng.random_range(0..i64::MAX)).collect(),
            };
            seeded_eps(&seeds, l, c.noise_dim, c.noise_type, c.noise_scale as f32)
        });
        CouplingBatch {
            xt,
            x0,
            eps,
            weight,
        }
    }

    /// Writes the couplings to `path` (atomically).
    pub fn save(&self, path: impl AsRef<Path>, vocab_size: usize) -> Result<()> {
        let (s, l) = (self.len(), self.xt.len);
        let ids = |t: &Tokens| t.ids.iter().map(|&x| x as i64).collect::<Vec<i64>>();
        let (xt, x0) = (ids(&self.xt), ids(&self.x0));
        let ts = Tensor::from_vec(&[s], self.t.clone())?;
        let tensors = vec![
            (
                "xT".to_string(),
                OutTensor::I64 {
                    shape: vec![s, l],
                    data: &xt,
                },
            ),
            (
                "x0".to_string(),
                OutTensor::I64 {
                    shape: vec![s, l],
                    data: &x0,
                },
            ),
            ("ts".to_string(), OutTensor::F32(&ts)),
            (
                "seeds".to_string(),
                OutTensor::I64 {
                    shape: vec![s],
                    data: &self.seeds,
                },
            ),
        ];
        let meta = HashMap::from([(META_VOCAB.to_string(), vocab_size.to_string())]);
        write_atomic(path.as_ref(), &tensors, meta)
    }

    /// Reads couplings from `path`, checking names, shapes, ids against `vocab_size` and t in
    /// (0, 1].
    pub fn load(path: impl AsRef<Path>, vocab_size: usize) -> Result<Self> {
        let path = path.as_ref();
        let f = StFile::open(path)?;
        let st = f.parse()?;
        let get = |name: &str| {
            st.tensor(name)
                .map_err(|_| Error::checkpoint(path, format!("couplings: missing tensor `{name}`")))
        };
        let (vx, v0, vt, vs) = (get("xT")?, get("x0")?, get("ts")?, get("seeds")?);
        let shape = vx.shape().to_vec();
        if shape.len() != 2 || v0.shape() != shape.as_slice() {
            return Err(Error::checkpoint(
                path,
                format!(
                    "couplings: xT {:?} and x0 {:?} must both be (S, L)",
                    vx.shape(),
                    v0.shape()
                ),
            ));
        }
        let (s, l) = (shape[0], shape[1]);
        if vt.shape() != [s] || vs.shape() != [s] {
            return Err(Error::checkpoint(
                path,
                format!(
                    "couplings: ts {:?} and seeds {:?} must be ({s})",
                    vt.shape(),
                    vs.shape()
                ),
            ));
        }
        let tokens = |name: &str, v| -> Result<Tokens> {
            let ids = view_to_ids(path, name, &v)?;
            Tokens::new(s, l, ids, vocab_size).map_err(|e| {
                Error::checkpoint(path, format!("couplings: {name}: {e} (model vocabulary)"))
            })
        };
        let (xt, x0) = (tokens("xT", vx)?, tokens("x0", v0)?);
        let t = view_to_f32(path, "ts", &vt)?.data;
        if let Some((i, x)) = t.iter().enumerate().find(|(_, &x)| !(x > 0.0 && x <= 1.0)) {
            return Err(Error::checkpoint(
                path,
                format!("couplings: ts[{i}] = {x} is outside (0, 1]"),
            ));
        }
        let seeds = match vs.dtype() {
            safetensors::Dtype::I64 => bytemuck::pod_collect_to_vec::<u8, i64>(vs.data()),
            d => {
                return Err(Error::checkpoint(
                    path,
                    format!("couplings: seeds must be int64, got {d:?}"),
                ))
            }
        };
        Ok(Couplings { xt, x0, t, seeds })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn sample(vocab: usize, mask: u32) -> Couplings {
        Couplings {
            xt: Tokens::new(2, 3, vec![mask, mask, mask, 4, mask, 4], vocab).unwrap(),
            x0: Tokens::new(2, 3, vec![1, 1, 1, 4, 4, 4], vocab).unwrap(),
            t: vec![1.0, 0.25],
            seeds: vec![7, 123_456],
        }
    }

    fn config() -> DitConfig {
        let mut c = DitConfig::minimini();
        c.vocab_size = 6;
        c.mask_index = 5;
        c.length = 3;
        c.noise_dim = 4;
        c.algo = crate::model::Algo::Imdm;
        c
    }

    #[test]
    fn round_trip_and_batch_uses_the_seeded_eps() {
        let c = config();
        let cp = sample(6, 5);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pairs.safetensors");
        cp.save(&path, 6).unwrap();
        assert_eq!(Couplings::load(&path, 6).unwrap(), cp);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let b = cp.batch(&[1, 0], &c, false, &mut rng);
        assert_eq!(b.xt.ids, vec![4, 5, 4, 5, 5, 5]);
        assert_eq!(b.x0.ids, vec![4, 4, 4, 1, 1, 1]);
        // Weight 1/t at masked positions only (t = 0.25, then 1).
        assert_eq!((b.weight[0], b.weight[2]), (0.0, 0.0));
        assert!((b.weight[1] - 4.0).abs() < 1e-5 && (b.weight[3] - 1.0).abs() < 1e-5);
        let want = seeded_eps(&[123_456, 7], 3, 4, c.noise_type, c.noise_scale as f32);
        assert_eq!(b.eps.as_ref().unwrap(), &want);
        let fresh = cp.batch(&[1, 0], &c, true, &mut rng);
        assert_ne!(
            fresh.eps.unwrap(),
            want,
            "ignore_seed must not reuse the seeds"
        );
    }

    #[test]
    fn load_rejects_out_of_vocabulary_ids_and_bad_times() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pairs.safetensors");
        sample(6, 5).save(&path, 6).unwrap();
        let e = Couplings::load(&path, 5).unwrap_err().to_string();
        assert!(
            e.contains("outside the vocabulary") && e.contains("pairs"),
            "{e}"
        );
        let mut bad = sample(6, 5);
        bad.t[1] = 0.0;
        bad.save(&path, 6).unwrap();
        let e = Couplings::load(&path, 6).unwrap_err().to_string();
        assert!(e.contains("ts[1]"), "{e}");
        std::fs::write(&path, b"not a safetensors file").unwrap();
        assert!(Couplings::load(&path, 6).is_err());
    }
}
