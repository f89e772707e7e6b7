"""Write the MAUVE fixtures for the Rust engine (`src/eval/mauve.rs`).

    python3 tools/reference/mauve_fixture.py --out tests/fixtures/mauve

Runs the real `mauve-text` package (0.4.0, which needs faiss-cpu and scikit-learn; no model is
loaded because the features are given) on synthetic feature sets and records what it computes:

- DIR/features.safetensors: float32 feature matrices `<case>.p` and `<case>.q`;
- DIR/mauve.json: per case and seed (42..46, as the reference's eval_mauve.py), mauve-text's
  cluster histograms, divergence curve and MAUVE, the bucket count, and the number of PCA
  components it kept (recomputed here with scikit-learn exactly as mauve-text does).

The engine's own frontier must reproduce the curve and MAUVE from the same histograms within
1e-6; its end-to-end MAUVE (own PCA and k-means) must match the mean over seeds within 0.02.
Install: pip install mauve-text==0.4.0 faiss-cpu scikit-learn safetensors numpy
"""
import argparse
import json
import os

import numpy as np
from safetensors.numpy import save_file
from sklearn.decomposition import PCA
from sklearn.preprocessing import normalize

import mauve

SEEDS = [42, 43, 44, 45, 46]
DIM = 32


def mixture(rng, centers, weights, n, spread):
    comp = rng.choice(len(centers), size=n, p=weights)
    return (centers[comp] + spread * rng.standard_normal((n, centers.shape[1]))).astype(np.float32)


def cases():
    rng = np.random.default_rng(20261202)
    centers = 2.0 * rng.standard_normal((8, DIM))
    uniform = np.full(8, 1 / 8)
    skewed = np.array([0.30, 0.25, 0.15, 0.10, 0.08, 0.06, 0.04, 0.02])
    far = centers + 12.0
    p = mixture(rng, centers, uniform, 200, 1.0)
    yield 'same', p, mixture(rng, centers, uniform, 600, 1.0)
    yield 'skewed', mixture(rng, centers, uniform, 200, 1.0), mixture(rng, centers, skewed, 600, 1.0)
    yield 'disjoint', mixture(rng, centers, uniform, 200, 1.0), mixture(rng, far, uniform, 600, 1.0)
    yield 'identical', p, p.copy()


def pca_dims(p, q, explained=0.9):
    data = normalize(np.vstack([q, p]), norm='l2', axis=1)
    s = np.cumsum(PCA(n_components=None, whiten=False).fit(data).explained_variance_ratio_)
    return int(np.argmax(s >= explained)) + 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--out', required=True)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    tensors, doc = {}, {'mauve_text': '0.4.0', 'seeds': SEEDS, 'cases': {}}
    for name, p, q in cases():
        tensors[f'{name}.p'] = p
        tensors[f'{name}.q'] = q
        runs = []
        for seed in SEEDS:
            o = mauve.compute_mauve(p_features=p, q_features=q, seed=seed)
            runs.append({
                'seed': seed,
                'p_hist': o.p_hist.tolist(),
                'q_hist': o.q_hist.tolist(),
                'divergence_curve': o.divergence_curve.tolist(),
                'mauve': float(o.mauve),
            })
        doc['cases'][name] = {
            'num_buckets': int(o.num_buckets),
            'pca_dims': pca_dims(p, q),
            'mean_mauve': float(np.mean([r['mauve'] for r in runs])),
            'runs': runs,
        }
        print(name, doc['cases'][name]['num_buckets'], doc['cases'][name]['pca_dims'],
              [round(r['mauve'], 4) for r in runs])
    save_file(tensors, os.path.join(args.out, 'features.safetensors'))
    with open(os.path.join(args.out, 'mauve.json'), 'w') as f:
        json.dump(doc, f, indent=1)


if __name__ == '__main__':
    main()
