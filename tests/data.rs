//! Text to batches on committed public-domain fixtures (tests/fixtures/text): tokenizer ids,
//! wrapping, the deterministic held-out split, the manifest, errors on damaged shards, and
//! loader resumption. Needs no downloaded corpus.

use std::path::{Path, PathBuf};
use std::process::Command;

use imdm_engine::data::corpus::{Corpus, TxtMode};
use imdm_engine::data::shards::{Check, Manifest, ShardSet, MANIFEST};
use imdm_engine::data::{
    prepare, Conventions, Loader, LoaderOptions, LoaderPosition, PrepareOptions, SplitRule,
    Tokenizer, TokenizerKind, TRAIN, VALID,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/text")
}

fn options(out: &Path, kind: TokenizerKind, length: usize) -> PrepareOptions {
    PrepareOptions {
        inputs: vec![fixtures()],
        out: out.to_path_buf(),
        tokenizer: kind,
        conventions: Conventions::Reference,
        length,
        split: SplitRule {
            frac: 0.0,
            prefixes: vec!["austen/persuasion/".into()],
        },
        insert_eos: true,
        txt_mode: TxtMode::File,
        text_field: "text".into(),
        shard_mib: 256,
        force: false,
        progress: false,
    }
}

#[test]
fn tokenizer_known_ids() {
    let b = Tokenizer::new(TokenizerKind::Bert, Conventions::Reference).unwrap();
    assert_eq!(
        b.encode_with_specials("Hello world!").unwrap(),
        [101, 7592, 2088, 999, 102]
    );
    assert_eq!((b.vocab_size(), b.mask_index()), (30522, 103));
    let g = Tokenizer::new(TokenizerKind::Gpt2, Conventions::Reference).unwrap();
    assert_eq!(g.encode("Hello world").unwrap(), [15496, 995]);
    assert_eq!((g.vocab_size(), g.mask_index()), (50258, 50257));
    let text = std::fs::read_to_string(fixtures().join("moby-dick-loomings.txt")).unwrap();
    assert_eq!(g.decode(&g.encode(&text).unwrap(), false).unwrap(), text);
}

#[test]
fn corpus_reads_folders_in_order_with_ids() {
    let c = Corpus::open(&[fixtures()], TxtMode::File, "text").unwrap();
    let names: Vec<&str> = c.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "moby-dick-loomings.txt",
            "more/genesis-1.txt",
            "sotu-austen.jsonl"
        ]
    );
    let docs = c.documents().unwrap();
    let ids: Vec<&str> = docs.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "moby-dick-loomings.txt",
            "more/genesis-1.txt",
            "sotu/1790_george_washington_n",
            "austen/pride-and-prejudice/ch01",
            "austen/persuasion/ch01",
            "sotu-austen.jsonl:4",
        ]
    );
    let lines = Corpus::open(
        &[fixtures().join("more/genesis-1.txt")],
        TxtMode::Line,
        "text",
    )
    .unwrap()
    .documents()
    .unwrap();
    assert_eq!(lines[0].id, "genesis-1.txt:1");
    assert!(lines[0].text.starts_with("In the beginning"));
    assert!(lines.len() > 10);
    let err = Corpus::open(&[fixtures()], TxtMode::File, "body")
        .unwrap()
        .documents()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("sotu-austen.jsonl") && err.contains("\"body\""),
        "{err}"
    );
}

/// Every sequence is [BOS] + the next length-2 tokens of (doc ids + EOS)* + [EOS], per split.
#[test]
fn prepare_wraps_as_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bert");
    let m = prepare(&options(&out, TokenizerKind::Bert, 16)).unwrap();
    assert_eq!(
        (m.bos, m.eos, m.mask_index, m.vocab_size),
        (101, 101, 103, 30522)
    );
    let tok = Tokenizer::bert().unwrap();
    let docs = Corpus::open(&[fixtures()], TxtMode::File, "text")
        .unwrap()
        .documents()
        .unwrap();
    for split in [TRAIN, VALID] {
        let mut stream = Vec::new();
        let mut n_docs = 0;
        for d in &docs {
            if d.id.starts_with("austen/persuasion/") == (split == VALID) {
                stream.extend(tok.encode(&d.text).unwrap());
                stream.push(101);
                n_docs += 1;
            }
        }
        let set = ShardSet::open(&out, split, Check::Full).unwrap();
        let info = &m.splits[split];
        assert_eq!(info.documents, n_docs);
        assert_eq!(info.tokens, stream.len() as u64);
        assert_eq!(set.len(), stream.len() as u64 / 14);
        assert_eq!(info.dropped_tokens, stream.len() as u64 % 14);
        for i in 0..set.len() {
            let mut want = vec![101];
            want.extend(&stream[i as usize * 14..][..14]);
            want.push(101);
            assert_eq!(set.get(i), want, "{split} sequence {i}");
        }
    }
    assert_eq!(m.skipped_empty_documents, 1);
    // The clean conventions end blocks and documents with [SEP].
    let out2 = dir.path().join("bert-clean");
    let mut o = options(&out2, TokenizerKind::Bert, 16);
    o.conventions = Conventions::Clean;
    let m2 = prepare(&o).unwrap();
    assert_eq!((m2.bos, m2.eos), (101, 102));
    let s = ShardSet::open(&out2, TRAIN, Check::Full).unwrap().get(0);
    assert_eq!((s[0], s[15]), (101, 102));
}

#[test]
fn split_is_deterministic_by_document_id() {
    let rule = SplitRule {
        frac: 0.1,
        prefixes: vec!["keep/".into()],
    };
    let ids: Vec<String> = (0..20000).map(|i| format!("doc/{i}")).collect();
    let held: Vec<bool> = ids.iter().map(|id| rule.is_heldout(id)).collect();
    let again: Vec<bool> = ids.iter().rev().map(|id| rule.is_heldout(id)).collect();
    assert_eq!(held, again.into_iter().rev().collect::<Vec<_>>());
    let frac = held.iter().filter(|&&h| h).count() as f64 / ids.len() as f64;
    assert!((frac - 0.1).abs() < 0.01, "held-out fraction {frac}");
    assert!(rule.is_heldout("keep/anything"));
    // Pinned: the rule is part of the data format.
    assert!((SplitRule::unit_hash("sotu/1790_george_washington_n") - PINNED_HASH).abs() < 1e-12);

    // Same inputs, same shards, byte for byte.
    let dir = tempfile::tempdir().unwrap();
    let mut o = options(&dir.path().join("a"), TokenizerKind::Gpt2, 64);
    o.split.frac = 0.5;
    let a = prepare(&o).unwrap();
    o.out = dir.path().join("b");
    let b = prepare(&o).unwrap();
    assert_eq!(a.splits, b.splits);
    assert!(a.splits[VALID].documents >= 1 && a.splits[TRAIN].documents >= 1);
}

/// Computed independently: `(int.from_bytes(sha256(b"imdm-split-v1:" + id)[:8], "big") >> 11) / 2**53`.
const PINNED_HASH: f64 = 0.2735106093283225;

#[test]
fn manifest_round_trip_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("g");
    let m = prepare(&options(&out, TokenizerKind::Gpt2, 32)).unwrap();
    let read = Manifest::read(&out).unwrap();
    assert_eq!(read, m);
    let json = serde_json::to_string(&m).unwrap();
    assert_eq!(serde_json::from_str::<Manifest>(&json).unwrap(), m);
    assert_eq!(m.tokenizer.kind, "gpt2");
    assert_eq!(m.tokenizer.files.len(), 2);
    assert_eq!(
        (m.vocab_size, m.mask_index, m.bos, m.eos),
        (50258, 50257, 50256, 50256)
    );
    let shard = &m.splits[TRAIN].shards[0];
    assert_eq!(shard.bytes, shard.sequences * 32 * 2);
    // Shards know which model they fit.
    let set = ShardSet::open(&out, TRAIN, Check::Size).unwrap();
    set.check_model(50258, 50257, 32).unwrap();
    let err = set.check_model(30522, 103, 128).unwrap_err().to_string();
    assert!(
        err.contains("V=50258 mask=50257 length 32 (gpt2 tokenizer)") && err.contains("V=30522"),
        "{err}"
    );
    drop(set);
    // An existing folder is refused without --force and replaced with it.
    let err = prepare(&options(&out, TokenizerKind::Gpt2, 32))
        .unwrap_err()
        .to_string();
    assert!(err.contains("--force"), "{err}");
    let mut o = options(&out, TokenizerKind::Gpt2, 48);
    o.force = true;
    assert_eq!(prepare(&o).unwrap().length, 48);
    let err = ShardSet::open(&out, "test", Check::Size)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("no split \"test\"") && err.contains("train"),
        "{err}"
    );
}

#[test]
fn damaged_shards_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("g");
    let m = prepare(&options(&out, TokenizerKind::Gpt2, 32)).unwrap();
    let file = &m.splits[TRAIN].shards[0].file;
    let path = out.join(file);
    let good = std::fs::read(&path).unwrap();
    let open_err = |check| {
        ShardSet::open(&out, TRAIN, check)
            .err()
            .expect("should fail")
            .to_string()
    };

    // Truncated: the size check names the file and the expected size.
    std::fs::write(&path, &good[..good.len() - 10]).unwrap();
    let err = open_err(Check::Size);
    assert!(
        err.contains(file.as_str()) && err.contains("truncated"),
        "{err}"
    );

    // One flipped byte: only the full check sees it, by sha256.
    let mut bad = good.clone();
    bad[7] ^= 0x55;
    std::fs::write(&path, &bad).unwrap();
    assert!(ShardSet::open(&out, TRAIN, Check::Size).is_ok());
    let err = open_err(Check::Full);
    assert!(
        err.contains(file.as_str()) && err.contains("sha256"),
        "{err}"
    );

    // An id past V, with a manifest that agrees on the checksum: the vocabulary check.
    let mut bad = good.clone();
    bad[2..4].copy_from_slice(&60000u16.to_le_bytes());
    std::fs::write(&path, &bad).unwrap();
    let mut m2 = m.clone();
    m2.splits.get_mut(TRAIN).unwrap().shards[0].sha256 =
        imdm_engine::data::shards::sha256_file(&path).unwrap();
    m2.write(&out).unwrap();
    let err = open_err(Check::Full);
    assert!(
        err.contains("id 60000") && err.contains("outside the vocabulary"),
        "{err}"
    );

    // Missing shard, missing manifest.
    std::fs::remove_file(&path).unwrap();
    let err = open_err(Check::Size);
    assert!(
        err.contains(file.as_str()) && err.contains("cannot be opened"),
        "{err}"
    );
    std::fs::remove_file(out.join(MANIFEST)).unwrap();
    let err = open_err(Check::Size);
    assert!(err.contains("no manifest"), "{err}");
}

fn loader(out: &Path, opts: LoaderOptions) -> Loader {
    Loader::new(ShardSet::open(out, TRAIN, Check::Size).unwrap(), opts).unwrap()
}

#[test]
fn loader_resume_gives_the_same_batches() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("g");
    prepare(&options(&out, TokenizerKind::Gpt2, 8)).unwrap();
    let opts = LoaderOptions::train(5, 1234);
    let mut full = loader(&out, opts);
    let n = full.shards().len();
    assert!(n >= 100, "{n} sequences");
    let per_epoch = full.batches_per_epoch();
    assert_eq!(per_epoch, n / 5);
    let total = (per_epoch * 5 / 2) as usize; // two and a half epochs
    let want: Vec<_> = (0..total).map(|_| full.next_batch()).collect();
    assert!(want.iter().all(|b| b.rows == 5 && b.tokens.len() == 5 * 8));
    assert_eq!(want.last().unwrap().epoch, 2);
    assert_ne!(want[0].indices, want[per_epoch as usize].indices);

    for stop in [0, 1, per_epoch as usize - 1, per_epoch as usize, total - 1] {
        let mut a = loader(&out, opts);
        for b in &want[..stop] {
            assert_eq!(&a.next_batch(), b);
        }
        // Through JSON, as a checkpoint would store it.
        let saved = serde_json::to_string(&a.position()).unwrap();
        drop(a);
        let pos: LoaderPosition = serde_json::from_str(&saved).unwrap();
        let mut b = loader(&out, opts);
        b.seek(&pos).unwrap();
        for (i, w) in want[stop..].iter().enumerate() {
            assert_eq!(&b.next_batch(), w, "resumed at {stop}, batch {i}");
        }
    }

    // A position from another seed or batch size is refused, saying why.
    let pos = full.position();
    let mut other = loader(&out, LoaderOptions::train(5, 99));
    let err = other.seek(&pos).unwrap_err().to_string();
    assert!(err.contains("seed 1234 vs 99"), "{err}");
    let mut other = loader(&out, LoaderOptions::train(4, 1234));
    let err = other.seek(&pos).unwrap_err().to_string();
    assert!(err.contains("batch size 5 vs 4"), "{err}");
}

#[test]
fn loader_epochs_cover_the_split() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("g");
    prepare(&options(&out, TokenizerKind::Gpt2, 8)).unwrap();
    let set = ShardSet::open(&out, TRAIN, Check::Size).unwrap();
    let n = set.len();
    // Shuffled without drop_last: every sequence exactly once per epoch, last batch short.
    let opts = LoaderOptions {
        batch_size: 7,
        seed: 5,
        shuffle: true,
        drop_last: false,
    };
    let mut l = Loader::new(set, opts).unwrap();
    for epoch in 0..2 {
        let mut seen = Vec::new();
        for _ in 0..l.batches_per_epoch() {
            let b = l.next_batch();
            assert_eq!(b.epoch, epoch);
            for (r, &i) in b.indices.iter().enumerate() {
                assert_eq!(&b.tokens[r * 8..][..8], &l.shards().get(i)[..]);
            }
            seen.extend(b.indices);
        }
        seen.sort();
        assert_eq!(seen, (0..n).collect::<Vec<_>>());
    }
    // Evaluation order is the stored order.
    let set = ShardSet::open(&out, TRAIN, Check::Size).unwrap();
    let mut e = Loader::new(set, LoaderOptions::eval(4)).unwrap();
    assert_eq!(e.next_batch().indices, [0, 1, 2, 3]);
    // A split smaller than one batch is refused.
    let set = ShardSet::open(&out, TRAIN, Check::Size).unwrap();
    let err = Loader::new(set, LoaderOptions::train(n as usize + 1, 0))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("fewer than one batch"), "{err}");
}

#[test]
fn cli_prepare_and_info() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cli");
    let bin = env!("CARGO_BIN_EXE_imdm-engine");
    let run = |args: &[&str]| Command::new(bin).args(args).output().unwrap();
    let fx = fixtures();
    let o = run(&[
        "data",
        "prepare",
        "--tokenizer",
        "bert",
        "--input",
        fx.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--length",
        "32",
        "--heldout-prefix",
        "austen/persuasion/",
        "--heldout-frac",
        "0",
        "--quiet",
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.contains("V=30522 mask=103 BOS=101 EOS=101"),
        "{stdout}"
    );
    let o = run(&[
        "data",
        "info",
        out.to_str().unwrap(),
        "--verify",
        "--show",
        "1",
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("sha256 and ids < V ok"), "{stdout}");
    assert!(
        stdout.contains("[CLS] chapter 1 sir walter elliot"),
        "{stdout}"
    );
    // Errors name the problem and exit non-zero.
    let o = run(&["data", "info", dir.path().to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no manifest"));
}
