#!/usr/bin/env python3
"""Checks `imdm-engine data prepare` against the reference pipeline run with HF transformers.

Rebuilds the reference tokenizers offline from the vendored files, as the reference's
`dataloader.get_tokenizer` configures them (GPT-2: BertProcessing(bos, eos) post-processor and
an added `[PAD]`; BERT: bos := [CLS], eos := [SEP]), takes BOS/EOS as the reference's
`get_dataset` does (`tokenizer.encode(tokenizer.eos_token)[0]`), tokenizes every document without
special tokens, appends EOS, concatenates per split and wraps as `_group_texts` does, then
compares every sequence with the engine's shards.

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install transformers==4.38.2 numpy
    (transformers 5 no longer builds these tokenizers from vocab files; 4.38.2 is of the
    MDLM era)
    /tmp/venv/bin/python tools/reference/data_parity.py data/shards/gpt2-1024

Reads the manifest for the tokenizer, length, inputs and held-out rule; exits non-zero on the
first difference. Needs no network.
"""

import hashlib
import json
import os
import sys

import numpy as np
import tokenizers
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ASSETS = os.path.join(ROOT, "assets", "tokenizers")


def reference_tokenizer(kind):
    if kind == "gpt2":
        t = transformers.GPT2TokenizerFast(
            vocab_file=os.path.join(ASSETS, "gpt2/encoder.json"),
            merges_file=os.path.join(ASSETS, "gpt2/vocab.bpe"),
        )
        t._tokenizer.post_processor = tokenizers.processors.BertProcessing(
            (t.bos_token, t.bos_token_id), (t.eos_token, t.eos_token_id)
        )
    else:
        t = transformers.BertTokenizerFast(
            vocab_file=os.path.join(ASSETS, "bert-base-uncased/vocab.txt"), do_lower_case=True
        )
    if t.bos_token is None:
        t.bos_token = t.cls_token
    if t.eos_token is None:
        t.eos_token = t.sep_token
    if t.pad_token is None:
        t.add_special_tokens({"pad_token": "[PAD]"})
    return t


def heldout(rule, doc_id):
    if any(doc_id.startswith(p) for p in rule["heldout_prefixes"]):
        return True
    d = hashlib.sha256(b"imdm-split-v1:" + doc_id.encode("utf-8")).digest()
    return rule["heldout_frac"] > 0 and (int.from_bytes(d[:8], "big") >> 11) / 2**53 < rule["heldout_frac"]


def documents(sources):
    for src in sources:
        if not src["path"].endswith(".jsonl"):
            sys.exit("this check reads .jsonl inputs only (got %s)" % src["path"])
        for n, line in enumerate(open(src["path"], encoding="utf-8"), 1):
            if line.strip():
                r = json.loads(line)
                doc_id = r.get("id") or "%s:%d" % (os.path.basename(src["path"]), n)
                if r["text"].strip():
                    yield doc_id, r["text"]


def main():
    out = sys.argv[1]
    m = json.load(open(os.path.join(out, "manifest.json")))
    kind, length = m["tokenizer"]["kind"], m["length"]
    tok = reference_tokenizer(kind)
    bos = tok.encode(tok.bos_token)[0]
    eos = tok.encode(tok.eos_token)[0]
    print("reference tokenizer %s (transformers %s): BOS=%d EOS=%d pad=%d vocab_size=%d"
          % (kind, transformers.__version__, bos, eos, tok.pad_token_id, tok.vocab_size))
    if m["tokenizer"]["conventions"] == "reference" and (bos, eos) != (m["bos"], m["eos"]):
        sys.exit("BOS/EOS differ: reference %d/%d, manifest %d/%d" % (bos, eos, m["bos"], m["eos"]))
    streams = {"train": [], "valid": []}
    docs = list(documents(m["sources"]))
    texts = [t for _, t in docs]
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    for (doc_id, _), x in zip(docs, ids):
        s = streams["valid" if heldout(m["split_rule"], doc_id) else "train"]
        s.extend(x)
        if m["wrap"]["insert_eos"]:
            s.append(m["eos"])
    for split, stream in streams.items():
        chunk = length - 2
        n = len(stream) // chunk
        want = np.empty((n, length), dtype=np.int64)
        want[:, 0] = m["bos"]
        want[:, -1] = m["eos"]
        want[:, 1:-1] = np.asarray(stream[: n * chunk], dtype=np.int64).reshape(n, chunk)
        dt = {"u16": "<u2", "u32": "<u4"}[m["dtype"]]
        got = np.concatenate(
            [np.fromfile(os.path.join(out, s["file"]), dtype=dt).reshape(-1, length)
             for s in m["splits"][split]["shards"]] or [np.zeros((0, length), dt)]
        ).astype(np.int64)
        if got.shape != want.shape:
            sys.exit("%s: engine %s sequences, reference %s" % (split, got.shape, want.shape))
        diff = np.argwhere(got != want)
        if len(diff):
            i, j = diff[0]
            sys.exit("%s: sequence %d position %d: engine %d, reference %d (%d positions differ)"
                     % (split, i, j, got[i, j], want[i, j], len(diff)))
        print("%s: %d sequences x %d identical (%d tokens)" % (split, n, length, n * length))


if __name__ == "__main__":
    main()
