//! Every section number that a comment, a `--help` text, a script or the README cites resolves
//! to a heading of `docs/reference.md`, and no text points at a document outside the
//! repository. Citations are the word "spec" followed by a section number (optionally with a
//! section sign, as a range `a-b` or a list `a, b`, `a/b`, `a and b`), the same after
//! "reference.md", and "quirk" followed by a number (a bare quirk number n means section 12.n).
//!
//! The scan walks folders rather than listing files, so files can move freely; it reads every
//! UTF-8 file and skips binary ones.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

/// Folders (and files) whose text is scanned, relative to the repository root.
const SCANNED: &[&str] = &[
    "src",
    "kernels",
    "tests",
    "benches",
    "tools",
    "scripts",
    ".ci",
    "README.md",
    "build.rs",
    "Cargo.toml",
];

/// Scanned files whose document links [`no_text_points_outside_the_repository`] leaves alone
/// (their citations are still checked).
const LINKS_UNCHECKED: &[&str] = &[];

/// Folder names never entered: build outputs and caches.
const SKIPPED_DIRS: &[&str] = &["target", "__pycache__", "node_modules"];

/// The reference's own section numbers, which `docs/reference.md` must keep.
const REFERENCE_SECTIONS: &[&str] = &[
    "0", "1", "1.1", "1.2", "1.3", "2", "2.1", "2.2", "2.3", "2.4", "2.5", "2.6", "3", "3.1",
    "3.2", "3.3", "3.4", "4", "4.1", "4.2", "4.3", "4.4", "4.5", "4.6", "4.7", "4.8", "5", "5.1",
    "5.2", "5.3", "5.4", "5.5", "5.6", "5.7", "5.8", "5.9", "6", "6.1", "6.2", "6.3", "6.4", "7",
    "8", "8.1", "8.2", "8.3", "8.4", "8.5", "9", "10", "11", "12", "13",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn reference_path() -> PathBuf {
    root().join("docs").join("reference.md")
}

/// A section number as its components: "6.2" -> [6, 2].
type Section = Vec<u32>;

fn show(s: &[u32]) -> String {
    s.iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(".")
}

/// Section numbers of the markdown headings of `text`, in order ("## 6. Distillation" -> 6,
/// "### 6.1 IM-SDTT" -> 6.1).
fn headings(text: &str) -> Vec<Section> {
    text.lines()
        .filter(|l| l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.trim_start_matches('#');
            if !rest.starts_with(' ') {
                return None;
            }
            let first = rest.split_whitespace().next()?;
            let (sec, used) = number(first.as_bytes(), 0)?;
            // "6." and "6.1" are numbers; "6x" is not.
            let tail = &first[used..];
            (tail.is_empty() || tail == ".").then_some(sec)
        })
        .collect()
}

/// Parses `digits(.digits)*` at `b[i..]`; returns the number and the index after it. A dot
/// not followed by a digit (the end of a sentence) is not part of the number.
fn number(b: &[u8], mut i: usize) -> Option<(Section, usize)> {
    let mut parts = Vec::new();
    loop {
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start || i - start > 4 {
            return None;
        }
        parts.push(std::str::from_utf8(&b[start..i]).ok()?.parse().ok()?);
        if i + 1 < b.len() && b[i] == b'.' && b[i + 1].is_ascii_digit() {
            i += 1;
        } else {
            return Some((parts, i));
        }
    }
}

fn skip_spaces(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i] == b' ' {
        i += 1;
    }
    i
}

/// The section sign, UTF-8.
const SECTION_SIGN: &[u8] = "\u{a7}".as_bytes();

/// What one citation names: the sections it needs, and the text it was read from.
#[derive(Debug, PartialEq)]
struct Citation {
    text: String,
    sections: Vec<Section>,
}

/// Expands a range `a-b`: when both differ only in their last component, every section in
/// between; otherwise the two ends.
fn range(a: Section, b: Section) -> Vec<Section> {
    let same_parent = a.len() == b.len() && a[..a.len() - 1] == b[..b.len() - 1];
    match (a.last(), b.last()) {
        (Some(&lo), Some(&hi)) if same_parent && lo <= hi && hi - lo <= 50 => (lo..=hi)
            .map(|k| {
                let mut s = a.clone();
                *s.last_mut().unwrap() = k;
                s
            })
            .collect(),
        _ => vec![a, b],
    }
}

/// Every citation in one line of text.
fn citations(line: &str) -> Vec<Citation> {
    let lower = line.to_ascii_lowercase();
    let b = lower.as_bytes();
    let mut out = Vec::new();
    for (word, quirk) in [("spec", false), ("reference.md", false), ("quirk", true)] {
        let mut from = 0;
        while let Some(pos) = lower[from..].find(word) {
            let start = from + pos;
            from = start + word.len();
            let word_start = start == 0 || {
                let c = b[start - 1];
                !(c.is_ascii_alphanumeric() || c == b'_')
            };
            if !word_start {
                continue;
            }
            let mut i = from;
            if i >= b.len() || !(b[i] == b' ' || b[i..].starts_with(SECTION_SIGN)) {
                continue;
            }
            i = skip_spaces(b, i);
            if b[i..].starts_with(SECTION_SIGN) {
                i = skip_spaces(b, i + SECTION_SIGN.len());
            }
            let Some((first, end)) = number(b, i) else {
                continue;
            };
            let mut sections = Vec::new();
            let mut last = first;
            i = end;
            // Continuations: a range or a list of further numbers.
            loop {
                let (sep_end, is_range) = if i < b.len() && b[i] == b'-' {
                    (i + 1, true)
                } else if b[i..].starts_with("\u{2013}".as_bytes()) {
                    (i + "\u{2013}".len(), true)
                } else if i < b.len() && b[i] == b'/' {
                    (i + 1, false)
                } else if b[i..].starts_with(b", ") {
                    (i + 2, false)
                } else if b[i..].starts_with(b" and ") {
                    (i + 5, false)
                } else {
                    break;
                };
                let Some((next, next_end)) = number(b, skip_spaces(b, sep_end)) else {
                    break;
                };
                if is_range {
                    sections.extend(range(last, next));
                    last = Vec::new();
                } else {
                    if !last.is_empty() {
                        sections.push(last);
                    }
                    last = next;
                }
                i = next_end;
            }
            if !last.is_empty() {
                sections.push(last);
            }
            if quirk {
                // A bare quirk number n is item n of section 12.
                for s in &mut sections {
                    if s.len() == 1 {
                        s.insert(0, 12);
                    }
                }
            }
            out.push(Citation {
                text: line[start..i].to_string(),
                sections,
            });
            from = i.max(from);
        }
    }
    out
}

/// Every UTF-8 text file under the scanned folders, as (path relative to the root, text).
fn scanned_files() -> Vec<(String, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        let mut entries: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        entries.sort();
        for p in entries {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if p.is_dir() {
                if !name.starts_with('.') && !SKIPPED_DIRS.contains(&name) {
                    walk(&p, out);
                }
            } else {
                out.push(p);
            }
        }
    }
    let root = root();
    let mut paths = Vec::new();
    for entry in SCANNED {
        let p = root.join(entry);
        if p.is_dir() {
            walk(&p, &mut paths);
        } else if p.is_file() {
            paths.push(p);
        }
    }
    paths
        .into_iter()
        .filter_map(|p| {
            let text = String::from_utf8(fs::read(&p).ok()?).ok()?;
            let rel = p.strip_prefix(&root).unwrap_or(&p).display().to_string();
            Some((rel, text))
        })
        .collect()
}

#[test]
fn reference_keeps_its_section_numbers_in_order() {
    let text = fs::read_to_string(reference_path()).expect("docs/reference.md must exist");
    let heads = headings(&text);
    let mut have = BTreeSet::new();
    for h in &heads {
        assert!(
            have.insert(h.clone()),
            "docs/reference.md has section {} twice",
            show(h)
        );
    }
    for w in heads.windows(2) {
        assert!(
            w[0] < w[1],
            "docs/reference.md: section {} comes after {}",
            show(&w[1]),
            show(&w[0])
        );
    }
    let missing: Vec<&str> = REFERENCE_SECTIONS
        .iter()
        .filter(|s| {
            let (sec, _) = number(s.as_bytes(), 0).unwrap();
            !have.contains(&sec)
        })
        .copied()
        .collect();
    assert!(
        missing.is_empty(),
        "docs/reference.md lacks the reference's sections {missing:?}"
    );
}

#[test]
fn every_cited_section_exists() {
    let text = fs::read_to_string(reference_path()).expect("docs/reference.md must exist");
    let have: BTreeSet<Section> = headings(&text).into_iter().collect();
    let files = scanned_files();
    assert!(
        files.iter().any(|(p, _)| p.starts_with("src")),
        "the scan found no files under src/"
    );
    let mut bad = Vec::new();
    let mut count = 0;
    for (path, text) in &files {
        for (n, line) in text.lines().enumerate() {
            for c in citations(line) {
                count += 1;
                for s in &c.sections {
                    if !have.contains(s) {
                        bad.push(format!(
                            "{path}:{}: `{}` cites section {}, which is not a heading of \
                             docs/reference.md",
                            n + 1,
                            c.text,
                            show(s)
                        ));
                    }
                }
            }
        }
    }
    // The code base cites the reference well over a hundred times; far fewer means the scan
    // itself is broken.
    assert!(
        count > 100,
        "only {count} citations found: is the scan broken?"
    );
    assert!(
        bad.is_empty(),
        "{} broken citations:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

#[test]
fn no_text_points_outside_the_repository() {
    let root = root();
    let forbidden = [
        concat!("shared", "/docs"),
        concat!("../", "shared"),
        concat!("imdm-", "spec"),
    ];
    // Markdown documents that exist in the repository, by path and by file name.
    let mut md_names = BTreeSet::new();
    fn collect(dir: &Path, root: &Path, out: &mut BTreeSet<String>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for p in entries.filter_map(|e| e.ok()).map(|e| e.path()) {
            let name = p
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("")
                .to_string();
            if p.is_dir() {
                if !name.starts_with('.') && !SKIPPED_DIRS.contains(&name.as_str()) {
                    collect(&p, root, out);
                }
            } else if name.ends_with(".md") {
                out.insert(name);
                if let Ok(rel) = p.strip_prefix(root) {
                    out.insert(rel.display().to_string());
                }
            }
        }
    }
    collect(&root, &root, &mut md_names);
    let mut bad = Vec::new();
    let code = scanned_files()
        .into_iter()
        .filter(|(p, _)| !LINKS_UNCHECKED.contains(&p.as_str()));
    for (path, text) in code {
        for (n, line) in text.lines().enumerate() {
            for f in forbidden {
                if line.contains(f) {
                    bad.push(format!(
                        "{path}:{}: names `{f}`, outside the repository",
                        n + 1
                    ));
                }
            }
            for word in line.split(|c: char| !(c.is_ascii_alphanumeric() || "._/-".contains(c))) {
                let word = word.trim_start_matches("./").trim_end_matches('.');
                if word.len() > 3 && word.ends_with(".md") && !md_names.contains(word) {
                    bad.push(format!(
                        "{path}:{}: `{word}` is not a document of the repository",
                        n + 1
                    ));
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "{} outside references:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

#[test]
fn citation_forms_are_read() {
    let secs = |line: &str| -> Vec<String> {
        citations(line)
            .iter()
            .flat_map(|c| c.sections.iter().map(|s| show(s)))
            .collect()
    };
    // Built from pieces so that the scan of this file does not read them as citations.
    let w = concat!("sp", "ec");
    assert_eq!(secs(&format!("see {w} 6.1.")), ["6.1"]);
    assert_eq!(secs(&format!("({w} 9)")), ["9"]);
    assert_eq!(secs(&format!("{w} \u{a7}5.8, bit-exact")), ["5.8"]);
    assert_eq!(secs(&format!("{w} 6.2-6.4")), ["6.2", "6.3", "6.4"]);
    assert_eq!(secs(&format!("{w} 12.2\u{2013}12.3")), ["12.2", "12.3"]);
    assert_eq!(
        secs(&format!("{w} 2.2-2.3, 3.2, 4.3")),
        ["2.2", "2.3", "3.2", "4.3"]
    );
    assert_eq!(secs(&format!("{w} 6.3/9 and")), ["6.3", "9"]);
    assert_eq!(secs(&format!("{w} 2.3 and 3.2")), ["2.3", "3.2"]);
    assert_eq!(secs(&format!("{w} 4.5-5.1")), ["4.5", "5.1"]);
    assert_eq!(secs(&format!("Sp{} 13.2: x", "ec")), ["13.2"]);
    let q = concat!("qu", "irk");
    assert_eq!(secs(&format!("{q} 8 fixed")), ["12.8"]);
    assert_eq!(secs(&format!("{q} 12.5")), ["12.5"]);
    assert_eq!(
        secs(&format!("reference{} 2.5, 2.6", ".md")),
        ["2.5", "2.6"]
    );
    // Not citations: other words, no number, identifiers.
    assert!(secs(&format!("in{w} 3 and re{w} 4")).is_empty());
    assert!(secs(&format!("fn open({w}: &str) {w}s 2 {w}_3")).is_empty());
    assert!(secs(&format!("the {w} says")).is_empty());
}

#[test]
fn headings_are_read() {
    let text = "# Title\n## 0. Summary\n### 6.1 IM-SDTT\n## 14. Deviations\n#### 14.2 x\n\
                ## Notes\n#not a heading 3\n## 6x odd\n";
    let got: Vec<String> = headings(text).iter().map(|s| show(s)).collect();
    assert_eq!(got, ["0", "6.1", "14", "14.2"]);
}
