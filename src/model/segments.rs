//! Packed rows: several sequences share one row of a batch, each with its own positions from 0
//! and attending only to itself (a block-diagonal causal mask), as torchtune's packed datasets
//! and transformers' position ids with flash attention's varlen kernels run them.

/// Which sequence each position of a `[batch, seq]` batch belongs to: one id per position, each
/// sequence a contiguous run of equal ids within its row (any ids; a run starts where the id
/// changes or a row begins).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segments {
    ids: Vec<u32>,
    seq: usize,
}

impl Segments {
    /// `ids`: `batch * seq` segment ids, row-major.
    pub fn new(ids: Vec<u32>, seq: usize) -> Self {
        assert!(
            seq > 0 && ids.len().is_multiple_of(seq),
            "segment ids cover whole rows"
        );
        Self { ids, seq }
    }

    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Positions per row.
    pub fn seq(&self) -> usize {
        self.seq
    }

    pub fn batch(&self) -> usize {
        self.ids.len() / self.seq
    }

    /// For every position, the first position of its run (within its row): a query at `i`
    /// sees the keys `first[i]..=i`.
    pub fn run_starts(&self) -> Vec<usize> {
        run_starts(&self.ids, self.seq)
    }

    /// Every position's index within its sequence: the rotary position, restarting at 0.
    pub fn positions(&self) -> Vec<usize> {
        self.run_starts()
            .iter()
            .enumerate()
            .map(|(i, &first)| i % self.seq - first)
            .collect()
    }
}

/// [`Segments::run_starts`] of `ids` in rows of `seq` (as indices within the row).
pub fn run_starts(ids: &[u32], seq: usize) -> Vec<usize> {
    let mut out = Vec::with_capacity(ids.len());
    for row in ids.chunks_exact(seq) {
        let mut first = 0;
        for (j, id) in row.iter().enumerate() {
            if j > 0 && *id != row[j - 1] {
                first = j;
            }
            out.push(first);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_restart_with_every_run_and_row() {
        let s = Segments::new(vec![0, 0, 0, 1, 1, 2, 0, 0, 5, 5, 5, 5], 6);
        assert_eq!(s.batch(), 2);
        assert_eq!(s.run_starts(), [0, 0, 0, 3, 3, 5, 0, 0, 2, 2, 2, 2]);
        assert_eq!(s.positions(), [0, 1, 2, 0, 1, 0, 0, 1, 0, 1, 2, 3]);
    }
}
