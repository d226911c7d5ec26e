//! `tokenizer.json` through the Hugging Face tokenizers crate.

use anyhow::{anyhow, Result};
use std::path::Path;

#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(anyhow!("{}: not found", path.display()));
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
        Ok(Self { inner })
    }

    /// Ids of `text` without special tokens (transformers' `add_special_tokens=False`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizer: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| anyhow!("tokenizer: {e}"))
    }

    /// What makes two tokenizers the same: the model (vocabulary, merges) and the added and
    /// special tokens, as tokenizer.json spells them.
    pub fn content(&self) -> Result<serde_json::Value> {
        let json = self
            .inner
            .to_string(false)
            .map_err(|e| anyhow!("tokenizer: {e}"))?;
        let mut all: serde_json::Value =
            serde_json::from_str(&json).map_err(|e| anyhow!("tokenizer: {e}"))?;
        Ok(serde_json::json!({
            "model": all["model"].take(),
            "added_tokens": all["added_tokens"].take(),
        }))
    }

    /// Number of tokens the tokenizer defines, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The end-of-text id: `<|endoftext|>`, `</s>` or `<|end_of_text|>`, whichever exists.
    pub fn eos_id(&self) -> Option<u32> {
        ["<|endoftext|>", "</s>", "<|end_of_text|>"]
            .iter()
            .find_map(|t| self.token_id(t))
    }
}
