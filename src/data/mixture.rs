//! The training data: every file's sequences, drawn by mixture weight in a seeded order. The
//! order depends only on the config, so a resumed run replays the draws recorded in its
//! checkpoint and continues exactly where the interrupted run was.

use super::batch::{tokenize, Batch, Sequence};
use super::config::DataConfig;
use super::instruct::read_examples;
use crate::hf::Tokenizer;
use anyhow::{bail, Result};
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Where the data stands: sequences drawn so far, and per file the epoch and position in it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Cursor {
    pub seed: u64,
    pub drawn: u64,
    pub epoch: Vec<u64>,
    pub position: Vec<usize>,
}

/// The training sequences of every file, drawn by mixture weight in a seeded order; each file
/// is reshuffled when exhausted (a new epoch of that file).
pub struct Mixture {
    files: Vec<Vec<Sequence>>,
    cursor: Vec<usize>,
    epoch: Vec<u64>,
    drawn: u64,
    seed: u64,
    weights: Vec<f64>,
    rng: StdRng,
    pad: u32,
}

impl Mixture {
    pub fn load(d: &DataConfig, tok: &Tokenizer) -> Result<Self> {
        let eos = tok
            .eos_id()
            .ok_or_else(|| anyhow::anyhow!("tokenizer.json: no end-of-text token"))?;
        let mut rng = StdRng::seed_from_u64(d.seed);
        let mut files = Vec::new();
        for path in &d.files {
            let mut seqs = Vec::new();
            let mut error = None;
            read_examples(path, |ex| {
                match tokenize(&ex, tok, eos, d.max_seq_len) {
                    Ok(Some(s)) => seqs.push(s),
                    Ok(None) => {}
                    Err(e) => error = Some(e),
                }
                error.is_none() && seqs.len() < d.max_examples
            })?;
            if let Some(e) = error {
                return Err(e);
            }
            if seqs.is_empty() {
                bail!(
                    "{}: no example has a response token within max_seq_len {}",
                    path.display(),
                    d.max_seq_len
                );
            }
            seqs.shuffle(&mut rng);
            files.push(seqs);
        }
        let weights = if d.weights.is_empty() {
            vec![1.0; files.len()]
        } else {
            d.weights.clone()
        };
        Ok(Self {
            cursor: vec![0; files.len()],
            epoch: vec![0; files.len()],
            drawn: 0,
            seed: d.seed,
            files,
            weights,
            rng,
            pad: eos,
        })
    }

    fn next(&mut self) -> &Sequence {
        let total: f64 = self.weights.iter().sum();
        let mut r = self.rng.random::<f64>() * total;
        let mut f = self.weights.len() - 1;
        for (i, w) in self.weights.iter().enumerate() {
            if r < *w {
                f = i;
                break;
            }
            r -= w;
        }
        if self.cursor[f] == self.files[f].len() {
            self.files[f].shuffle(&mut self.rng);
            self.cursor[f] = 0;
            self.epoch[f] += 1;
        }
        self.drawn += 1;
        self.cursor[f] += 1;
        &self.files[f][self.cursor[f] - 1]
    }

    pub fn batch<B: burn::tensor::backend::Backend>(
        &mut self,
        size: usize,
        device: &B::Device,
    ) -> Batch<B> {
        let seqs: Vec<Sequence> = (0..size).map(|_| self.next().clone()).collect();
        Batch::new(&seqs.iter().collect::<Vec<_>>(), self.pad, device)
    }

    /// Training sequences in all files.
    pub fn sequences(&self) -> usize {
        self.files.iter().map(Vec::len).sum()
    }

    pub fn cursor(&self) -> Cursor {
        Cursor {
            seed: self.seed,
            drawn: self.drawn,
            epoch: self.epoch.clone(),
            position: self.cursor.clone(),
        }
    }

    /// Replays the draws of `to` (a checkpoint's cursor) and checks that it arrives there.
    pub fn seek(&mut self, to: &Cursor) -> Result<()> {
        if to.seed != self.seed || to.drawn < self.drawn {
            bail!(
                "the checkpoint's data cursor does not belong to this data (seed {} vs {})",
                to.seed,
                self.seed
            );
        }
        while self.drawn < to.drawn {
            self.next();
        }
        if self.cursor() != *to {
            bail!("the checkpoint's data cursor does not match this data (files changed?)");
        }
        Ok(())
    }
}
