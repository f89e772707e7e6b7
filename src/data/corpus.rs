//! Reading text corpora: folders or files of `.txt` and `.jsonl`, streamed document by document
//! in a fixed order (inputs as given; a folder's files sorted by path, recursively), so the same
//! inputs always give the same documents and ids.
//!
//! - `.jsonl`: one JSON object per line with a string field (`text` by default) and an
//!   optional `id` (string or number); without one the id is `<file>:<line>`. This is what
//!   `scripts/fetch-corpus.sh` writes (`{"id","source","text"}`).
//! - `.txt`: by [`TxtMode`]: the whole file is one document (id `<file>`), or each line is
//!   one (LM1B-style sentence files; id `<file>:<line>`), or each blank-line separated
//!   paragraph (id `<file>:p<n>`).
//!
//! `<file>` is the path relative to the folder given as input (the file name for a file given
//! directly). Documents whose text is empty or only whitespace are skipped and counted.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// How a `.txt` file is cut into documents.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TxtMode {
    /// The whole file is one document.
    #[default]
    File,
    /// Each non-empty line is one document (LM1B-style sentence files).
    Line,
    /// Each blank-line separated paragraph is one document.
    Paragraph,
}

/// One document: a stable id (used for the held-out split) and its text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Document {
    pub id: String,
    pub text: String,
}

/// One input file and the name its document ids start with.
#[derive(Clone, Debug)]
pub struct CorpusFile {
    pub path: PathBuf,
    pub name: String,
    pub bytes: u64,
}

/// The files of a corpus and how to read them.
#[derive(Clone, Debug)]
pub struct Corpus {
    pub files: Vec<CorpusFile>,
    pub txt_mode: TxtMode,
    pub text_field: String,
}

fn is_text_file(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("txt") | Some("jsonl")
    )
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in rd {
        let p = entry.map_err(|e| Error::io(dir, e))?.path();
        if p.is_dir() {
            walk(&p, out)?;
        } else if is_text_file(&p) {
            out.push(p);
        }
    }
    Ok(())
}

impl Corpus {
    /// Lists the `.txt` / `.jsonl` files of `inputs` (folders searched recursively, files taken
    /// as they are whatever their extension). Fails when an input is missing or nothing is
    /// found.
    pub fn open(inputs: &[PathBuf], txt_mode: TxtMode, text_field: &str) -> Result<Self> {
        let mut files = Vec::new();
        for input in inputs {
            let meta = std::fs::metadata(input).map_err(|e| Error::io(input, e))?;
            if meta.is_dir() {
                let mut found = Vec::new();
                walk(input, &mut found)?;
                found.sort();
                for p in found {
                    let name = p
                        .strip_prefix(input)
                        .unwrap_or(&p)
                        .to_string_lossy()
                        .replace('\\', "/");
                    let bytes = std::fs::metadata(&p).map_err(|e| Error::io(&p, e))?.len();
                    files.push(CorpusFile {
                        path: p,
                        name,
                        bytes,
                    });
                }
            } else {
                let name = input
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| input.display().to_string());
                files.push(CorpusFile {
                    path: input.clone(),
                    name,
                    bytes: meta.len(),
                });
            }
        }
        if files.is_empty() {
            let shown: Vec<String> = inputs.iter().map(|p| p.display().to_string()).collect();
            return Err(Error::data(
                shown.join(", "),
                "no .txt or .jsonl files found (run scripts/fetch-corpus.sh, or point --input \
                 at a folder of text files)",
            ));
        }
        Ok(Corpus {
            files,
            txt_mode,
            text_field: text_field.to_string(),
        })
    }

    /// Total size of the input files in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }

    /// Streams the documents of every file in order. `on_file_done(bytes)` is called after
    /// each file (for progress).
    pub fn for_each_document(
        &self,
        mut on_doc: impl FnMut(Document) -> Result<()>,
        mut on_file_done: impl FnMut(u64),
    ) -> Result<u64> {
        let mut skipped = 0u64;
        let mut emit = |d: Document| -> Result<()> {
            if d.text.trim().is_empty() {
                skipped += 1;
                Ok(())
            } else {
                on_doc(d)
            }
        };
        for f in &self.files {
            let jsonl = f.path.extension().and_then(|e| e.to_str()) == Some("jsonl");
            if jsonl {
                read_jsonl(f, &self.text_field, &mut emit)?;
            } else {
                read_txt(f, self.txt_mode, &mut emit)?;
            }
            on_file_done(f.bytes);
        }
        Ok(skipped)
    }

    /// All documents in memory (tests and small corpora).
    pub fn documents(&self) -> Result<Vec<Document>> {
        let mut v = Vec::new();
        self.for_each_document(
            |d| {
                v.push(d);
                Ok(())
            },
            |_| {},
        )?;
        Ok(v)
    }
}

fn open_reader(path: &Path) -> Result<BufReader<File>> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    Ok(BufReader::with_capacity(1 << 20, f))
}

fn read_jsonl(
    f: &CorpusFile,
    field: &str,
    emit: &mut impl FnMut(Document) -> Result<()>,
) -> Result<()> {
    let mut r = open_reader(&f.path)?;
    let mut line = String::new();
    let mut lineno = 0usize;
    loop {
        line.clear();
        let n = r
            .read_line(&mut line)
            .map_err(|e| Error::data(&f.path, format!("line {}: {e}", lineno + 1)))?;
        if n == 0 {
            return Ok(());
        }
        lineno += 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| {
            Error::data(
                &f.path,
                format!("line {lineno}: not a JSON object ({e}); expected one object per line"),
            )
        })?;
        let text = v.get(field).and_then(|t| t.as_str()).ok_or_else(|| {
            Error::data(
                &f.path,
                format!("line {lineno}: no string field {field:?} (choose it with --text-field)"),
            )
        })?;
        let id = match v.get("id") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Number(n)) => format!("{}:{n}", f.name),
            _ => format!("{}:{lineno}", f.name),
        };
        emit(Document {
            id,
            text: text.to_string(),
        })?;
    }
}

fn read_txt(
    f: &CorpusFile,
    mode: TxtMode,
    emit: &mut impl FnMut(Document) -> Result<()>,
) -> Result<()> {
    let mut r = open_reader(&f.path)?;
    let utf8 = |e: std::io::Error| Error::data(&f.path, format!("not UTF-8 text: {e}"));
    match mode {
        TxtMode::File => {
            let mut text = String::new();
            r.read_to_string(&mut text).map_err(utf8)?;
            emit(Document {
                id: f.name.clone(),
                text,
            })
        }
        TxtMode::Line => {
            let mut line = String::new();
            let mut lineno = 0usize;
            loop {
                line.clear();
                if r.read_line(&mut line).map_err(utf8)? == 0 {
                    return Ok(());
                }
                lineno += 1;
                let text = line.trim_end_matches(['\n', '\r']);
                emit(Document {
                    id: format!("{}:{lineno}", f.name),
                    text: text.to_string(),
                })?;
            }
        }
        TxtMode::Paragraph => {
            let mut para = String::new();
            let mut n = 0usize;
            let mut line = String::new();
            loop {
                line.clear();
                let eof = r.read_line(&mut line).map_err(utf8)? == 0;
                let blank = line.trim().is_empty();
                if (eof || blank) && !para.trim().is_empty() {
                    n += 1;
                    let text = std::mem::take(&mut para);
                    emit(Document {
                        id: format!("{}:p{n}", f.name),
                        text: text.trim_end_matches(['\n', '\r']).to_string(),
                    })?;
                }
                if eof {
                    return Ok(());
                }
                if !blank {
                    para.push_str(&line);
                }
            }
        }
    }
}
