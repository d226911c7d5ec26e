//! Small helpers below everything else: writing files and directories whole or not at all, and
//! progress bars.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// Writes the directory `out` whole or not at all: `fill` writes into a temporary directory
/// beside `out`, whose files are then flushed to disk, and which then replaces `out` (if it
/// exists). On any error the temporary directory is removed and `out` is left as it was.
pub fn write_dir_atomically<T>(out: &Path, fill: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    let tmp = temporary_sibling(out);
    let write = || -> Result<T> {
        std::fs::create_dir_all(&tmp)
            .with_context(|| format!("{}: cannot create", tmp.display()))?;
        let value = fill(&tmp)?;
        sync_tree(&tmp)?;
        if out.exists() {
            std::fs::remove_dir_all(out)
                .with_context(|| format!("{}: cannot replace", out.display()))?;
        }
        std::fs::rename(&tmp, out)
            .with_context(|| format!("{}: cannot move into place", out.display()))?;
        sync_parent(out)?;
        Ok(value)
    };
    let result = write();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Replaces the file `path` with `bytes` whole or not at all (temporary file beside it,
/// flushed, renamed over it).
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temporary_sibling(path);
    let write = || -> std::io::Result<()> {
        std::fs::write(&tmp, bytes)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("{}: cannot write", path.display()));
    }
    sync_parent(path)
}

/// `.{name}.tmp-{pid}` beside `path`, so the final rename stays on one file system.
fn temporary_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "out".into());
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Flushes every file under `dir`, and the directories themselves, to disk.
fn sync_tree(dir: &Path) -> Result<()> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("{}: cannot sync", path.display()))?;
        }
    }
    sync_dir(dir)
}

/// Flushes the directory holding `path`, so a rename into it is on disk.
fn sync_parent(path: &Path) -> Result<()> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => sync_dir(p),
        _ => sync_dir(Path::new(".")),
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("{}: cannot sync", dir.display()))
}

/// A progress bar on stderr with a message slot, hidden when stderr is not a terminal.
pub fn progress_bar(label: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(label.to_string());
    bar
}

#[cfg(test)]
mod tests {
    use super::{write_dir_atomically, write_file_atomically};

    #[test]
    fn a_failed_write_leaves_neither_out_nor_its_temporary_directory() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let r = write_dir_atomically(&out, |tmp| -> anyhow::Result<()> {
            std::fs::write(tmp.join("half.txt"), "written")?;
            anyhow::bail!("failed half-way")
        });
        assert!(r.is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

        // A successful write replaces an existing `out` whole.
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("old.txt"), "old").unwrap();
        write_dir_atomically(&out, |tmp| Ok(std::fs::write(tmp.join("new.txt"), "new")?)).unwrap();
        let names: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("new.txt")]);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        // A file is replaced whole, with nothing left beside it.
        let file = dir.path().join("latest");
        write_file_atomically(&file, b"step-1\n").unwrap();
        write_file_atomically(&file, b"step-2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "step-2\n");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }
}
