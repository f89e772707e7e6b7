#!/usr/bin/env python3
"""Independent reference for the judge (src/eval/judge): writes the committed fixtures under
tests/fixtures/judge/ that tests/judge.rs checks the engine against.

  tiny-llama.gguf   arch llama, pre-tokenizer smollm, tied output, interleaved rotary
  tiny-qwen2.gguf   arch qwen2, pre-tokenizer qwen2, untied F16 output, q/k/v biases, rotary on
                    channel halves
  expected.json     per model: sequences, log-probs at every position, the final normed hidden
                    state at the last position (at every position for the first sequence);
                    tokenizer cases (text -> ids) for the tiny vocabulary and, with --smollm2 /
                    --qwen FILE, for SmolLM2-135M's and Qwen2.5's
  smollm2-vocab.gguf  with --smollm2: SmolLM2's tokenizer metadata only (no tensors)

Both models are random (seeded) with 2 layers, d 64, 4 heads over 2 kv heads, FFN 256, a
byte-level BPE of 256 bytes + 3 specials + merges learned here. Weights mix F32 norms, Q8_0,
Q4_1 (quantised by the gguf package), Q4_K and Q6_K (the gguf package only dequantises
k-quants, so their blocks are random bytes with bounded f16 scales: the dequantiser defines
their values) and F16. The forward is numpy in float64 on the weights dequantised by the
gguf package from the written file. The tokenizer is a plain-Python byte-level BPE with the
pre-tokenizer rules of each family (smollm: every digit alone, then GPT-2's split; qwen2: NFC,
then Qwen2's split), sharing no code with the `tokenizers` library.

Usage: pip install gguf numpy regex
       python3 tools/reference/judge_ref.py [--out tests/fixtures/judge] \
           [--smollm2 data/judges/smollm2.gguf] [--qwen data/judges/qwen-0.5b.gguf]
"""
import argparse
import json
import os
import unicodedata

import gguf
import numpy as np
import regex

GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

TOKENIZER_SENTENCES = [
    "Hello world!",
    "The year 2024 had 365 days, and 1,000,000 people counted 3.14159 twice.",
    "Don't stop: it's what we'll do, isn't it? (Yes.)",
    "Café naïve façade — Ünïcödé, 東京タワー, Привет мир, emoji 🙂!",
    "<|endoftext|>A new document starts here.<|endoftext|>",
    "<|im_start|>user\nWhat is 12+30?<|im_end|>\n",
    "   leading spaces, trailing tabs\t\tand\n\nnewlines\r\n",
    "e\u0301 composed vs \u00e9 precomposed",
]


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


BYTE_CHARS = bytes_to_unicode()


class RefTokenizer:
    """Byte-level BPE: specials split out first, then the family's pre-tokenizer, then merges by
    rank on each piece's GPT-2 byte spelling."""

    def __init__(self, tokens, merges, token_types, family):
        self.ids = {t: i for i, t in enumerate(tokens)}
        self.ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
        self.specials = sorted((t for t, ty in zip(tokens, token_types) if ty in (3, 4)), key=len, reverse=True)
        self.family = family

    def pieces(self, text):
        if self.family == "smollm":
            out = []
            for part in regex.split(r"(\p{N})", text):
                if part:
                    out.extend(regex.findall(GPT2_SPLIT, part))
            return out
        if self.family == "qwen2":
            return regex.findall(QWEN2_SPLIT, unicodedata.normalize("NFC", text))
        raise ValueError(self.family)

    def bpe(self, word):
        parts = list(word)
        while len(parts) > 1:
            best = min(range(len(parts) - 1), key=lambda i: self.ranks.get((parts[i], parts[i + 1]), 1 << 60))
            if (parts[best], parts[best + 1]) not in self.ranks:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        return [self.ids[p] for p in parts]

    def encode(self, text):
        ids = []
        i = 0
        plain = ""
        while i < len(text):
            sp = next((s for s in self.specials if text.startswith(s, i)), None)
            if sp is None:
                plain += text[i]
                i += 1
                continue
            ids.extend(self.encode_plain(plain))
            plain = ""
            ids.append(self.ids[sp])
            i += len(sp)
        ids.extend(self.encode_plain(plain))
        return ids

    def encode_plain(self, text):
        ids = []
        for p in self.pieces(text):
            ids.extend(self.bpe("".join(BYTE_CHARS[b] for b in p.encode("utf-8"))))
        return ids


def learn_merges(corpus, family, n_merges):
    """Plain BPE training on the byte spellings of the corpus pieces."""
    tok = RefTokenizer([], [], [], family)
    words = {}
    for p in tok.pieces(corpus):
        w = tuple(BYTE_CHARS[b] for b in p.encode("utf-8"))
        words[w] = words.get(w, 0) + 1
    merges = []
    for _ in range(n_merges):
        pairs = {}
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] = pairs.get((a, b), 0) + c
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append(f"{a} {b}")
        new = {}
        for w, c in words.items():
            out = []
            i = 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] = new.get(tuple(out), 0) + c
        words = new
    return merges


CORPUS = (
    "the quick brown fox jumps over the lazy dog. the dog sleeps in the sun, and the fox runs "
    "into the woods. there is nothing in the world that the fox fears more than the hunter. "
    "in 1851 the whale was seen near the island; the sailors counted 42 ships and 7 boats. "
    "we'll see what they're doing, and it's not what you'd think. café, naïve, déjà vu. "
) * 3


# ---------------------------------------------------------------- model
D, HEADS, KV, HD, FFN, LAYERS, CTX = 64, 4, 2, 16, 256, 2, 256


def random_kquant_blocks(rng, qtype, rows, cols):
    """Random raw k-quant blocks with bounded f16 scales (values of order 1)."""
    bsize, tsize = gguf.GGML_QUANT_SIZES[qtype]
    nb = rows * cols // bsize
    raw = rng.integers(0, 256, size=(nb, tsize), dtype=np.uint8)
    if qtype == gguf.GGMLQuantizationType.Q4_K:
        d = rng.uniform(0.0002, 0.0006, nb).astype(np.float16)
        dmin = rng.uniform(0.0001, 0.0005, nb).astype(np.float16)
        raw[:, 0:2] = d.view(np.uint8).reshape(nb, 2)
        raw[:, 2:4] = dmin.view(np.uint8).reshape(nb, 2)
    elif qtype == gguf.GGMLQuantizationType.Q6_K:
        d = rng.uniform(0.0001, 0.0003, nb).astype(np.float16)
        raw[:, tsize - 2:] = d.view(np.uint8).reshape(nb, 2)
    else:
        raise ValueError(qtype)
    return raw.reshape(rows, cols // bsize * tsize)


def make_model(path, arch, family, tokens, merges, types, rng):
    Q = gguf.GGMLQuantizationType
    vocab = len(tokens)
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"tiny random {arch} judge fixture")
    w.add_context_length(CTX)
    w.add_embedding_length(D)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0 if arch == "llama" else 1000000.0)
    w.add_rope_dimension_count(HD)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(family)
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def put(name, rows, cols, qtype, scale):
        if qtype in (Q.Q4_K, Q.Q6_K):
            raw = random_kquant_blocks(rng, qtype, rows, cols)
            w.add_tensor(name, raw, raw_dtype=qtype)
            return
        x = (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
        if rows == 1:
            x = x.reshape(cols)
        if qtype == Q.F32:
            w.add_tensor(name, x)
        elif qtype == Q.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            q = gguf.quants.quantize(x.reshape(rows, cols), qtype)
            w.add_tensor(name, q, raw_dtype=qtype)

    put("token_embd.weight", vocab, D, Q.Q8_0 if arch == "llama" else Q.F16, 0.3)
    for i in range(LAYERS):
        b = f"blk.{i}."
        put(b + "attn_norm.weight", 1, D, Q.F32, 0.0)
        put(b + "attn_q.weight", HEADS * HD, D, Q.Q8_0, 0.25)
        put(b + "attn_k.weight", KV * HD, D, Q.Q8_0, 0.25)
        put(b + "attn_v.weight", KV * HD, D, Q.Q4_1, 0.2)
        put(b + "attn_output.weight", D, HEADS * HD, Q.Q4_1, 0.15)
        if arch == "qwen2":
            put(b + "attn_q.bias", 1, HEADS * HD, Q.F32, 0.1)
            put(b + "attn_k.bias", 1, KV * HD, Q.F32, 0.1)
            put(b + "attn_v.bias", 1, KV * HD, Q.F32, 0.1)
        put(b + "ffn_norm.weight", 1, D, Q.F32, 0.0)
        put(b + "ffn_gate.weight", FFN, D, Q.Q8_0 if i == 0 else Q.Q4_1, 0.2)
        put(b + "ffn_up.weight", FFN, D, Q.Q4_1, 0.2)
        put(b + "ffn_down.weight", D, FFN, Q.Q4_K if i == 0 else Q.Q6_K, 0.0)
    put("output_norm.weight", 1, D, Q.F32, 0.0)
    if arch == "qwen2":
        put("output.weight", vocab, D, Q.F16, 0.3)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def fix_norms(path):
    """Norm weights were written as zeros; give them values near 1 in place (F32 is raw)."""
    r = gguf.GGUFReader(path, "r+")
    rng = np.random.default_rng(7)
    for t in r.tensors:
        if t.name.endswith("norm.weight"):
            t.data[...] = (1.0 + 0.2 * rng.standard_normal(t.data.shape)).astype(np.float32)


def load_weights(path):
    r = gguf.GGUFReader(path)
    out = {}
    for t in r.tensors:
        x = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
        out[t.name] = x.reshape([int(v) for v in reversed(t.shape)]) if len(t.shape) > 1 else x.reshape(-1)
    return out


def rmsnorm(x, w, eps=1e-5):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope(x, base, style):
    """x [n, heads, hd]; positions 0..n."""
    n, _, hd = x.shape
    half = hd // 2
    inv = base ** (-2.0 * np.arange(half) / hd)
    ang = np.arange(n)[:, None] * inv[None, :]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    y = x.copy()
    if style == "interleaved":
        a, b = x[..., 0::2], x[..., 1::2]
        y[..., 0::2] = a * c - b * s
        y[..., 1::2] = a * s + b * c
    else:
        a, b = x[..., :half], x[..., half:]
        y[..., :half] = a * c - b * s
        y[..., half:] = a * s + b * c
    return y


def forward(W, ids, arch):
    style = "interleaved" if arch == "llama" else "halves"
    base = 10000.0 if arch == "llama" else 1000000.0
    x = W["token_embd.weight"][ids]
    n = len(ids)
    mask = np.tril(np.ones((n, n), dtype=bool))
    for i in range(LAYERS):
        b = f"blk.{i}."
        h = rmsnorm(x, W[b + "attn_norm.weight"])
        q = h @ W[b + "attn_q.weight"].T + W.get(b + "attn_q.bias", 0.0)
        k = h @ W[b + "attn_k.weight"].T + W.get(b + "attn_k.bias", 0.0)
        v = h @ W[b + "attn_v.weight"].T + W.get(b + "attn_v.bias", 0.0)
        q = rope(q.reshape(n, HEADS, HD), base, style)
        k = rope(k.reshape(n, KV, HD), base, style)
        v = v.reshape(n, KV, HD)
        a = np.zeros((n, HEADS, HD))
        for hh in range(HEADS):
            g = hh // (HEADS // KV)
            s = q[:, hh] @ k[:, g].T / np.sqrt(HD)
            s = np.where(mask, s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            a[:, hh] = p @ v[:, g]
        x = x + a.reshape(n, HEADS * HD) @ W[b + "attn_output.weight"].T
        h = rmsnorm(x, W[b + "ffn_norm.weight"])
        gt = h @ W[b + "ffn_gate.weight"].T
        up = h @ W[b + "ffn_up.weight"].T
        x = x + (gt / (1 + np.exp(-gt)) * up) @ W[b + "ffn_down.weight"].T
    z = rmsnorm(x, W["output_norm.weight"])
    out = W.get("output.weight", W["token_embd.weight"])
    logits = z @ out.T
    m = logits.max(-1, keepdims=True)
    lsm = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    lp = [float(lsm[j - 1, ids[j]]) for j in range(1, n)]
    return lp, z


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/judge")
    ap.add_argument("--smollm2", default=None, help="SmolLM2 GGUF: its tokenizer cases and smollm2-vocab.gguf")
    ap.add_argument("--qwen", default=None, help="Qwen2.5 GGUF (qwen-0.5b): its tokenizer cases")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    expected = {"models": {}, "tokenizer": {}}
    rng = np.random.default_rng(20261202)
    for arch, family in (("llama", "smollm"), ("qwen2", "qwen2")):
        merges = learn_merges(CORPUS, family, 80)
        tokens = SPECIALS + [BYTE_CHARS[b] for b in range(256)] + [m.replace(" ", "") for m in merges]
        # A merge can recreate an existing token; keep the vocabulary unique.
        seen, uniq_tokens = set(), []
        for t in tokens:
            if t not in seen:
                seen.add(t)
                uniq_tokens.append(t)
        tokens = uniq_tokens
        types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
        name = f"tiny-{arch}.gguf"
        path = os.path.join(args.out, name)
        make_model(path, arch, family, tokens, merges, types, rng)
        fix_norms(path)
        W = load_weights(path)
        tok = RefTokenizer(tokens, merges, types, family)
        text_ids = tok.encode("The fox counted 1851 whales; the dog slept. <|endoftext|>Café!")
        seqs = [
            text_ids,
            [int(v) for v in rng.integers(0, len(tokens), 150)],
            [int(v) for v in rng.integers(0, len(tokens), 9)],
            [5],
        ]
        cases = []
        for ci, s in enumerate(seqs):
            lp, z = forward(W, s, arch)
            case = {"ids": s, "log_probs": lp, "final_hidden": z[-1].tolist()}
            if ci == 0:
                case["hidden"] = z.reshape(-1).tolist()
            cases.append(case)
        expected["models"][name] = {"arch": arch, "pre": family, "vocab": len(tokens), "d_model": D, "cases": cases}
        expected["tokenizer"][name] = [{"text": t, "ids": tok.encode(t)} for t in TOKENIZER_SENTENCES]
        print(f"{name}: {os.path.getsize(path)} bytes, vocab {len(tokens)}")
    for key, path in (("smollm2", args.smollm2), ("qwen-0.5b", args.qwen)):
        if not path:
            continue
        r = gguf.GGUFReader(path)
        f = r.fields
        tokens = f["tokenizer.ggml.tokens"].contents()
        merges = f["tokenizer.ggml.merges"].contents()
        types = f["tokenizer.ggml.token_type"].contents()
        pre = f["tokenizer.ggml.pre"].contents()
        tok = RefTokenizer(tokens, merges, types, pre)
        expected["tokenizer"][key] = [{"text": t, "ids": tok.encode(t)} for t in TOKENIZER_SENTENCES]
        if key == "smollm2":
            # The tokenizer metadata alone (no tensors), so the tokenizer test runs without the
            # 98 MB model.
            vocab_path = os.path.join(args.out, "smollm2-vocab.gguf")
            w = gguf.GGUFWriter(vocab_path, f["general.architecture"].contents())
            w.add_name("SmolLM2-135M-Instruct tokenizer (Apache-2.0), no tensors")
            w.add_tokenizer_model(f["tokenizer.ggml.model"].contents())
            w.add_tokenizer_pre(pre)
            w.add_token_list(tokens)
            w.add_token_merges(merges)
            w.add_token_types(types)
            w.add_eos_token_id(int(f["tokenizer.ggml.eos_token_id"].contents()))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
            print(f"{vocab_path}: {os.path.getsize(vocab_path)} bytes")
    with open(os.path.join(args.out, "expected.json"), "w") as fh:
        json.dump(expected, fh, ensure_ascii=False)
    print("wrote", os.path.join(args.out, "expected.json"))


if __name__ == "__main__":
    main()
