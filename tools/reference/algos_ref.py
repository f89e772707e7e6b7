"""Parity fixtures for the baselines' losses and sampler steps (AR, SEDD absorbing, D3PM
absorbing), in torch float64, written from the official maths (algo.py's AR, SEDDAbsorb and
D3PMAbsorb, trainer_base.py's AbsorbingState and sample_categorical; docs/reference.md).

    PYTHONPATH=... python3 tools/reference/algos_ref.py --out tests/fixtures/algos_ref.json

Each loss is computed the way the reference composes it (mask logit, log-softmax or score,
gather, per-token terms, sum over tokens / norm) on fixed random logits; the gradient on the
logits comes from autograd. Each sampler step takes fixed draws: Gumbel values for AR, race
uniforms U for the absorbing samplers (the category is argmax p / (1e-10 - ln(U + 1e-10))).
CPU only; needs torch.
"""
import argparse
import json
import math

import torch

F64 = torch.float64
NEG_INF = -1000000.0
EPS_S = 1e-3


def flat(t):
    return [float(x) for x in t.detach().reshape(-1).tolist()]


def race(p, u):
    return int(torch.argmax(p / (1e-10 - torch.log(u + 1e-10))).item())


def ar_case(g):
    v, mask, rows, norm = 7, 6, 5, 9.0
    z = torch.randn(rows, v, dtype=F64, generator=g) * 2.0
    z.requires_grad_(True)
    target = torch.randint(0, v - 1, (rows,), generator=g)
    out = z.clone()
    out[:, mask] = NEG_INF
    lp = out.log_softmax(-1)
    nll = -lp.gather(-1, target[:, None])[:, 0]
    loss = nll.sum() / norm
    loss.backward()
    # One sampling step per row: log-softmax (mask at -1e6) plus float64 Gumbel noise.
    gum = -torch.log(-torch.log(torch.rand(rows, v, dtype=F64, generator=g)))
    tokens = (lp.detach() + gum).argmax(-1)
    return dict(v=v, mask=mask, norm=norm, logits=flat(z), targets=target.tolist(),
                loss=float(loss.detach()), grad=flat(z.grad),
                step=dict(gumbel=flat(gum), tokens=tokens.tolist()))


def sedd_score(z, xt, sigma):
    """SEDDAbsorb._process_model_output: log score."""
    v = z.shape[-1]
    esigm1_log = torch.where(sigma < 0.5, torch.expm1(sigma), sigma.exp() - 1).log()
    out = z - esigm1_log[:, None, None] - math.log(v - 1)
    return torch.scatter(out, -1, xt[..., None], torch.zeros_like(out[..., :1]))


def sedd_case(g):
    v, mask, b, l = 7, 6, 3, 4
    norm = float(b * l)
    sigma = torch.tensor([0.05, 0.4, 2.3], dtype=F64)  # both branches of the expm1 rule
    alpha = torch.exp(-sigma)
    z = torch.randn(b, l, v, dtype=F64, generator=g)
    z.requires_grad_(True)
    x0 = torch.randint(0, v - 1, (b, l), generator=g)
    xt = torch.where(torch.rand(b, l, generator=g) < 0.6, torch.full_like(x0, mask), x0)
    log_s = sedd_score(z, xt, sigma)
    # nll_per_token: dsigma = -dalpha/alpha with dalpha = -(1 - eps).
    dsigma = (1 - EPS_S) / alpha[:, None]
    masked = xt == mask
    q_ratio = 1 / torch.expm1(sigma)[:, None].expand_as(xt)[masked]
    neg = q_ratio * log_s[masked].gather(-1, x0[masked][:, None])[:, 0]
    score = log_s[masked].exp()
    pos = score[:, :-1].sum(-1)  # mask is the last id
    const = q_ratio * (q_ratio.log() - 1)
    ent = torch.zeros(b, l, dtype=F64)
    ent[masked] += pos - neg + const
    loss = (dsigma * ent).sum() / norm
    loss.backward()
    # One analytic step and one denoiser (last) step at a masked position.
    steps = {}
    for kind, dsig in (('analytic', 0.3), ('denoiser', None)):
        st = torch.tensor([0.9], dtype=F64)
        zr = torch.randn(1, 1, v, dtype=F64, generator=g)
        xr = torch.tensor([[mask]])
        s = sedd_score(zr, xr, st).exp()
        d = torch.tensor([dsig if dsig is not None else float(st)], dtype=F64)
        extra = (1 - d.exp()) * s.sum(-1)
        stag = s * d.exp()[:, None, None]
        stag[..., mask] += extra
        edge = torch.exp(-d)[:, None, None] * torch.nn.functional.one_hot(xr, v).to(F64)
        edge += (1 - torch.exp(-d))[:, None, None]
        p = (stag * edge)[0, 0]
        if kind == 'denoiser':
            p[mask] = 0
        u = torch.rand(v, dtype=F64, generator=g)
        steps[kind] = dict(logits=flat(zr), sigma=float(st), dsigma=float(d), probs=flat(p),
                           uniforms=flat(u), token=race(p, u))
    return dict(v=v, mask=mask, len=l, norm=norm, sigma=flat(sigma), logits=flat(z),
                xt=xt.reshape(-1).tolist(), x0=x0.reshape(-1).tolist(),
                loss=float(loss.detach()), grad=flat(z.grad), **steps)


def d3pm_vb(log_x, xt, x0, alpha_t, T, mask, corrected):
    """D3PMAbsorb.nll_per_token's diffusion term (without the reconstruction)."""
    dt = 1 / T
    t = (1 - alpha_t).clamp(0.0, 1.0 - 1e-4)
    a_t = alpha_t + torch.zeros_like(xt, dtype=F64)
    a_s = (1 - (t - dt) if corrected else t - dt) + torch.zeros_like(xt, dtype=F64)
    lx0 = log_x.gather(-1, x0[:, :, None])[:, :, 0]
    xm = log_x[:, :, mask].exp()
    t1c = dt / t
    t1n = torch.log(a_t * xm / t + 1)
    t2c = 1 - dt / t
    t2d = torch.log(a_s * xm / (t - dt) + 1)
    lvb = t1c * (t1n - lx0) + t2c * (t1n - t2d)
    return T * lvb * (xt == mask)


def d3pm_case(g):
    v, mask, b, l, T = 7, 6, 3, 4, 10
    norm = float(b * l)
    td = torch.tensor([0.3, 0.7, 1.0], dtype=F64)
    alpha_t = (1 - (1 - EPS_S) * td)[:, None]
    x0 = torch.randint(0, v - 1, (b, l), generator=g)
    xt = torch.where(torch.rand(b, l, generator=g) < 0.6, torch.full_like(x0, mask), x0)
    z = torch.randn(b, l, v, dtype=F64, generator=g)
    out = dict(v=v, mask=mask, len=l, T=T, norm=norm, alpha_t=flat(alpha_t), logits=flat(z),
               xt=xt.reshape(-1).tolist(), x0=x0.reshape(-1).tolist())
    for name, corrected in (('as_written', False), ('corrected', True)):
        zz = z.clone().requires_grad_(True)
        loss = d3pm_vb(zz.log_softmax(-1), xt, x0, alpha_t, T, mask, corrected).sum() / norm
        loss.backward()
        out["vb_" + name] = float(loss.detach())
        out['grad_' + name] = flat(zz.grad)
    # Reconstruction: -log x_theta(x0) of the clean input's forward (sigma = 0), every position.
    z0 = torch.randn(b, l, v, dtype=F64, generator=g).requires_grad_(True)
    rec = (-z0.log_softmax(-1).gather(-1, x0[:, :, None])[:, :, 0]).sum() / norm
    rec.backward()
    out.update(recon_logits=flat(z0), recon=float(rec.detach()), recon_grad=flat(z0.grad))
    # One ancestral step at a masked position (AbsorbingState._ancestral_update).
    zr = torch.randn(v, dtype=F64, generator=g)
    a_t, a_s = 0.4, 0.55
    q = zr.softmax(-1) * (a_s - a_t)
    q[mask] = 1 - a_s
    u = torch.rand(v, dtype=F64, generator=g)
    out['step'] = dict(logits=flat(zr), alpha_t=a_t, alpha_s=a_s, weights=flat(q),
                       uniforms=flat(u), token=race(q, u))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--out', required=True)
    a = ap.parse_args()
    g = torch.Generator().manual_seed(20261202)
    fx = dict(ar=ar_case(g), sedd=sedd_case(g), d3pm=d3pm_case(g))
    with open(a.out, 'w') as f:
        json.dump(fx, f, indent=1)
        f.write('\n')


if __name__ == '__main__':
    main()
