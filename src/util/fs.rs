//! Writing files and directories whole or not at all.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Writes the directory `out` whole or not at all: `fill` writes into a temporary directory
/// beside `out`, whose files are then flushed to disk, and which then takes `out`'s place in one
/// atomic exchange (a kill at any moment leaves either the old `out` or the new one, never a
/// mix). On any error the temporary directory is removed and `out` is left as it was.
/// Temporary directories that killed runs left beside `out` are removed first.
pub fn write_dir_atomically<T>(out: &Path, fill: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    check_output_dir(out, "the output", true)?;
    remove_leftovers(out)?;
    let tmp = temporary_sibling(out, "tmp");
    let write = || -> Result<T> {
        std::fs::create_dir_all(&tmp)
            .with_context(|| format!("{}: cannot create", tmp.display()))?;
        let value = fill(&tmp)?;
        sync_tree(&tmp)?;
        replace_dir(&tmp, out)?;
        Ok(value)
    };
    let result = write();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Moves the directory `new` to `out`, replacing `out` if it exists: both names are exchanged
/// atomically (renameat2 with RENAME_EXCHANGE on Linux), then the old directory, now at `new`,
/// is removed. Where the file system cannot exchange, `out` is first renamed aside.
fn replace_dir(new: &Path, out: &Path) -> Result<()> {
    if out.exists() {
        if !exchange(new, out)? {
            let old = temporary_sibling(out, "old");
            std::fs::rename(out, &old)
                .with_context(|| format!("{}: cannot move aside", out.display()))?;
            std::fs::rename(new, out)
                .with_context(|| format!("{}: cannot move into place", out.display()))?;
            sync_parent(out)?;
            return std::fs::remove_dir_all(&old)
                .with_context(|| format!("{}: cannot remove", old.display()));
        }
        sync_parent(out)?;
        return std::fs::remove_dir_all(new)
            .with_context(|| format!("{}: cannot remove the replaced directory", new.display()));
    }
    std::fs::rename(new, out)
        .with_context(|| format!("{}: cannot move into place", out.display()))?;
    sync_parent(out)
}

/// Exchanges two paths atomically; `false` when the system or file system cannot.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).expect("no NUL in paths");
    let (ca, cb) = (c(a), c(b));
    // SAFETY: both are valid NUL-terminated paths; AT_FDCWD resolves them as given.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::ENOTSUP) => Ok(false),
        _ => Err(err).with_context(|| format!("{}: cannot replace", b.display())),
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> Result<bool> {
    Ok(false)
}

/// Removes the temporary directories (`.{name}.tmp-{pid}`, `.{name}.old-{pid}`) that writes of
/// `out` by processes no longer running left beside it, saying so on stderr.
pub fn remove_leftovers(out: &Path) -> Result<()> {
    let (Some(parent), Some(name)) = (out.parent(), out.file_name()) else {
        return Ok(());
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let name = name.to_string_lossy();
    remove_dead_temporaries(parent, |n| n == name)
}

/// Removes the temporary entries `.{name}.tmp-{pid}` and `.{name}.old-{pid}` in `dir` whose
/// `name` satisfies `owner` and whose writer (`pid`) is no longer running, saying so on stderr;
/// those of running processes, this one included, are left alone.
pub fn remove_dead_temporaries(dir: &Path, owner: impl Fn(&str) -> bool) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let file = entry.file_name().to_string_lossy().to_string();
        let Some((name, kind)) = file
            .strip_prefix('.')
            .and_then(|rest| rest.rsplit_once('.'))
        else {
            continue;
        };
        let pid = kind
            .strip_prefix("tmp-")
            .or_else(|| kind.strip_prefix("old-"))
            .and_then(|p| p.parse::<u32>().ok());
        let Some(pid) = pid else { continue };
        if !owner(name) || process_running(pid) {
            continue;
        }
        let path = entry.path();
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.with_context(|| {
            format!("{}: cannot remove a killed run's leftover", path.display())
        })?;
        eprintln!("removed {}, left by a killed run", path.display());
    }
    Ok(())
}

/// Whether the process `pid` is running (this one always is).
fn process_running(pid: u32) -> bool {
    pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists()
}

/// Empties the directory `dir` in one atomic step, keeping the entries named in `keep` (hard
/// links, or copies where the file system has none): a fresh directory is prepared beside it and
/// exchanged with it, then the old one is removed. A kill at any moment leaves either the old
/// directory or the new one.
pub fn start_over(dir: &Path, keep: &[&str]) -> Result<()> {
    check_output_dir(dir, "the output", true)?;
    remove_leftovers(dir)?;
    let tmp = temporary_sibling(dir, "tmp");
    let prepare = || -> Result<()> {
        std::fs::create_dir_all(&tmp)
            .with_context(|| format!("{}: cannot create", tmp.display()))?;
        for name in keep {
            let from = dir.join(name);
            if from.exists() {
                link_tree(&from, &tmp.join(name))?;
            }
        }
        sync_tree(&tmp)?;
        replace_dir(&tmp, dir)
    };
    let result = prepare();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Recreates `from` at `to`, files hard-linked (copied where linking fails).
fn link_tree(from: &Path, to: &Path) -> Result<()> {
    if from.is_dir() {
        std::fs::create_dir_all(to).with_context(|| format!("{}: cannot create", to.display()))?;
        let entries =
            std::fs::read_dir(from).with_context(|| format!("{}: cannot list", from.display()))?;
        for entry in entries {
            let entry = entry?;
            link_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
        return Ok(());
    }
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to).with_context(|| format!("{}: cannot copy", from.display()))?;
    }
    Ok(())
}

/// Refuses an existing output directory unless `force` (`--force`) was given.
pub fn refuse_existing(out: &Path, force: bool) -> Result<()> {
    if out.exists() && !force {
        bail!(
            "{}: already exists (use --force to replace it)",
            out.display()
        );
    }
    Ok(())
}

/// Refuses an output directory `out` that is, or contains, one of `sources` (whose files a
/// replacement of `out` would delete); `what` names the output's flag or setting.
pub fn refuse_overlap(what: &str, out: &Path, sources: &[(&str, &Path)]) -> Result<()> {
    let out_abs = absolute(out)?;
    for (name, source) in sources {
        let source_abs = absolute(source)?;
        if source_abs.starts_with(&out_abs) {
            let how = if source_abs == out_abs {
                "is"
            } else {
                "contains"
            };
            bail!(
                "{what} {}: {how} the {name} ({}); choose another output directory",
                out.display(),
                source.display()
            );
        }
    }
    Ok(())
}

/// Refuses an output path `out` (named `what`: `--out`, `the run directory`) that exists and
/// is not a directory: a file, or a symbolic link when the command `replaces` the directory
/// (the exchange would replace the link, not what it points to) or when it points to no
/// directory. Called before anything moves, so nothing is changed.
pub fn check_output_dir(out: &Path, what: &str, replaces: bool) -> Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(out) else {
        return Ok(());
    };
    let o = out.display();
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(out).unwrap_or_default();
        let t = target.display();
        if replaces {
            bail!("{what} {o}: is a symbolic link (to {t}); it would be replaced, not the directory it points to: give that directory itself, or another path");
        }
        if !out.is_dir() {
            bail!("{what} {o}: is a symbolic link to {t}, which is not a directory; give a directory, or another path");
        }
    } else if !meta.is_dir() {
        bail!("{what} {o}: is a file, not a directory; remove it or give another path");
    }
    Ok(())
}

/// Fails, naming `what` and the path, when the file `path` could not be written: an existing
/// file is opened for appending (nothing changes), a new one created and removed again.
pub fn check_writable(path: &Path, what: &str) -> Result<()> {
    let probe = if path.exists() {
        std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map(drop)
    } else {
        std::fs::File::create(path).and_then(|_| std::fs::remove_file(path))
    };
    probe.with_context(|| format!("{what} {}: cannot write", path.display()))
}

/// `path` as a canonical absolute path (so that two spellings of one place compare equal, and
/// messages print `/x/runs/tiny`, not `/x/configs/../runs/tiny`): symbolic links resolved in
/// the part that exists, `.` and `..` removed from the rest.
pub fn absolute(path: &Path) -> Result<PathBuf> {
    if let Ok(p) = std::fs::canonicalize(path) {
        return Ok(p);
    }
    let abs =
        std::path::absolute(path).with_context(|| format!("{}: cannot resolve", path.display()))?;
    let mut out = PathBuf::new();
    for part in abs.components() {
        match part {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            part => out.push(part),
        }
        if let Ok(p) = std::fs::canonicalize(&out) {
            out = p;
        }
    }
    Ok(out)
}

/// Replaces the file `path` with `bytes` whole or not at all (temporary file beside it,
/// flushed, renamed over it).
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temporary_sibling(path, "tmp");
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

/// `.{name}.{kind}-{pid}` beside `path`, so the final rename stays on one file system.
fn temporary_sibling(path: &Path, kind: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "out".into());
    path.with_file_name(format!(".{name}.{kind}-{}", std::process::id()))
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

#[cfg(test)]
mod tests {
    use super::{absolute, remove_dead_temporaries, write_dir_atomically, write_file_atomically};

    #[test]
    fn absolute_paths_are_canonical_whether_or_not_they_exist() {
        let t = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(t.path()).unwrap();
        std::fs::create_dir_all(root.join("configs")).unwrap();
        std::os::unix::fs::symlink(root.join("configs"), root.join("link")).unwrap();
        let spelled = root.join("configs/../runs/./tiny/student");
        assert_eq!(absolute(&spelled).unwrap(), root.join("runs/tiny/student"));
        // A link is followed before `..` applies, as the file system would.
        let linked = root.join("link/x/../y");
        assert_eq!(absolute(&linked).unwrap(), root.join("configs/y"));
        std::fs::create_dir_all(root.join("runs/tiny")).unwrap();
        assert_eq!(absolute(&spelled).unwrap(), root.join("runs/tiny/student"));
    }

    #[test]
    fn only_temporaries_of_dead_writers_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let alive = std::process::id();
        let names = [
            format!(".step-0000001.tmp-{dead}"),
            format!(".step-0000002.tmp-{alive}"),
            format!(".step-0000003.old-{dead}"),
            format!(".other.tmp-{dead}"),
            "step-0000001".to_string(),
        ];
        for n in &names {
            std::fs::create_dir(dir.path().join(n)).unwrap();
        }
        remove_dead_temporaries(dir.path(), |n| n.starts_with("step-")).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        left.sort();
        let mut want = vec![names[1].clone(), names[3].clone(), names[4].clone()];
        want.sort();
        assert_eq!(left, want);
    }

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
