//! Plain text files, read as Python's `open(path).read()` does (universal newlines: `\r\n` and
//! `\r` become `\n`), so token counts and perplexities match scripts written with transformers.

use anyhow::{Context, Result};
use std::path::Path;

pub fn read_text(path: &Path) -> Result<String> {
    let raw = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read as UTF-8 text", path.display()))?;
    Ok(universal_newlines(&raw))
}

fn universal_newlines(s: &str) -> String {
    if !s.contains('\r') {
        return s.to_string();
    }
    s.replace("\r\n", "\n").replace('\r', "\n")
}

#[cfg(test)]
mod tests {
    use super::universal_newlines;

    #[test]
    fn crlf_and_cr_become_lf() {
        assert_eq!(universal_newlines("a\r\nb\rc\n"), "a\nb\nc\n");
    }
}
