//! One writer per output: an exclusive lock on a directory a command writes, held for the
//! command's lifetime.
//!
//! The lock is `flock` on `.{name}.lock` beside the directory (beside, not inside: the
//! directory itself is replaced whole by atomic exchanges), which holds the holder's pid. The
//! kernel releases a `flock` when its holder dies, however it dies, so a lock file left by a
//! killed process is simply taken over by the next one; a live holder's pid is named to whoever
//! is refused.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// An exclusive lock on an output directory, released (and its file removed) when dropped.
#[must_use = "the lock is released when dropped"]
#[derive(Debug)]
pub struct OutputLock {
    /// Held open: closing it releases the flock.
    _file: File,
    path: PathBuf,
}

/// `.{name}.lock` beside `out`.
pub fn lock_path(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "out".into());
    out.with_file_name(format!(".{name}.lock"))
}

/// Takes the exclusive lock on the output directory `out` (named `what` in messages: `--out`,
/// `the run directory`, ...). Refused, naming the holder's pid, while another process holds it;
/// a lock file left by a process no longer running is taken over, saying so on stderr.
pub fn lock_output(out: &Path, what: &str) -> Result<OutputLock> {
    let path = lock_path(out);
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("{}: cannot create", parent.display()))?;
    }
    loop {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("{}: cannot open the lock file", path.display()))?;
        // SAFETY: a valid open descriptor; flock only reads it.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(err).with_context(|| format!("{}: cannot lock", path.display()));
            }
            let holder = read_pid(&mut file).map_or("unknown".into(), |p| p.to_string());
            bail!(
                "{what} {}: in use by another laco-train process (pid {holder}, lock {}); wait for it to finish or stop it",
                out.display(),
                path.display()
            );
        }
        // A holder that was finishing may have removed the file between our open and our lock:
        // the lock is ours only if the path still names the file locked.
        let same = std::fs::metadata(&path)
            .ok()
            .zip(file.metadata().ok())
            .is_some_and(|(p, f)| p.dev() == f.dev() && p.ino() == f.ino());
        if !same {
            continue;
        }
        let me = std::process::id();
        if let Some(pid) = read_pid(&mut file).filter(|&p| p != me) {
            eprintln!(
                "{}: took over the lock left by pid {pid}, which is no longer running",
                out.display()
            );
        }
        let write = |file: &mut File| -> std::io::Result<()> {
            file.set_len(0)?;
            file.rewind()?;
            file.write_all(format!("{me}\n").as_bytes())
        };
        write(&mut file).with_context(|| format!("{}: cannot write", path.display()))?;
        return Ok(OutputLock { _file: file, path });
    }
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Removed while still held, so that nobody takes a lock on a file about to vanish
        // (a process that opened it before the removal finds the path changed and retries).
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::{lock_output, lock_path};

    #[test]
    fn a_second_lock_is_refused_and_a_released_one_taken() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let lock = lock_output(&out, "--out").unwrap();
        let pid = std::process::id();
        assert_eq!(
            std::fs::read_to_string(lock_path(&out)).unwrap(),
            format!("{pid}\n")
        );
        // flock locks belong to the open file: a second open in this process is refused too.
        let err = lock_output(&out, "--out").unwrap_err().to_string();
        assert!(err.contains(&format!("pid {pid}")), "{err}");
        assert!(err.starts_with("--out "), "{err}");
        drop(lock);
        assert!(!lock_path(&out).exists());
        // A lock file whose holder is gone (nobody holds the flock) is taken over.
        std::fs::write(lock_path(&out), "4194999\n").unwrap();
        let again = lock_output(&out, "--out").unwrap();
        assert_eq!(
            std::fs::read_to_string(lock_path(&out)).unwrap(),
            format!("{pid}\n")
        );
        drop(again);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
