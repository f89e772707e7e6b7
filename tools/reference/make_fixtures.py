"""Write the DiT parity fixtures for the Rust engine.

    python3 tools/reference/make_fixtures.py --out DIR

    python3 tools/reference/make_fixtures.py --out DIR --only sedd_tiny

For each fixture NAME: DIR/NAME.model.safetensors (weights as stored, plus rotary_emb.inv_freq,
metadata {"format": "imdm-engine/1", "config": <JSON>}) and DIR/NAME.io.safetensors (tokens int64,
eps float32 for IMDM, sigma float64 (B,) for a time-conditioned model, logits and SUBS log_probs
float32, computed in float64 by dit.py from exactly the stored weights, eps and sigma). `--only`
writes the named fixtures alone and leaves the others as committed. Also DIR/converted_tiny.safetensors, made by running
tools/convert_ckpt.py on a fake Lightning checkpoint whose EMA holds the imdm_tiny weights, so
it must reproduce imdm_tiny.io.safetensors. CPU only; needs torch, numpy and safetensors.
"""
import argparse
import json
import math
import os
import sys
import tempfile

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # tools/, for convert_ckpt
import dit  # noqa: E402
import convert_ckpt  # noqa: E402

F64 = torch.float64

# name, seed, batch, storage dtype, key prefix, and the engine config fields that vary
FIXTURES = [
    ('imdm_tiny', 101, 2, torch.float32, '',
     dict(vocab_size=53, mask_index=52, length=11, hidden=64, heads=2, blocks=2, cond_dim=32,
          softcap=0.0, algo='imdm', noise_dim=24)),
    ('imdm_tiny_softcap', 102, 2, torch.float32, '',
     dict(vocab_size=53, mask_index=52, length=11, hidden=64, heads=2, blocks=2, cond_dim=32,
          softcap=2.0, algo='imdm', noise_dim=24)),
    ('mdlm_prefixed', 103, 2, torch.float32, 'backbone.',
     dict(vocab_size=53, mask_index=52, length=11, hidden=64, heads=2, blocks=2, cond_dim=32,
          softcap=0.0, algo='mdlm', noise_dim=24)),
    ('imdm_hd64_bf16', 104, 3, torch.bfloat16, '',
     dict(vocab_size=40, mask_index=3, length=7, hidden=128, heads=2, blocks=1, cond_dim=16,
          softcap=0.0, algo='imdm', noise_dim=8)),
    # time conditioning (SEDD/D3PM style): an absorbing-state model fed one sigma per sequence
    ('sedd_tiny', 105, 3, torch.float32, '',
     dict(vocab_size=53, mask_index=52, length=11, hidden=64, heads=2, blocks=2, cond_dim=32,
          softcap=0.0, algo='mdlm', noise_dim=24, time_conditioning=True)),
]


def make_config(f):
    """The engine config object, all fields, in this order (floats stay JSON numbers).

    `time_conditioning` (engine default off) is written only where a fixture turns it on, so the
    configs of the older fixtures, and of tools/convert_ckpt.py's output, stay as they were.
    """
    return {'preset': 'custom', 'vocab_size': f['vocab_size'], 'mask_index': f['mask_index'],
            'length': f['length'], 'hidden': f['hidden'], 'heads': f['heads'],
            'blocks': f['blocks'], 'cond_dim': f['cond_dim'], 'mlp_ratio': 4, 'dropout': 0.0,
            'softcap': float(f['softcap']), 'algo': f['algo'], 'noise_dim': f['noise_dim'],
            'noise_type': 'rand', 'noise_scale': 1.0, 'causal': False,
            **({'time_conditioning': True} if f.get('time_conditioning') else {})}


def init_std(name, shape, cfg):
    """(mean, std) of the random init: every tensor non-zero, activations O(1), logits ~[-10, 10].

    Matrices get std ~ 1/sqrt(fan_in) (qkv a bit more so attention is peaked, the output head
    2x so logits span a few units, the eps MLP input 2x so the noise visibly moves the logits);
    adaLN weights 0.6/sqrt(cond) so shift/scale/gate are ~0.3; norm weights 1 + 0.1 N(0,1).
    """
    if name == 'vocab_embed.embedding':
        return 0.0, 1.0
    if name.endswith('norm1.weight') or name.endswith('norm2.weight') or 'norm_final' in name:
        return 1.0, 0.1
    if 'adaLN_modulation' in name:
        return 0.0, (0.6 / math.sqrt(cfg['cond_dim']) if name.endswith('weight') else 0.2)
    if name.endswith('.bias'):
        return 0.0, (0.3 if 'imdm_mlp' in name or 'output_layer' in name else 0.1)
    fan_in = 128 if name == 'sigma_map.mlp.0.weight' else shape[1]  # only the 128 cos are 1
    gain = {'attn_qkv': 1.5, 'output_layer.linear': 2.0, 'imdm_mlp.0': 2.0}
    g = next((v for k, v in gain.items() if k in name), 1.0)
    return 0.0, g / math.sqrt(fan_in)


def random_params(cfg, dtype):
    """Seeded random weights in registration order, rounded to the storage dtype."""
    out = {}
    for name, shape in dit.param_shapes(cfg):
        mean, std = init_std(name, shape, cfg)
        out[name] = (mean + std * torch.randn(shape, dtype=F64)).to(dtype)
    return out


def inv_freq(cfg):
    hd = cfg['hidden'] // cfg['heads']
    return 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))


def random_inputs(cfg, B):
    """Uniform ids in [0, V), ~half replaced by the mask id, last row fully masked; eps U[-1,1)."""
    V, M, L = cfg['vocab_size'], cfg['mask_index'], cfg['length']
    tokens = torch.randint(0, V, (B, L), dtype=torch.int64)
    masked = torch.rand(B, L, dtype=F64) < 0.5
    masked[-1] = True
    tokens[masked] = M
    eps = None
    if cfg['algo'] == 'imdm':
        eps = (torch.rand(B, L, cfg['noise_dim'], dtype=F64) * 2.0 - 1.0).to(torch.float32)
    sigma = None
    if cfg.get('time_conditioning'):
        # one time per sequence, spread over (0, 1) and the last (fully masked) row at t = 0.999,
        # through the log-linear schedule's total noise sigma(t) = -log(1 - (1 - 1e-4) t)
        t = (torch.arange(B, dtype=F64) + torch.rand(B, dtype=F64)) / B
        t[-1] = 0.999
        sigma = -torch.log1p(-(1.0 - 1e-4) * t)
    return tokens, eps, sigma


def run_model(params, cfg, tokens, eps, sigma=None):
    """float64 logits and SUBS log-probs from the stored tensors (upcast inside dit.forward)."""
    stats = {}
    logits = dit.forward(params, cfg, tokens, eps, sigma, stats=stats)
    lp = dit.subs_log_probs(logits, tokens, cfg['mask_index'])
    return logits, lp, stats


def write_fixture(out_dir, name, seed, B, dtype, prefix, fields):
    torch.manual_seed(seed)
    cfg = make_config(fields)
    params = random_params(cfg, dtype)
    tokens, eps, sigma = random_inputs(cfg, B)
    logits, lp, stats = run_model(params, cfg, tokens, eps, sigma)
    assert torch.isfinite(logits).all() and torch.isfinite(lp).all()

    model = {prefix + k: v.contiguous() for k, v in params.items()}
    model[prefix + 'rotary_emb.inv_freq'] = inv_freq(cfg).to(dtype)
    save_file(model, os.path.join(out_dir, f'{name}.model.safetensors'),
              metadata={'format': 'imdm-engine/1', 'config': json.dumps(cfg)})
    io = {'tokens': tokens.contiguous(), 'logits': logits.to(torch.float32).contiguous(),
          'log_probs': lp.to(torch.float32).contiguous()}
    if eps is not None:
        io['eps'] = eps.contiguous()
    if sigma is not None:
        io['sigma'] = sigma.contiguous()
    save_file(io, os.path.join(out_dir, f'{name}.io.safetensors'),
              metadata={'format': 'imdm-engine/1', 'fixture': name})

    frac = (tokens == cfg['mask_index']).double().mean().item()
    print(f'{name:18s} B={B} L={cfg["length"]} V={cfg["vocab_size"]} {str(dtype)[6:]:8s} '
          f'max|logit|={logits.abs().max().item():.3f} masked={frac:.3f} '
          f'max|score|={stats["max_abs_score"]:.3f} softcap={cfg["softcap"]}'
          + ('' if sigma is None else f' sigma={[round(x, 4) for x in sigma.tolist()]}'))
    return params, cfg, tokens, eps, logits


def write_converted(out_dir, params, cfg, tokens, eps, logits):
    """Fake Lightning checkpoint -> convert_ckpt.convert (EMA) -> converted_tiny.safetensors."""
    torch.manual_seed(999)
    raw = random_params(cfg, torch.float32)  # different weights: must NOT be picked
    state_dict = {}
    for k, _ in dit.param_shapes(cfg):
        if k.startswith('blocks.0.') and 'backbone.rotary_emb.inv_freq' not in state_dict:
            state_dict['backbone.rotary_emb.inv_freq'] = inv_freq(cfg)  # buffer sits here
        state_dict['backbone.' + k] = raw[k]
    shadow = [params[k].clone() for k, _ in dit.param_shapes(cfg)]
    ckpt = {'state_dict': state_dict, 'hyper_parameters': {},
            'ema': {'decay': 0.9999, 'num_updates': 10, 'shadow_params': shadow}}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'fake.ckpt')
        torch.save(ckpt, path)
        loaded = torch.load(path, map_location='cpu', weights_only=False)
    preset = {k: cfg[k] for k in convert_ckpt.FIELDS}
    tensors, ccfg = convert_ckpt.convert(loaded, preset, mask_index=cfg['mask_index'],
                                         length=cfg['length'], softcap=cfg['softcap'],
                                         use_ema=True)
    # self-checks: same config, same weights as imdm_tiny, same logits
    assert ccfg == cfg, (ccfg, cfg)
    assert set(tensors) == set(params) | {'rotary_emb.inv_freq'}
    assert all(torch.equal(tensors[k], params[k]) for k in params)
    again = dit.forward(tensors, ccfg, tokens, eps)
    assert torch.equal(again.to(torch.float32), logits.to(torch.float32))
    dest = os.path.join(out_dir, 'converted_tiny.safetensors')
    convert_ckpt.save(tensors, ccfg, dest)
    print(f'converted_tiny     from a fake .ckpt via convert_ckpt.convert(use_ema=True): '
          f'{len(tensors)} tensors, reproduces imdm_tiny.io')


def main():
    ap = argparse.ArgumentParser(description='write the DiT parity fixtures')
    ap.add_argument('--out', required=True, help='output directory (created if missing)')
    ap.add_argument('--only', nargs='+', metavar='NAME', default=None,
                    help='write only these fixtures (converted_tiny comes with imdm_tiny)')
    a = ap.parse_args()
    names = [f[0] for f in FIXTURES]
    unknown = sorted(set(a.only or []) - set(names))
    if unknown:
        ap.error(f'--only: unknown fixture(s) {unknown}; known: {names}')
    os.makedirs(a.out, exist_ok=True)
    torch.set_num_threads(1)  # deterministic CPU reductions
    results = {}
    for name, seed, B, dtype, prefix, fields in FIXTURES:
        if a.only is None or name in a.only:
            results[name] = write_fixture(a.out, name, seed, B, dtype, prefix, fields)
    if 'imdm_tiny' in results:
        write_converted(a.out, *results['imdm_tiny'])


if __name__ == '__main__':
    main()
