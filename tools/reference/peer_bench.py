"""The PyTorch peer of `imdm-engine bench forward`: our own reference DiT (dit.py, the same
maths) run in bf16 on the GPU under torch.compile, at the engine's benchmark shapes, so that the
engine's forward time has a ratio measured in the same run on the same GPU.

Random weights (std 0.02), random tokens, sigma = 0 (MDLM, as `bench forward` defaults to).
Attention goes through torch's scaled_dot_product_attention where no softcap applies (OWT), and
through dit.py's explicit softmax with the softcap (LM1B), which torch.compile fuses as it can.
Timed with CUDA events: median of --repeats after warm-ups (the first call compiles).

    python3 tools/reference/peer_bench.py --shape owt --json peer-owt.json
"""
import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dit  # noqa: E402  (our reference, beside this file)

# (batch, len, vocab, softcap), as src/bench/mod.rs Shape::dims.
SHAPES = {'owt': (32, 1024, 50258, 0.0), 'lm1b': (512, 128, 30522, 50.0)}
# (hidden, heads, blocks, cond_dim), as src/model/config.rs Preset::Small.
PRESETS = {'small': (768, 12, 12, 128)}


def sdpa_or_explicit(q, k, v, softcap, stats=None):
    if softcap > 0:
        return explicit_attention(q, k, v, softcap, stats)
    B, L, H, hd = q.shape
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return o.transpose(1, 2).reshape(B, L, H * hd)


explicit_attention = dit.attention


def forward(P, cfg, tokens, cos, sin, feat):
    """dit.forward's steps on device tensors (dit.forward itself upcasts to float64 on the CPU)."""
    h = P['vocab_embed.embedding'][tokens]
    t = dit.silu(dit.linear(P, 'sigma_map.mlp.0', feat))
    c = dit.silu(dit.linear(P, 'sigma_map.mlp.2', t))
    for i in range(cfg['blocks']):
        h = dit.block(P, cfg, i, h, c, cos, sin)
    shift, scale = dit.linear(P, 'output_layer.adaLN_modulation', c)[:, None, :].chunk(2, dim=-1)
    y = dit.modulate(dit.layer_norm(h, P['output_layer.norm_final.weight']), shift, scale)
    return dit.linear(P, 'output_layer.linear', y).float()


def time_ms(f, repeats, warmup):
    for _ in range(warmup):
        f()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(repeats)]
    for a, b in ev:
        a.record()
        f()
        b.record()
    torch.cuda.synchronize()
    ms = sorted(a.elapsed_time(b) for a, b in ev)
    return ms[len(ms) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--shape', choices=sorted(SHAPES), default='owt')
    ap.add_argument('--preset', choices=sorted(PRESETS), default='small')
    ap.add_argument('--repeats', type=int, default=10)
    ap.add_argument('--json', help='write the figures here')
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit('peer_bench: no CUDA device visible to torch')
    dev, dt = torch.device('cuda'), torch.bfloat16
    B, L, V, softcap = SHAPES[a.shape]
    D, H, blocks, C = PRESETS[a.preset]
    cfg = {'vocab_size': V, 'hidden': D, 'cond_dim': C, 'heads': H, 'blocks': blocks,
           'algo': 'mdlm', 'mask_index': V - 1, 'softcap': softcap}
    g = torch.Generator(device='cpu').manual_seed(0)
    P = {n: (torch.randn(s, generator=g) * 0.02).to(dev, dt) for n, s in dit.param_shapes(cfg)}
    tokens = torch.randint(0, V, (B, L), generator=g).to(dev)
    cos, sin = (x.to(dev, dt) for x in dit.rotary_cos_sin(L, D // H))
    feat = dit.timestep_features(torch.zeros(B, dtype=torch.float64)).to(dev, dt)
    dit.attention = sdpa_or_explicit

    def eager():
        with torch.no_grad():
            return forward(P, cfg, tokens, cos, sin, feat)

    compiled_fn = torch.compile(forward)

    def compiled():
        with torch.no_grad():
            return compiled_fn(P, cfg, tokens, cos, sin, feat)

    ms_eager = time_ms(eager, a.repeats, 2)
    t0 = time.time()
    out = compiled()
    torch.cuda.synchronize()
    compile_s = time.time() - t0
    assert out.shape == (B, L, V) and torch.isfinite(out).all().item(), 'non-finite peer logits'
    ms = time_ms(compiled, a.repeats, 2)
    n = sum(math.prod(s) for _, s in dit.param_shapes(cfg))
    r = {'device': torch.cuda.get_device_name(), 'torch': torch.__version__, 'shape': a.shape,
         'preset': a.preset, 'batch': B, 'len': L, 'vocab': V, 'params': n,
         'ms_logits': ms, 'ms_eager': ms_eager, 'compile_s': compile_s,
         'memory_gib': torch.cuda.max_memory_allocated() / 2**30}
    print(f"peer {a.preset} {a.shape} B={B} L={L} V={V}: torch.compile {ms:.2f} ms, eager "
          f"{ms_eager:.2f} ms to f32 logits (compile {compile_s:.0f} s) on {r['device']}")
    if a.json:
        with open(a.json + '.tmp', 'w') as f:
            json.dump(r, f, indent=1)
        os.replace(a.json + '.tmp', a.json)


if __name__ == '__main__':
    main()
