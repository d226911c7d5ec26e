//! The teacher cache on disk: `index.json` and its safetensors shards, written shard by shard
//! and read back by sequence id.

use crate::hf::weights::{check_fits, invalid_safetensors};
use crate::train::loss::{Divergence, KdLoss};
use crate::util::check::first_difference;
use crate::util::write_file_atomically;
use anyhow::{anyhow, bail, Context, Result};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const INDEX: &str = "index.json";
const FORMAT: &str = "laco-train teacher cache";
const VERSION: u32 = 1;
/// Counted positions per shard: 32 MiB of a k = 64 f32 cache.
const SHARD_POSITIONS: usize = 1 << 16;

/// How the log-probabilities are stored; token ids are always 32-bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CacheDtype {
    F32,
    F16,
    Bf16,
}

impl CacheDtype {
    fn safetensors(self) -> Dtype {
        match self {
            Self::F32 => Dtype::F32,
            Self::F16 => Dtype::F16,
            Self::Bf16 => Dtype::BF16,
        }
    }

    fn bytes(self) -> usize {
        self.safetensors().bitsize() / 8
    }

    fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            Self::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Self::F16 => values
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect(),
            Self::Bf16 => values
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                .collect(),
        }
    }

    fn decode(self, bytes: &[u8], out: &mut Vec<f32>) {
        match self {
            Self::F32 => out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))),
            ),
            Self::F16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
            ),
            Self::Bf16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            ),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Index {
    format: String,
    version: u32,
    top_k: usize,
    dtype: CacheDtype,
    fingerprint: serde_json::Value,
    /// Sequences the cache is meant to hold.
    planned: usize,
    /// Whether it holds all of them.
    complete: bool,
    shards: Vec<ShardEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ShardEntry {
    file: String,
    sequences: usize,
    positions: usize,
}

/// What a cache run did.
#[derive(Debug, Clone, Serialize)]
pub struct CacheSummary {
    pub out: PathBuf,
    pub top_k: usize,
    pub dtype: CacheDtype,
    /// Sequences the cache is meant to hold, and holds.
    pub planned: usize,
    pub sequences: usize,
    /// Counted positions stored.
    pub positions: usize,
    pub bytes: u64,
    pub bytes_per_position: f64,
    pub complete: bool,
    /// Sequences computed by this run, and their tokens per second (teacher forward and top-k).
    pub computed: usize,
    pub tokens_per_sec: f64,
}

/// Writes shards and the index of a cache directory, continuing what is there.
pub struct Writer {
    dir: PathBuf,
    index: Index,
    /// Per sequence id: stored already.
    pub done: Vec<bool>,
    /// The shard being filled: sequence ids, row offsets, ids, log-probabilities.
    sequences: Vec<i64>,
    offsets: Vec<i64>,
    ids: Vec<i32>,
    logprobs: Vec<f32>,
}

impl Writer {
    /// The cache in `dir` (new, or continued) of `top_k` entries stored as `dtype`, for a plan of `planned` of the data's
    /// `sequences`.
    pub fn open(
        dir: &Path,
        (top_k, dtype): (usize, CacheDtype),
        fingerprint: serde_json::Value,
        planned: usize,
        sequences: usize,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
        let mut index = Index {
            format: FORMAT.into(),
            version: VERSION,
            top_k,
            dtype,
            fingerprint,
            planned,
            complete: false,
            shards: Vec::new(),
        };
        let mut done = vec![false; sequences];
        if dir.join(INDEX).exists() {
            let old = read_index(dir)?;
            if let Some(field) =
                first_difference(&old.fingerprint, &index.fingerprint, ("cache", "now"))
            {
                bail!(
                    "{}: holds a teacher cache of another run ({}); use another --out or remove it",
                    dir.display(),
                    field
                );
            }
            if (old.top_k, old.dtype) != (top_k, dtype) {
                bail!(
                    "{}: holds a cache with --top-k {} --save-dtype {:?}, not --top-k {} --save-dtype {:?}; use another --out or remove it",
                    dir.display(), old.top_k, old.dtype, top_k, dtype
                );
            }
            for shard in Shard::open_all(dir, &old)? {
                for (id, _) in shard.entries() {
                    *done.get_mut(id).ok_or_else(|| {
                        anyhow!("{}: sequence {id} is not in the data", dir.display())
                    })? = true;
                }
            }
            index.shards = old.shards;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            index,
            done,
            sequences: Vec::new(),
            offsets: vec![0],
            ids: Vec::new(),
            logprobs: Vec::new(),
        })
    }

    pub fn push(&mut self, id: usize, ids: &[i32], logprobs: &[f32]) -> Result<()> {
        self.sequences.push(id as i64);
        self.ids.extend_from_slice(ids);
        self.logprobs.extend_from_slice(logprobs);
        self.offsets
            .push((self.ids.len() / self.index.top_k) as i64);
        if self.ids.len() / self.index.top_k >= SHARD_POSITIONS {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes the shard being filled (if any), then the index.
    fn flush(&mut self) -> Result<()> {
        if self.sequences.is_empty() {
            return Ok(());
        }
        let k = self.index.top_k;
        let positions = self.ids.len() / k;
        let file = format!("shard-{:05}.safetensors", self.index.shards.len());
        let bytes = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let (seq, off) = (bytes(&self.sequences), bytes(&self.offsets));
        let ids: Vec<u8> = self.ids.iter().flat_map(|x| x.to_le_bytes()).collect();
        let largest = self
            .logprobs
            .iter()
            .map(|v| v.abs())
            .filter(|v| v.is_finite())
            .fold(0.0, f32::max);
        let what = format!("{}: logprobs", self.dir.join(&file).display());
        check_fits(&what, largest, self.index.dtype.safetensors())?;
        let lps = self.index.dtype.encode(&self.logprobs);
        fn view(dtype: Dtype, shape: Vec<usize>, data: &[u8]) -> TensorView<'_> {
            TensorView::new(dtype, shape, data).expect("shapes match the buffers")
        }
        let tensors = [
            (
                "sequence",
                view(Dtype::I64, vec![self.sequences.len()], &seq),
            ),
            ("offset", view(Dtype::I64, vec![self.offsets.len()], &off)),
            ("token_ids", view(Dtype::I32, vec![positions, k], &ids)),
            (
                "logprobs",
                view(self.index.dtype.safetensors(), vec![positions, k], &lps),
            ),
        ];
        let data = safetensors::serialize(tensors, None)
            .map_err(|e| anyhow!("{file}: cannot serialise ({e:?})"))?;
        write_file_atomically(&self.dir.join(&file), &data)?;
        self.index.shards.push(ShardEntry {
            file,
            sequences: self.sequences.len(),
            positions,
        });
        self.sequences.clear();
        self.offsets.truncate(1);
        self.ids.clear();
        self.logprobs.clear();
        self.write_index()
    }

    fn write_index(&self) -> Result<()> {
        let text = serde_json::to_string_pretty(&self.index)? + "\n";
        write_file_atomically(&self.dir.join(INDEX), text.as_bytes())
    }

    pub fn finish(mut self, complete: bool) -> Result<CacheSummary> {
        self.flush()?;
        self.index.complete = complete;
        self.write_index()?;
        let sequences: usize = self.index.shards.iter().map(|s| s.sequences).sum();
        let positions: usize = self.index.shards.iter().map(|s| s.positions).sum();
        let mut bytes = 0;
        for s in &self.index.shards {
            bytes += std::fs::metadata(self.dir.join(&s.file))?.len();
        }
        Ok(CacheSummary {
            out: self.dir,
            top_k: self.index.top_k,
            dtype: self.index.dtype,
            planned: self.index.planned,
            sequences,
            positions,
            bytes,
            bytes_per_position: bytes as f64 / positions.max(1) as f64,
            complete,
            computed: 0,
            tokens_per_sec: 0.0,
        })
    }
}

fn read_index(dir: &Path) -> Result<Index> {
    let path = dir.join(INDEX);
    let text = std::fs::read_to_string(&path).map_err(|_| {
        anyhow!(
            "{}: not a teacher cache (no {INDEX}); make one with `laco-train teacher-cache`",
            dir.display()
        )
    })?;
    let index: Index = serde_json::from_str(&text).map_err(|e| {
        anyhow!(
            "{}: not a teacher cache index ({e}); damaged or written by something else? make the cache again with `laco-train teacher-cache`",
            path.display()
        )
    })?;
    if index.format != FORMAT || index.version != VERSION {
        bail!(
            "{}: not a version-{VERSION} laco-train teacher cache",
            path.display()
        );
    }
    Ok(index)
}

/// One shard, memory-mapped: where its sequences' rows and its two tables lie.
struct Shard {
    map: memmap2::Mmap,
    sequences: Vec<usize>,
    offsets: Vec<usize>,
    /// Byte ranges of `token_ids` and `logprobs` in the file.
    ids: std::ops::Range<usize>,
    logprobs: std::ops::Range<usize>,
}

impl Shard {
    fn open_all(dir: &Path, index: &Index) -> Result<Vec<Self>> {
        index
            .shards
            .iter()
            .map(|s| Self::open(&dir.join(&s.file), index))
            .collect()
    }

    fn open(path: &Path, index: &Index) -> Result<Self> {
        let bad = |what: &str| anyhow!("{}: {what}", path.display());
        let file = std::fs::File::open(path).map_err(|_| bad("missing (listed in index.json)"))?;
        // SAFETY: shards are written whole and renamed into place, never changed after.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| bad(&e.to_string()))?;
        let st = SafeTensors::deserialize(&map).map_err(|e| {
            anyhow!(
                "{}; make the cache again with `laco-train teacher-cache`",
                invalid_safetensors(path, e)
            )
        })?;
        let range = |name: &str, dtype: Dtype| -> Result<(std::ops::Range<usize>, Vec<usize>)> {
            let t = st
                .tensor(name)
                .map_err(|_| bad(&format!("no tensor {name}")))?;
            if t.dtype() != dtype {
                return Err(bad(&format!("{name} is {:?}, not {dtype:?}", t.dtype())));
            }
            let start = t.data().as_ptr() as usize - map.as_ptr() as usize;
            Ok((start..start + t.data().len(), t.shape().to_vec()))
        };
        let ints = |name: &str| -> Result<Vec<usize>> {
            let (r, _) = range(name, Dtype::I64)?;
            Ok(map[r]
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
                .collect())
        };
        let (sequences, offsets) = (ints("sequence")?, ints("offset")?);
        let (ids, shape) = range("token_ids", Dtype::I32)?;
        let (logprobs, lp_shape) = range("logprobs", index.dtype.safetensors())?;
        let rows = *offsets.last().unwrap_or(&0);
        if offsets.len() != sequences.len() + 1 || shape != [rows, index.top_k] || lp_shape != shape
        {
            return Err(bad("its tables do not fit together"));
        }
        Ok(Self {
            map,
            sequences,
            offsets,
            ids,
            logprobs,
        })
    }

    /// (sequence id, rows) of every entry.
    fn entries(&self) -> impl Iterator<Item = (usize, std::ops::Range<usize>)> + '_ {
        self.sequences
            .iter()
            .enumerate()
            .map(|(i, &id)| (id, self.offsets[i]..self.offsets[i + 1]))
    }
}

/// A teacher cache opened for reading by a distill run.
pub struct TeacherCache {
    dir: PathBuf,
    index: Index,
    shards: Vec<Shard>,
    /// Sequence id -> (shard, rows).
    entries: HashMap<usize, (usize, std::ops::Range<usize>)>,
}

impl TeacherCache {
    /// Opens `dir` for a run whose fingerprint is `fingerprint` and loss `loss`; refuses a
    /// cache of another run (naming the first differing field) or a loss it cannot serve.
    pub fn open(dir: &Path, fingerprint: &serde_json::Value, loss: &KdLoss) -> Result<Self> {
        let index = read_index(dir)?;
        if let Some(field) = first_difference(&index.fingerprint, fingerprint, ("cache", "now")) {
            bail!(
                "{}: the teacher cache was made for another run: {}; make it again with `laco-train teacher-cache`",
                dir.display(),
                field
            );
        }
        if loss.divergence != Divergence::TopKForwardKl {
            bail!(
                "loss.divergence: a teacher cache holds the teacher's top-k log-probabilities, which only top_k_forward_kl reads (forward_kl and reverse_kl need the full vocabulary: run without [teacher] cache)"
            );
        }
        if loss.top_k > index.top_k {
            bail!(
                "loss.top_k: {} but the teacher cache {} holds the top {} (make it with --top-k {})",
                loss.top_k,
                dir.display(),
                index.top_k,
                loss.top_k
            );
        }
        let shards = Shard::open_all(dir, &index)?;
        let mut entries = HashMap::new();
        for (s, shard) in shards.iter().enumerate() {
            for (id, rows) in shard.entries() {
                entries.insert(id, (s, rows));
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            index,
            shards,
            entries,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Sequences held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The top `k` ids `[rows, k]` and log-probabilities `[rows, k]` (f32) of the sequences
    /// `keys`, one after the other: the counted rows of a batch of them.
    pub fn rows<B: Backend>(
        &self,
        keys: &[usize],
        k: usize,
        device: &B::Device,
    ) -> Result<(Tensor<B, 2, Int>, Tensor<B, 2>)> {
        let (kk, width) = (self.index.top_k, self.index.dtype.bytes());
        let (mut ids, mut logprobs) = (Vec::new(), Vec::new());
        for &id in keys {
            let Some((s, rows)) = self.entries.get(&id) else {
                bail!(
                    "{}: sequence {id} is not in the teacher cache (it holds {} of the {} sequences it was made for): make it for as many steps as this run, or without --max-sequences",
                    self.dir.display(),
                    self.len(),
                    self.index.planned
                );
            };
            let shard = &self.shards[*s];
            let (ib, lb) = (
                &shard.map[shard.ids.clone()],
                &shard.map[shard.logprobs.clone()],
            );
            for r in rows.clone() {
                let row = r * kk;
                ids.extend(
                    ib[row * 4..(row + k) * 4]
                        .chunks_exact(4)
                        .map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes"))),
                );
                self.index
                    .dtype
                    .decode(&lb[row * width..(row + k) * width], &mut logprobs);
            }
        }
        let rows = ids.len() / k.max(1);
        Ok((
            Tensor::from_data(TensorData::new(ids, [rows, k]), device),
            Tensor::from_data(TensorData::new(logprobs, [rows, k]), device),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_probabilities_survive_storage_in_each_dtype() {
        let values = [0.0f32, -std::f32::consts::LN_2, -3.25, -17.125, -103.5];
        for (dtype, tol) in [
            (CacheDtype::F32, 0.0),
            (CacheDtype::F16, 1e-3),
            (CacheDtype::Bf16, 8e-3),
        ] {
            let bytes = dtype.encode(&values);
            assert_eq!(bytes.len(), values.len() * dtype.bytes());
            let mut back = Vec::new();
            dtype.decode(&bytes, &mut back);
            for (a, b) in values.iter().zip(&back) {
                assert!((a - b).abs() <= tol * a.abs(), "{dtype:?}: {a} -> {b}");
            }
        }
    }
}
