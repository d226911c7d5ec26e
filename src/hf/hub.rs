//! Models, adapters and datasets named by their Hugging Face id (`Qwen/Qwen3-8B-Base`,
//! `tatsu-lab/alpaca`), found in the local Hugging Face cache as `huggingface_hub` lays it out:
//! `{cache}/models--ORG--NAME/snapshots/{commit}`, the commit named by `refs/{revision}`
//! (`main` unless a revision is given). The cache is `HF_HUB_CACHE`, else `HF_HOME/hub`, else
//! `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`. Nothing is downloaded:
//! a missing repository is an error saying where it looked and how to download it.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// What kind of repository an id names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    Model,
    Dataset,
}

impl RepoKind {
    fn folder_prefix(self) -> &'static str {
        match self {
            Self::Model => "models",
            Self::Dataset => "datasets",
        }
    }
}

/// A model (or PEFT adapter) directory: `local` (the spec as a path, relative to where it was
/// given) when it exists or `spec` is no Hugging Face id, else the cached snapshot of the Hugging Face id `spec`
/// (`ORG/NAME`, or `ORG/NAME@revision`) at `revision` (default `main`). `what` names the
/// setting in errors (`--model`, `configs/x.toml: model.base`).
pub fn model_dir(local: &Path, spec: &Path, revision: Option<&str>, what: &str) -> Result<PathBuf> {
    if local.exists() {
        return Ok(local.to_path_buf());
    }
    let text = spec.to_string_lossy();
    let (id, at) = match text.split_once('@') {
        Some((id, rev)) => (id, Some(rev)),
        None => (text.as_ref(), None),
    };
    if !is_hub_id(id) {
        // Not an id: the caller's loader reports the missing path.
        return Ok(local.to_path_buf());
    }
    snapshot(RepoKind::Model, id, revision.or(at), what)
}

/// Parquet files: `local` (the spec as a path) when it exists; else, for a spec `ORG/NAME`,
/// every `*.parquet` of the cached dataset (sorted), or for `ORG/NAME/path/in/repo.parquet` that
/// file; `ORG/NAME@revision` picks a revision.
pub fn dataset_files(local: &Path, spec: &Path, what: &str) -> Result<Vec<PathBuf>> {
    if local.exists() {
        return Ok(vec![local.to_path_buf()]);
    }
    let text = spec.to_string_lossy();
    let mut parts = text.splitn(3, '/');
    let (Some(org), Some(name)) = (parts.next(), parts.next()) else {
        bail!("{what}: {}: no such file", local.display());
    };
    let inner = parts.next();
    let (name, revision) = match name.split_once('@') {
        Some((n, r)) => (n, Some(r)),
        None => (name, None),
    };
    let id = format!("{org}/{name}");
    if !is_hub_id(&id) {
        bail!("{what}: {}: no such file", local.display());
    }
    let root = snapshot(RepoKind::Dataset, &id, revision, what)?;
    let files = match inner {
        Some(path) => {
            let file = root.join(path);
            if !file.is_file() {
                bail!(
                    "{what}: {path} is not a file of dataset {id} ({})",
                    root.display()
                );
            }
            vec![file]
        }
        None => {
            let mut files = Vec::new();
            parquet_files(&root, &mut files)?;
            files.sort();
            files
        }
    };
    if files.is_empty() {
        bail!(
            "{what}: dataset {id} has no .parquet files in {}",
            root.display()
        );
    }
    Ok(files)
}

/// Whether `spec` could name a repository (`ORG/NAME`, `ORG/NAME@revision`, or for datasets
/// `ORG/NAME/path/in/repo`) rather than only a local path.
pub fn names_repo(spec: &Path) -> bool {
    let text = spec.to_string_lossy();
    let mut parts = text.splitn(3, '/');
    match (parts.next(), parts.next()) {
        (Some(org), Some(name)) => {
            let name = name.split_once('@').map_or(name, |(n, _)| n);
            is_hub_id(&format!("{org}/{name}"))
        }
        _ => false,
    }
}

/// The Hugging Face cache directory.
pub fn cache_dir() -> PathBuf {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")) {
        return dir;
    }
    if let Some(home) = var("HF_HOME") {
        return home.join("hub");
    }
    let cache = var("XDG_CACHE_HOME")
        .or_else(|| var("HOME").map(|h| h.join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("huggingface").join("hub")
}

/// `ORG/NAME` with Hugging Face's characters, exactly one slash.
fn is_hub_id(s: &str) -> bool {
    let ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with(['.', '-'])
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    matches!(s.split_once('/'), Some((org, name)) if ok(org) && ok(name))
}

/// The snapshot directory of `id` at `revision` (a branch or tag in `refs/`, or a commit).
fn snapshot(kind: RepoKind, id: &str, revision: Option<&str>, what: &str) -> Result<PathBuf> {
    let cache = cache_dir();
    let repo = cache.join(format!(
        "{}--{}",
        kind.folder_prefix(),
        id.replace('/', "--")
    ));
    let revision = revision.unwrap_or("main");
    let download = match kind {
        RepoKind::Model => format!("huggingface-cli download {id}"),
        RepoKind::Dataset => format!("huggingface-cli download --repo-type dataset {id}"),
    };
    let rev_flag = if revision == "main" {
        String::new()
    } else {
        format!(" --revision {revision}")
    };
    if !repo.is_dir() {
        bail!(
            "{what}: {id} is not a local path and not in the Hugging Face cache (looked for {}); \
             download it with `{download}{rev_flag}` or set HF_HOME / HF_HUB_CACHE",
            repo.display()
        );
    }
    let reference = repo.join("refs").join(revision);
    let commit = if reference.is_file() {
        std::fs::read_to_string(&reference)
            .with_context(|| format!("{}: cannot read", reference.display()))?
            .trim()
            .to_string()
    } else {
        revision.to_string()
    };
    let dir = repo.join("snapshots").join(&commit);
    if !dir.is_dir() {
        bail!(
            "{what}: {id} at revision {revision} is not in the Hugging Face cache (no {}); \
             download it with `{download}{rev_flag}`",
            dir.display()
        );
    }
    Ok(dir)
}

fn parquet_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        if path.is_dir() {
            parquet_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "parquet") {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::is_hub_id;

    #[test]
    fn hub_ids_are_org_slash_name() {
        assert!(is_hub_id("Qwen/Qwen3-8B-Base"));
        assert!(is_hub_id("tatsu-lab/alpaca"));
        assert!(!is_hub_id("runs/tiny/student/extra"));
        assert!(!is_hub_id("../x"));
        assert!(!is_hub_id("model"));
        assert!(!is_hub_id("/abs/path"));
    }
}
