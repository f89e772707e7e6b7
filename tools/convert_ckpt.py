"""Convert a reference IMDM / MDLM Lightning checkpoint (.ckpt) to an imdm-engine safetensors file.

Usage:
    python3 tools/convert_ckpt.py IN.ckpt OUT.safetensors --preset small|medium|large|tiny|synthetic|minimini
        [--raw] [--vocab V] [--mask-index M] [--length L] [--noise-dim N] [--softcap S] [--algo imdm|mdlm]

What it does (docs/reference.md 2.5, 2.6):
  * loads IN with torch.load(map_location='cpu', weights_only=False) (needs torch);
  * by default writes the EMA weights (what evaluation uses): the `backbone.*` keys of
    `state_dict`, in order and without buffers (`rotary_emb.inv_freq`), are paired with
    `ema['shadow_params']`; count and every shape must agree. `--raw` writes `state_dict` instead;
  * strips `backbone.`, writes float32 tensors plus `rotary_emb.inv_freq` (float32 [hd/2]);
  * metadata {"format": "imdm-engine/1", "config": <JSON>} with the engine's config object.
Defaults: algo = imdm if `vocab_embed.imdm_mlp.*` is present, else mdlm; vocab from the embedding;
mask index V-1 (pass --mask-index 103 for BERT / LM1B); noise_dim from imdm_mlp.0.weight (else
hidden); softcap 0 = off (--softcap 50 for the LM1B models). The preset supplies hidden, heads,
blocks, cond_dim, length and dropout, and must match the tensors. Library use: `convert(ckpt_dict,
preset, ..., use_ema=True) -> (tensors, config)`; `preset` may be a dict of those six ("custom").
"""
import argparse
import json
import os
import sys

import torch

PRESETS = {  # hidden, heads, blocks, cond_dim, length, dropout
    'small': (768, 12, 12, 128, 1024, 0.1), 'medium': (1024, 16, 24, 128, 1024, 0.1),
    'large': (1536, 16, 24, 128, 1024, 0.1), 'tiny': (256, 8, 8, 128, 1024, 0.1),
    'synthetic': (128, 4, 4, 128, 10, 0.0), 'minimini': (64, 2, 2, 64, 3, 0.0),
}
FIELDS = ('hidden', 'heads', 'blocks', 'cond_dim', 'length', 'dropout')
PREFIX = 'backbone.'
BUFFER = 'rotary_emb.inv_freq'  # the DiT's only buffer (spec 2.5); not in the EMA list


def die(msg):
    sys.exit(f'convert_ckpt: error: {msg}')


def convert(ckpt, preset, vocab=None, mask_index=None, length=None, noise_dim=None,
            softcap=None, algo=None, use_ema=True):
    """Return (tensors: name -> float32 tensor, config: dict) for a loaded checkpoint dict."""
    if isinstance(preset, dict):
        name, p = 'custom', {f: preset[f] for f in FIELDS}
    else:
        name, p = preset, dict(zip(FIELDS, PRESETS[preset]))
    sd = ckpt['state_dict']
    keys = [k for k in sd if k.startswith(PREFIX)] or list(sd)
    pkeys = [k for k in keys if not k.endswith(BUFFER)]
    if use_ema:
        shadow = list(ckpt['ema']['shadow_params'])
        for k, t in zip(pkeys, shadow):  # shape check first: it names the offending key
            if tuple(t.shape) != tuple(sd[k].shape):
                die(f'EMA shadow tensor for {k} has shape {tuple(t.shape)}, '
                    f'state_dict has {tuple(sd[k].shape)}')
        if len(shadow) != len(pkeys):
            first = pkeys[len(shadow)] if len(pkeys) > len(shadow) else '(extra shadow tensors)'
            die(f'{len(shadow)} EMA tensors for {len(pkeys)} parameters; unpaired: {first}')
        vals = dict(zip(pkeys, shadow))
    else:
        vals = {k: sd[k] for k in pkeys}
    T = {(k[len(PREFIX):] if k.startswith(PREFIX) else k):
         v.detach().to(device='cpu', dtype=torch.float32).contiguous() for k, v in vals.items()}

    for k in ('vocab_embed.embedding', 'sigma_map.mlp.0.weight', 'output_layer.linear.weight'):
        if k not in T:
            die(f'no {k} in the checkpoint')
    if 'vocab_embed.imdm_mlp.weight' in T:
        die('finite-mask IMDM (vocab_embed.imdm_mlp.weight, algo.num_mask > 0) is not supported')
    V, D = T['vocab_embed.embedding'].shape
    if D != p['hidden']:
        die(f"embedding width {D} != hidden {p['hidden']} of preset {name}")
    if vocab is not None and vocab != V:
        die(f'--vocab {vocab} but vocab_embed.embedding has {V} rows')
    nblocks = len({k.split('.')[1] for k in T if k.startswith('blocks.')})
    if nblocks != p['blocks']:
        die(f"checkpoint has {nblocks} blocks, preset {name} has {p['blocks']}")
    if T['sigma_map.mlp.0.weight'].shape[0] != p['cond_dim']:
        die(f"sigma_map.mlp.0.weight rows != cond_dim {p['cond_dim']} of preset {name}")
    hd = p['hidden'] // p['heads']
    if hd * p['heads'] != p['hidden'] or hd % 2:
        die(f"hidden {p['hidden']} / heads {p['heads']} is not an even head dim")
    mask_index = V - 1 if mask_index is None else mask_index
    if not 0 <= mask_index < V:
        die(f'mask index {mask_index} outside [0, {V})')

    has_imdm = 'vocab_embed.imdm_mlp.0.weight' in T
    algo = algo or ('imdm' if has_imdm else 'mdlm')
    if algo == 'imdm' and not has_imdm:
        die('--algo imdm but the checkpoint has no vocab_embed.imdm_mlp tensors (use --algo mdlm)')
    if has_imdm:
        nd = T['vocab_embed.imdm_mlp.0.weight'].shape[1]
        if noise_dim is not None and noise_dim != nd:
            die(f'--noise-dim {noise_dim} but vocab_embed.imdm_mlp.0.weight has {nd} inputs')
        if algo == 'mdlm':  # as_mdlm: the noise MLP contributes nothing; drop it
            print('convert_ckpt: --algo mdlm: dropping vocab_embed.imdm_mlp.*', file=sys.stderr)
            T = {k: v for k, v in T.items() if not k.startswith('vocab_embed.imdm_mlp.')}
    else:
        nd = noise_dim if noise_dim is not None else D
    learnable = 'vocab_embed.learnable_noise_mu' in T
    # rotary buffer: copy the checkpoint's if present (checks the head dim), else compute in fp32
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    ck = [sd[k] for k in keys if k.endswith(BUFFER)]
    if ck:
        if tuple(ck[0].shape) != (hd // 2,):
            die(f'rotary_emb.inv_freq has shape {tuple(ck[0].shape)}, not ({hd // 2},) (heads?)')
        inv = ck[0].detach().to('cpu', torch.float32)  # bit-identical to the reference buffer
    T[BUFFER] = inv.contiguous()
    config = {  # softcap <= 0 (the reference's -1) is written as 0.0 = off
        'preset': name, 'vocab_size': int(V), 'mask_index': int(mask_index),
        'length': int(length if length is not None else p['length']), 'hidden': int(D),
        'heads': int(p['heads']), 'blocks': int(p['blocks']), 'cond_dim': int(p['cond_dim']),
        'mlp_ratio': 4, 'dropout': float(p['dropout']), 'softcap': max(float(softcap or 0), 0.0),
        'algo': algo, 'noise_dim': int(nd), 'noise_type': 'learnable' if learnable else 'rand',
        'noise_scale': 1.0, 'causal': False}
    return T, config


def save(tensors, config, out):
    """Write OUT.tmp, then rename it to OUT."""
    from safetensors.torch import save_file
    meta = {'format': 'imdm-engine/1', 'config': json.dumps(config)}
    save_file(tensors, out + '.tmp', metadata=meta)
    os.replace(out + '.tmp', out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('inp', metavar='IN.ckpt')
    ap.add_argument('out', metavar='OUT.safetensors')
    ap.add_argument('--raw', action='store_true', help='write the raw (non-EMA) state_dict')
    ap.add_argument('--preset', required=True, choices=sorted(PRESETS))
    for opt in ('--vocab', '--mask-index', '--length', '--noise-dim'):
        ap.add_argument(opt, type=int)
    ap.add_argument('--softcap', type=float)
    ap.add_argument('--algo', choices=['imdm', 'mdlm'])
    a = ap.parse_args()
    ckpt = torch.load(a.inp, map_location='cpu', weights_only=False)
    T, cfg = convert(ckpt, a.preset, a.vocab, a.mask_index, a.length, a.noise_dim, a.softcap,
                     a.algo, use_ema=not a.raw)
    save(T, cfg, a.out)
    n = sum(v.numel() for k, v in T.items() if not k.endswith(BUFFER))
    print(f"wrote {a.out}: {len(T)} tensors, {n:,} parameters ({'raw' if a.raw else 'EMA'}), "
          f'config {json.dumps(cfg)}')


if __name__ == '__main__':
    main()
