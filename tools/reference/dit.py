"""Independent float64 PyTorch reference of the IMDM / MDLM DiT denoiser.

Written from the reference description only (docs/reference.md 2.2, 2.3, 2.5, 3.2, 4.3); it is
NOT derived from any other implementation. It exists to produce parity fixtures for the Rust CPU
reference, so it favours literal, readable maths over speed: everything runs in float64 on the
CPU, in eval mode (no dropout), bidirectional attention only (the causal mode of spec 2.4 is not
modelled). The conditioning takes one sigma per sequence: zeros for MDLM and IMDM (spec 4.2), each
sequence's sigma(t) for a time-conditioned model (spec 2.2, `time_conditioning` in the config).

Parameters are a plain dict `name -> tensor` keyed by the reference names of spec 2.5, without
the `backbone.` prefix (a prefix, if present, is stripped). `cfg` is the engine's config object
(the JSON stored in the safetensors metadata): it needs `algo`, `mask_index`, `heads`, `blocks`,
`softcap` and, for IMDM, `noise_dim`.

    logits = forward(params, cfg, tokens, eps, sigma)     # (B, L, V) float64; sigma (B,) or None
    log_probs = subs_log_probs(logits, tokens, cfg['mask_index'])
"""
import math

import torch

F64 = torch.float64
NEG_INF = -1.0e6  # the reference's "neg_infinity" (spec 4.3)
LN_EPS = 1e-5
ROPE_BASE = 10000.0
TIME_FEATURES = 256  # width of the sinusoidal timestep feature (half = 128 cos, 128 sin)


def param_shapes(cfg):
    """(name, shape) for every trainable parameter, in registration order (spec 2.5).

    This order is also the order of the EMA `shadow_params` list. The buffer
    `rotary_emb.inv_freq` (registered between sigma_map and the blocks) is not included.
    """
    V, D, C = cfg['vocab_size'], cfg['hidden'], cfg['cond_dim']
    R = cfg.get('mlp_ratio', 4) * D
    out = [('vocab_embed.embedding', (V, D))]
    if cfg['algo'] == 'imdm':
        nd = cfg['noise_dim']
        out += [('vocab_embed.imdm_mlp.0.weight', (R, nd)), ('vocab_embed.imdm_mlp.0.bias', (R,)),
                ('vocab_embed.imdm_mlp.2.weight', (D, R))]
    out += [('sigma_map.mlp.0.weight', (C, TIME_FEATURES)), ('sigma_map.mlp.0.bias', (C,)),
            ('sigma_map.mlp.2.weight', (C, C)), ('sigma_map.mlp.2.bias', (C,))]
    for i in range(cfg['blocks']):
        p = f'blocks.{i}.'
        out += [(p + 'norm1.weight', (D,)), (p + 'attn_qkv.weight', (3 * D, D)),
                (p + 'attn_out.weight', (D, D)), (p + 'norm2.weight', (D,)),
                (p + 'mlp.0.weight', (R, D)), (p + 'mlp.0.bias', (R,)),
                (p + 'mlp.2.weight', (D, R)), (p + 'mlp.2.bias', (D,)),
                (p + 'adaLN_modulation.weight', (6 * D, C)), (p + 'adaLN_modulation.bias', (6 * D,))]
    out += [('output_layer.norm_final.weight', (D,)), ('output_layer.linear.weight', (V, D)),
            ('output_layer.linear.bias', (V,)),
            ('output_layer.adaLN_modulation.weight', (2 * D, C)),
            ('output_layer.adaLN_modulation.bias', (2 * D,))]
    return out


# ----------------------------------------------------------------------------- elementwise maths
def silu(x):
    return x * torch.sigmoid(x)


def gelu_tanh(x):
    """tanh-approximate GELU, used by the block MLPs."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def gelu_exact(x):
    """exact (erf) GELU, used only by the IMDM noise MLP `imdm_mlp`."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def linear(P, name, x, bias=True):
    """PyTorch Linear convention: y = x W^T (+ b)."""
    y = torch.matmul(x, P[name + '.weight'].transpose(0, 1))
    return y + P[name + '.bias'] if bias else y


def layer_norm(x, weight):
    """LayerNorm over the last axis: no affine bias, biased variance, eps 1e-5, times `weight`."""
    mu = x.mean(dim=-1, keepdim=True)
    var = ((x - mu) ** 2).mean(dim=-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + LN_EPS) * weight


def modulate(z, shift, scale):
    return z * (1.0 + scale) + shift


# ----------------------------------------------------------------------------- conditioning
def timestep_features(sigma):
    """[cos(sigma f_k)]_k ++ [sin(sigma f_k)]_k, f_k = exp(-ln(10000) k / 128), k = 0..127.

    With sigma = 0 (always, for MDLM and IMDM) this is exactly [1]*128 ++ [0]*128. The frequency
    ladder is float64 here (the reference builds it in bf16; docs/reference.md deviation 14.42).
    """
    half = TIME_FEATURES // 2
    k = torch.arange(half, dtype=F64)
    freqs = torch.exp(-math.log(10000.0) * k / half)
    args = sigma.to(F64)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def conditioning(P, sigma):
    """c = SiLU(Linear2(SiLU(Linear1(feat)))): sigma_map's own SiLU plus the one DIT.forward adds."""
    t = silu(linear(P, 'sigma_map.mlp.0', timestep_features(sigma)))
    return silu(linear(P, 'sigma_map.mlp.2', t))  # (B, cond)


# ----------------------------------------------------------------------------- attention
def rotary_cos_sin(L, hd):
    """(L, hd/2) tables: angle[pos, i] = pos * inv_freq_i, inv_freq_i = 1 / 10000^(2i/hd).

    Computed in float64 from the formula (the stored `rotary_emb.inv_freq` buffer is ignored).
    """
    i = torch.arange(hd // 2, dtype=F64)
    inv_freq = 1.0 / ROPE_BASE ** (2.0 * i / hd)
    ang = torch.arange(L, dtype=F64)[:, None] * inv_freq[None, :]
    return torch.cos(ang), torch.sin(ang)


def apply_rotary(x, cos, sin):
    """GPT-NeoX rotate-half over the full head dim. x: (B, L, H, hd); cos, sin: (L, hd/2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def attention(q, k, v, softcap, stats=None):
    """Bidirectional softmax attention, no mask, scale 1/sqrt(hd), optional tanh softcap.

    q, k, v: (B, L, H, hd). Returns (B, L, H*hd) with heads concatenated head-major
    (the inverse of the (H, hd) split of the qkv projection).
    """
    B, L, H, hd = q.shape
    s = torch.einsum('blhd,bmhd->bhlm', q, k) / math.sqrt(hd)
    if stats is not None:  # largest raw score, to show that a softcap really bites
        stats['max_abs_score'] = max(stats.get('max_abs_score', 0.0), s.abs().max().item())
    if softcap > 0:  # softcap <= 0 means off
        s = softcap * torch.tanh(s / softcap)
    p = torch.softmax(s, dim=-1)
    o = torch.einsum('bhlm,bmhd->blhd', p, v)
    return o.reshape(B, L, H * hd)


# ----------------------------------------------------------------------------- the network
def block(P, cfg, i, h, c, cos, sin, stats=None):
    """One DDiTBlock in eval mode (spec 2.3). h: (B, L, D) residual stream; c: (B, cond)."""
    p = f'blocks.{i}.'
    B, L, D = h.shape
    H = cfg['heads']
    hd = D // H
    mod = linear(P, p + 'adaLN_modulation', c)[:, None, :]  # (B, 1, 6D)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)

    # attention branch
    a = modulate(layer_norm(h, P[p + 'norm1.weight']), shift_msa, scale_msa)
    # last axis of the 3D projection is ordered (three, head, dim): all q heads, then k, then v
    qkv = linear(P, p + 'attn_qkv', a, bias=False).reshape(B, L, 3, H, hd)
    q = apply_rotary(qkv[:, :, 0], cos, sin)
    k = apply_rotary(qkv[:, :, 1], cos, sin)
    v = qkv[:, :, 2]  # no rotary on v
    o = linear(P, p + 'attn_out', attention(q, k, v, float(cfg.get('softcap', 0.0)), stats),
               bias=False)
    h = h + gate_msa * o

    # MLP branch (tanh GELU)
    m = modulate(layer_norm(h, P[p + 'norm2.weight']), shift_mlp, scale_mlp)
    m = linear(P, p + 'mlp.2', gelu_tanh(linear(P, p + 'mlp.0', m)))
    return h + gate_mlp * m


def _prepare(params):
    """Strip an optional `backbone.` prefix and upcast everything to float64."""
    out = {}
    for k, v in params.items():
        if k.startswith('backbone.'):
            k = k[len('backbone.'):]
        out[k] = v.detach().to(device='cpu', dtype=F64)
    return out


def forward(params, cfg, tokens, eps=None, sigma=None, stats=None):
    """Logits (B, L, V), float64.

    tokens: (B, L) int64. eps: (B, L, noise_dim), used as given (no reset redraw); required for
    IMDM, ignored for MDLM. sigma: (B,), each sequence's sigma(t) for a time-conditioned model;
    defaults to zeros (no time conditioning, spec 4.2).
    stats: optional dict that receives 'max_abs_score' (largest |q.k|/sqrt(hd) before softcap).
    """
    P = _prepare(params)
    tokens = tokens.to(device='cpu', dtype=torch.int64)
    B, L = tokens.shape
    D = P['vocab_embed.embedding'].shape[1]

    # 1. embedding, plus the IMDM noise embedding at positions that hold the mask token (3.2)
    h = P['vocab_embed.embedding'][tokens]
    if cfg['algo'] == 'imdm':
        if eps is None:
            raise ValueError('IMDM forward needs eps of shape (B, L, noise_dim)')
        e = eps.to(device='cpu', dtype=F64)
        assert e.shape == (B, L, cfg['noise_dim']), e.shape
        inj = linear(P, 'vocab_embed.imdm_mlp.2',
                     gelu_exact(linear(P, 'vocab_embed.imdm_mlp.0', e)), bias=False)
        mask = (tokens == cfg['mask_index']).to(F64)
        h = h + mask[..., None] * inj
    elif cfg['algo'] != 'mdlm':
        raise ValueError(f"unknown algo {cfg['algo']!r}")

    # 2. conditioning vectors, one per sequence (all equal when sigma = 0)
    if sigma is None:
        sigma = torch.zeros(B, dtype=F64)
    c = conditioning(P, sigma)

    # 3-4. rotary tables and the blocks
    cos, sin = rotary_cos_sin(L, D // cfg['heads'])
    for i in range(cfg['blocks']):
        h = block(P, cfg, i, h, c, cos, sin, stats)

    # 5. final layer: (shift, scale) in that order
    shift, scale = linear(P, 'output_layer.adaLN_modulation', c)[:, None, :].chunk(2, dim=-1)
    y = modulate(layer_norm(h, P['output_layer.norm_final.weight']), shift, scale)
    return linear(P, 'output_layer.linear', y)


def subs_log_probs(logits, tokens, mask_index):
    """SUBS parameterisation (spec 4.3), in float64.

    1. logit[mask_index] := -1e6;  2. log_softmax over V;
    3. carry-over: at every position whose input token is not the mask id, the row becomes
       0 at the input token and -1e6 elsewhere.
    """
    x = logits.to(F64).clone()
    x[..., mask_index] = NEG_INF
    lp = torch.log_softmax(x, dim=-1)
    carry = torch.full_like(lp, NEG_INF)
    carry.scatter_(-1, tokens[..., None].to(torch.int64), 0.0)
    unmasked = (tokens != mask_index)[..., None]
    return torch.where(unmasked, carry, lp)
