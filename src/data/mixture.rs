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
    /// Packed batches: the last sequence drawn did not fit into the batch before, and starts
    /// the next one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub carried: bool,
}

/// The training sequences of every file, drawn by mixture weight in a seeded order; each file
/// is reshuffled when exhausted (a new epoch of that file). Batches take the draws in order:
/// one sequence per row, right-padded, or (`packing`) packed into rows of `max_seq_len` tokens,
/// each sequence into the fullest row of the batch it fits in (see [`Stream::next_batch`]).
pub struct Mixture {
    /// Every file's sequences, in file order; ids number them across files in that order.
    files: Vec<Vec<Sequence>>,
    /// The id of each file's first sequence.
    first_id: Vec<usize>,
    stream: Stream,
    /// Rows of this many tokens when packing.
    packing: Option<usize>,
    pad: u32,
}

/// What decides the next batches: the seeded draw order and, packing, the sequence drawn that
/// did not fit into the last batch.
#[derive(Clone)]
struct Stream {
    draws: Draws,
    carried: Option<usize>,
}

/// The seeded draw order: which file, then which of its sequences (a shuffled order per file).
#[derive(Clone)]
struct Draws {
    /// Per file, its sequences' indices in this epoch's shuffled order.
    order: Vec<Vec<u32>>,
    first_id: Vec<usize>,
    cursor: Vec<usize>,
    epoch: Vec<u64>,
    drawn: u64,
    seed: u64,
    weights: Vec<f64>,
    rng: StdRng,
}

impl Draws {
    /// The next sequence's id.
    fn next(&mut self) -> usize {
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
        if self.cursor[f] == self.order[f].len() {
            self.order[f].shuffle(&mut self.rng);
            self.cursor[f] = 0;
            self.epoch[f] += 1;
        }
        self.drawn += 1;
        self.cursor[f] += 1;
        self.first_id[f] + self.order[f][self.cursor[f] - 1] as usize
    }
}

impl Stream {
    /// The ids of the next batch's sequences, row by row: `size` rows of one sequence, or
    /// packing `size` rows of at most `row_len` tokens (`len` gives a sequence's tokens, never
    /// more than `row_len`): each sequence drawn goes into the fullest row it fits in (best
    /// fit; a new row while the batch has fewer than `size`), and the first that fits in none
    /// starts the next batch.
    fn next_batch(
        &mut self,
        size: usize,
        packing: Option<usize>,
        len: impl Fn(usize) -> usize,
    ) -> Vec<Vec<usize>> {
        let Some(row_len) = packing else {
            return (0..size).map(|_| vec![self.draws.next()]).collect();
        };
        let mut rows: Vec<(Vec<usize>, usize)> = Vec::with_capacity(size);
        loop {
            let id = match self.carried.take() {
                Some(id) => id,
                None => self.draws.next(),
            };
            let n = len(id);
            let best = (0..rows.len())
                .filter(|&r| rows[r].1 + n <= row_len)
                .min_by_key(|&r| row_len - rows[r].1);
            match best {
                Some(r) => {
                    rows[r].0.push(id);
                    rows[r].1 += n;
                }
                None if rows.len() < size => rows.push((vec![id], n)),
                None => {
                    self.carried = Some(id);
                    return rows.into_iter().map(|(row, _)| row).collect();
                }
            }
        }
    }
}

impl Mixture {
    pub fn load(d: &DataConfig, tok: &Tokenizer) -> Result<Self> {
        let eos = tok
            .eos_id()
            .ok_or_else(|| anyhow::anyhow!("tokenizer.json: no end-of-text token"))?;
        let mut rng = StdRng::seed_from_u64(d.seed);
        let (mut files, mut order, mut first_id) = (Vec::new(), Vec::new(), Vec::new());
        for path in &d.files {
            let mut seqs = Vec::new();
            let mut error = None;
            let rows = read_examples(path, |ex| {
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
            let p = path.display();
            if rows.skipped == rows.read {
                bail!(
                    "{p}: every row read ({}) has a null or empty {}: nothing to train on",
                    rows.read,
                    rows.required()
                );
            }
            if rows.skipped > 0 && crate::dist::world().is_root() {
                eprintln!(
                    "{p}: skipped {} of {} rows with a null or empty {}",
                    rows.skipped,
                    rows.read,
                    rows.required()
                );
            }
            if seqs.is_empty() {
                bail!(
                    "{}: no example has a response token within max_seq_len {}",
                    path.display(),
                    d.max_seq_len
                );
            }
            // The same permutation as shuffling the sequences themselves would make.
            let mut perm: Vec<u32> = (0..seqs.len() as u32).collect();
            perm.shuffle(&mut rng);
            first_id.push(files.iter().map(Vec::len).sum());
            order.push(perm);
            files.push(seqs);
        }
        let weights = if d.weights.is_empty() {
            vec![1.0; files.len()]
        } else {
            d.weights.clone()
        };
        let draws = Draws {
            cursor: vec![0; files.len()],
            epoch: vec![0; files.len()],
            drawn: 0,
            seed: d.seed,
            first_id: first_id.clone(),
            order,
            weights,
            rng,
        };
        Ok(Self {
            files,
            first_id,
            stream: Stream {
                draws,
                carried: None,
            },
            packing: d.packing.then_some(d.max_seq_len),
            pad: eos,
        })
    }

    /// The sequence with id `id` (ids number all files' sequences in file order).
    pub fn sequence(&self, id: usize) -> &Sequence {
        lookup(&self.files, &self.first_id, id)
    }

    fn len_of(&self) -> impl Fn(usize) -> usize + '_ {
        |id| self.sequence(id).ids.len()
    }

    /// The next batch: `size` rows, each one sequence (right-padded) or, packing, as many
    /// sequences as fit in `max_seq_len` tokens.
    pub fn batch<B: burn::tensor::backend::Backend>(
        &mut self,
        size: usize,
        device: &B::Device,
    ) -> Batch<B> {
        let (files, first_id) = (&self.files, &self.first_id);
        let len = |id| lookup(files, first_id, id).ids.len();
        let rows = self.stream.next_batch(size, self.packing, len);
        let seqs: Vec<Vec<&Sequence>> = rows
            .iter()
            .map(|r| r.iter().map(|&id| self.sequence(id)).collect())
            .collect();
        let mut batch = match self.packing {
            Some(_) => Batch::packed(&seqs, self.pad, device),
            None => {
                let one: Vec<&Sequence> = seqs.iter().map(|r| r[0]).collect();
                Batch::new(&one, self.pad, device)
            }
        };
        batch.keys = rows.into_iter().flatten().collect();
        batch
    }

    /// Training sequences in all files.
    pub fn sequences(&self) -> usize {
        self.files.iter().map(Vec::len).sum()
    }

    /// The steps of `accum` batches of `size` rows that hold `epochs` x
    /// [`Mixture::sequences`] draws (rounded up), from where the mixture stands: with
    /// packing, counted by packing the draw order ahead.
    pub fn steps_for(&self, epochs: f64, size: usize, accum: usize) -> usize {
        let wanted = (epochs * self.sequences() as f64).ceil() as usize;
        let mut stream = self.stream.clone();
        let (mut batches, mut placed) = (0usize, 0);
        while placed < wanted {
            let rows = stream.next_batch(size, self.packing, self.len_of());
            placed += rows.iter().map(Vec::len).sum::<usize>();
            batches += 1;
        }
        batches.div_ceil(accum.max(1)).max(1)
    }

    /// The ids of the distinct sequences that the next `batches` batches of `size` rows hold,
    /// in the order they come, at most `limit` of them; the mixture itself does not move.
    pub fn planned(&self, batches: usize, size: usize, limit: usize) -> Vec<usize> {
        let mut stream = self.stream.clone();
        let mut seen = vec![false; self.sequences()];
        let mut out = Vec::new();
        for _ in 0..batches {
            for id in stream
                .next_batch(size, self.packing, self.len_of())
                .concat()
            {
                if !std::mem::replace(&mut seen[id], true) {
                    out.push(id);
                }
            }
            if out.len() >= limit {
                out.truncate(limit);
                break;
            }
        }
        out
    }

    pub fn cursor(&self) -> Cursor {
        let d = &self.stream.draws;
        Cursor {
            seed: d.seed,
            drawn: d.drawn,
            epoch: d.epoch.clone(),
            position: d.cursor.clone(),
            carried: self.stream.carried.is_some(),
        }
    }

    /// Replays the draws of `to` (a checkpoint's cursor) and checks that it arrives there.
    pub fn seek(&mut self, to: &Cursor) -> Result<()> {
        let d = &mut self.stream.draws;
        if to.seed != d.seed || to.drawn < d.drawn {
            bail!(
                "the checkpoint's data cursor does not belong to this data (seed {} vs {})",
                to.seed,
                d.seed
            );
        }
        let mut last = self.stream.carried;
        while d.drawn < to.drawn {
            last = Some(d.next());
        }
        self.stream.carried = last.filter(|_| to.carried);
        if self.cursor() != *to {
            bail!("the checkpoint's data cursor does not match this data (files changed?)");
        }
        Ok(())
    }
}

/// The sequence `id` of `files` whose first ids are `first_id`.
fn lookup<'a>(files: &'a [Vec<Sequence>], first_id: &[usize], id: usize) -> &'a Sequence {
    let f = first_id.partition_point(|&first| first <= id) - 1;
    &files[f][id - first_id[f]]
}
