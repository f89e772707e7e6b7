//! Safe outputs. Every file the engine writes goes through [`TempFile`]: a temporary file
//! created exclusively (`O_CREAT | O_EXCL`, so a planted link is never followed) beside its
//! target under a random name, synced, then renamed over the target; if anything fails before
//! the rename, dropping the guard removes the temporary file. [`check_output`] runs before any
//! work: an output equal to an input is always refused, an existing one unless `--force`, and
//! the parent directory must exist and accept a new file.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// True when `a` and `b` name the same existing file (same device and inode: hard links and
/// symbolic links included).
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// The directory a file path lives in (`.` for a bare name).
fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Checks the output file `path` of flag `flag` before the work starts: not a directory, not
/// one of `inputs` (flag name, path), not existing unless `force`, and its directory exists
/// and accepts a new file.
pub fn check_output(flag: &str, path: &Path, force: bool, inputs: &[(&str, &Path)]) -> Result<()> {
    let shown = path.display();
    for (iflag, input) in inputs {
        if same_file(path, input) {
            return Err(Error::Config(format!(
                "{flag} {shown}: is the same file as {iflag} {}; an output never replaces an \
                 input, choose another {flag}",
                input.display()
            )));
        }
    }
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            return Err(Error::Config(format!(
                "{flag} {shown}: is a directory; expected a file path"
            )))
        }
        Ok(_) if !force => {
            return Err(Error::Config(format!(
                "{flag} {shown}: already exists; pass --force to replace it or choose another \
                 path"
            )))
        }
        _ => {}
    }
    check_dir_writable(flag, path, &parent_of(path))
}

/// Checks that the output directory `dir` of flag `flag` can receive `files`: `dir` is a
/// directory or absent with an existing parent, and none of `files` exists in it unless
/// `force`.
pub fn check_output_dir(flag: &str, dir: &Path, force: bool, files: &[&str]) -> Result<()> {
    let shown = dir.display();
    match fs::metadata(dir) {
        Ok(m) if !m.is_dir() => Err(Error::Config(format!(
            "{flag} {shown}: is a file; expected a directory (created if absent)"
        ))),
        Ok(_) => {
            for f in files {
                let p = dir.join(f);
                if p.exists() && !force {
                    return Err(Error::Config(format!(
                        "{flag} {shown}: {} already exists; pass --force to replace it or \
                         choose another directory",
                        p.display()
                    )));
                }
            }
            check_dir_writable(flag, dir, dir)
        }
        Err(_) => {
            let parent = parent_of(dir);
            if !parent.is_dir() {
                return Err(Error::Config(format!(
                    "{flag} {shown}: directory {} does not exist",
                    parent.display()
                )));
            }
            check_dir_writable(flag, dir, &parent)
        }
    }
}

/// Creates and removes a probe file in `dir`, so a read-only or missing directory is reported
/// before the work instead of after it.
fn check_dir_writable(flag: &str, path: &Path, dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        return Err(Error::Config(format!(
            "{flag} {}: directory {} does not exist",
            path.display(),
            dir.display()
        )));
    }
    let probe = TempFile::in_dir(dir, ".write-probe", "").map_err(|e| {
        Error::Config(format!(
            "{flag} {}: cannot create files in {}: {}",
            path.display(),
            dir.display(),
            std::error::Error::source(&e).map_or(e.to_string(), |s| s.to_string())
        ))
    })?;
    drop(probe);
    Ok(())
}

/// A temporary file beside its target, removed on drop unless [`TempFile::commit`]ted.
pub struct TempFile {
    path: PathBuf,
    target: PathBuf,
    file: Option<File>,
}

impl TempFile {
    /// Creates `DIR/NAME.RANDOM.tmp` exclusively for the target `DIR/NAME`.
    pub fn beside(target: &Path) -> Result<Self> {
        Self::beside_with_suffix(target, "")
    }

    /// As [`TempFile::beside`], with `suffix` appended to the temporary name (for writers that
    /// choose a format by extension, e.g. `.png`).
    pub fn beside_with_suffix(target: &Path, suffix: &str) -> Result<Self> {
        let name = target
            .file_name()
            .ok_or_else(|| Error::Config(format!("{}: not a file path", target.display())))?;
        let mut t = Self::in_dir(&parent_of(target), &name.to_string_lossy(), suffix)?;
        t.target = target.to_path_buf();
        Ok(t)
    }

    fn in_dir(dir: &Path, stem: &str, suffix: &str) -> Result<Self> {
        let mut last = None;
        for _ in 0..16 {
            let path = dir.join(format!("{stem}.{:016x}.tmp{suffix}", rand::random::<u64>()));
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => {
                    return Ok(TempFile {
                        target: path.clone(),
                        path,
                        file: Some(file),
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some((path, e)),
                Err(e) => return Err(Error::io(&path, e)),
            }
        }
        let (path, e) = last.expect("16 attempts");
        Err(Error::io(path, e))
    }

    /// The temporary path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file.
    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("open until commit")
    }

    /// Syncs the file, renames it over the target and syncs the directory.
    pub fn commit(mut self) -> Result<()> {
        let f = self.file.take().expect("open until commit");
        f.sync_all().map_err(|e| Error::io(&self.path, e))?;
        drop(f);
        fs::rename(&self.path, &self.target).map_err(|e| Error::io(&self.target, e))?;
        // Renamed: nothing left for the guard to remove.
        self.path = PathBuf::new();
        let dir = parent_of(&self.target);
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(&dir, e))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            self.file.take();
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Writes `bytes` to `path` atomically (see the module doc).
pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut t = TempFile::beside(path)?;
    let p = t.path().to_path_buf();
    t.file().write_all(bytes).map_err(|e| Error::io(&p, e))?;
    t.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_inputs_existing_files_and_directories() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        fs::write(&a, b"x").unwrap();
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&a, &link).unwrap();
        let e = check_output("--out", &link, true, &[("--checkpoint", &a)]).unwrap_err();
        assert!(e.to_string().contains("same file as --checkpoint"), "{e}");
        let e = check_output("--out", &a, false, &[]).unwrap_err();
        assert!(e.to_string().contains("--force"), "{e}");
        check_output("--out", &a, true, &[]).unwrap();
        let e = check_output("--out", d.path(), true, &[]).unwrap_err();
        assert!(e.to_string().contains("is a directory"), "{e}");
        let e = check_output("--out", &d.path().join("no/x"), false, &[]).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        check_output("--out", &d.path().join("new"), false, &[]).unwrap();
        assert_eq!(
            fs::read_dir(d.path()).unwrap().count(),
            2,
            "probe files removed"
        );
    }

    #[test]
    fn temp_files_are_exclusive_and_removed_unless_committed() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("out.bin");
        let t = TempFile::beside(&target).unwrap();
        assert!(t.path().exists());
        let p = t.path().to_path_buf();
        drop(t);
        assert!(!p.exists(), "an uncommitted temporary file is removed");
        assert!(!target.exists());
        // A link planted at the target is replaced, not followed.
        let victim = d.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, &target).unwrap();
        write_bytes(&target, b"new").unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
        assert_eq!(fs::read(&target).unwrap(), b"new");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 2);
    }
}
