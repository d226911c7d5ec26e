//! Safetensors files, read and written. Reading: a model directory's `model.safetensors`, or the
//! shards named by `model.safetensors.index.json`, or one file (a PEFT adapter, optimiser
//! moments), memory-mapped; each tensor is copied once, straight from the map into a device
//! tensor of the compute dtype, and nothing reads a whole file into memory. Writing: named
//! tensors pulled from the device one at a time while the file is written, in a storage dtype.

use anyhow::{anyhow, bail, Context, Result};
use burn::tensor::{backend::Backend, DType, ElementConversion, Tensor, TensorData};
use memmap2::Mmap;
use safetensors::{tensor::Metadata, Dtype, SafeTensors, View};
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

struct Shard {
    path: PathBuf,
    map: Mmap,
    header_len: usize,
    meta: Metadata,
}

/// Open safetensors files. Every tensor taken is recorded, so [`WeightReader::finish`] can name
/// the ones nobody asked for.
pub struct WeightReader {
    shards: Vec<Shard>,
    location: HashMap<String, usize>,
    taken: RefCell<BTreeSet<String>>,
}

impl WeightReader {
    /// Opens `dir/model.safetensors` or, when present, the shards of `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        let single = dir.join(SINGLE_FILE);
        let mut shards = Vec::new();
        let mut location = HashMap::new();
        if index_path.exists() {
            let index: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(&index_path)
                    .with_context(|| format!("{}: cannot read", index_path.display()))?,
            )
            .map_err(|e| anyhow!("{}: {e}", index_path.display()))?;
            let map = index
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| anyhow!("{}: weight_map is missing", index_path.display()))?;
            let mut files: BTreeMap<String, usize> = BTreeMap::new();
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    anyhow!(
                        "{}: weight_map[\"{name}\"] is not a file name",
                        index_path.display()
                    )
                })?;
                let next = files.len();
                let shard = *files.entry(file.to_string()).or_insert(next);
                location.insert(name.clone(), shard);
            }
            let mut ordered: Vec<(&String, &usize)> = files.iter().collect();
            ordered.sort_by_key(|(_, i)| **i);
            for (file, _) in ordered {
                let path = dir.join(file);
                if !path.exists() {
                    bail!(
                        "{}: shard {file} named in weight_map is missing",
                        index_path.display()
                    );
                }
                shards.push(Shard::open(&path)?);
            }
            for (name, &i) in &location {
                if shards[i].meta.info(name).is_none() {
                    bail!(
                        "{}: tensor {name} is not in {} although weight_map names it there",
                        index_path.display(),
                        shards[i].path.display()
                    );
                }
            }
        } else if single.exists() {
            let shard = Shard::open(&single)?;
            for name in shard.meta.tensors().keys() {
                location.insert(name.clone(), 0);
            }
            shards.push(shard);
        } else {
            bail!(
                "{}: no {SINGLE_FILE} or {INDEX_FILE} (is this a Hugging Face model directory?)",
                dir.display()
            );
        }
        Ok(Self {
            shards,
            location,
            taken: RefCell::new(BTreeSet::new()),
        })
    }

    /// Number of safetensors files (1 for `model.safetensors`).
    pub fn num_shards(&self) -> usize {
        self.shards.len()
    }

    /// Opens one safetensors file (e.g. a PEFT adapter's).
    pub fn open_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            bail!("{}: not found", path.display());
        }
        let shard = Shard::open(path)?;
        let location = shard
            .meta
            .tensors()
            .keys()
            .map(|n| (n.clone(), 0))
            .collect();
        Ok(Self {
            shards: vec![shard],
            location,
            taken: RefCell::new(BTreeSet::new()),
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.location.keys().cloned().collect();
        names.sort();
        names
    }

    /// The safetensors dtype of tensor `name` (its storage dtype).
    pub fn dtype_of(&self, name: &str) -> Option<Dtype> {
        let shard = &self.shards[*self.location.get(name)?];
        shard.meta.info(name).map(|i| i.dtype)
    }

    /// Tensor `name`, checked against `shape`, converted to the device's default float dtype.
    pub fn tensor<B: Backend, const D: usize>(
        &self,
        name: &str,
        shape: [usize; D],
        device: &B::Device,
    ) -> Result<Tensor<B, D>> {
        Ok(Tensor::from_data(self.take(name, &shape)?, device))
    }

    /// [`WeightReader::tensor`] in f32 whatever the device's default dtype (adapters and
    /// optimiser moments being trained).
    pub fn tensor_f32<B: Backend, const D: usize>(
        &self,
        name: &str,
        shape: [usize; D],
        device: &B::Device,
    ) -> Result<Tensor<B, D>> {
        Ok(Tensor::from_data(
            self.take(name, &shape)?,
            (device, DType::F32),
        ))
    }

    /// Tensor `name`'s data, checked against `shape`, recorded as taken.
    fn take(&self, name: &str, shape: &[usize]) -> Result<TensorData> {
        let data = self.data(name, shape)?;
        self.taken.borrow_mut().insert(name.to_string());
        Ok(data)
    }

    fn data(&self, name: &str, shape: &[usize]) -> Result<TensorData> {
        let Some(&i) = self.location.get(name) else {
            bail!(
                "{}: tensor {name} is missing (expected shape {shape:?})",
                self.describe()
            );
        };
        let shard = &self.shards[i];
        let info = shard.meta.info(name).expect("located tensors exist");
        if info.shape != shape {
            bail!(
                "{}: tensor {name} has shape {:?}, expected {shape:?}",
                shard.path.display(),
                info.shape
            );
        }
        let dtype = float_dtype(info.dtype).ok_or_else(|| {
            anyhow!(
                "{}: tensor {name} has dtype {:?}, expected F32, BF16 or F16",
                shard.path.display(),
                info.dtype
            )
        })?;
        let (start, end) = info.data_offsets;
        let base = 8 + shard.header_len;
        let bytes = shard.map[base + start..base + end].to_vec();
        Ok(TensorData::from_bytes_vec(bytes, shape.to_vec(), dtype))
    }

    /// Fails, naming them, when the files hold tensors nobody took.
    /// `ignorable` names tensors that are fine to leave (e.g. a tied lm_head's copy).
    pub fn finish(&self, ignorable: impl Fn(&str) -> bool) -> Result<()> {
        let taken = self.taken.borrow();
        let extra: Vec<&String> = self
            .location
            .keys()
            .filter(|n| !taken.contains(*n) && !ignorable(n))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if let Some(first) = extra.first() {
            bail!(
                "{}: unexpected tensor {first}{} (not part of this model's architecture per config.json)",
                self.describe(),
                if extra.len() > 1 { format!(" and {} more", extra.len() - 1) } else { String::new() }
            );
        }
        Ok(())
    }

    fn describe(&self) -> String {
        match self.shards.as_slice() {
            [one] => one.path.display().to_string(),
            many => format!(
                "{} (sharded, {} files)",
                many[0]
                    .path
                    .parent()
                    .unwrap_or(Path::new("."))
                    .join(INDEX_FILE)
                    .display(),
                many.len()
            ),
        }
    }
}

/// The burn dtype of a safetensors float dtype laco-train reads and writes (F32, BF16, F16).
pub fn float_dtype(dtype: Dtype) -> Option<DType> {
    match dtype {
        Dtype::F32 => Some(DType::F32),
        Dtype::BF16 => Some(DType::BF16),
        Dtype::F16 => Some(DType::F16),
        _ => None,
    }
}

impl Shard {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        // SAFETY: the map is read-only; a file changed under a running job is a user error
        // that at worst yields wrong numbers, never unsoundness in our own data structures.
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("{}: cannot memory-map", path.display()))?;
        let (header_len, meta) =
            SafeTensors::read_metadata(&map).map_err(|e| invalid_safetensors(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            map,
            header_len,
            meta,
        })
    }
}

/// The error for a file `path` that safetensors cannot read: what was expected and the likely
/// cause.
pub fn invalid_safetensors(path: &Path, e: safetensors::SafeTensorError) -> anyhow::Error {
    anyhow!(
        "{}: not a valid safetensors file ({e:?}); truncated (an interrupted write or copy?) or another format?",
        path.display()
    )
}

/// One named weight, still on the device.
pub enum Weight<B: Backend> {
    Vector(Tensor<B, 1>),
    Matrix(Tensor<B, 2>),
}

impl<B: Backend> Weight<B> {
    fn shape(&self) -> Vec<usize> {
        match self {
            Self::Vector(t) => t.dims().to_vec(),
            Self::Matrix(t) => t.dims().to_vec(),
        }
    }

    /// The largest magnitude held.
    fn largest(&self) -> f32 {
        let max = match self {
            Self::Vector(t) => t.clone().abs().max(),
            Self::Matrix(t) => t.clone().abs().max(),
        };
        max.into_scalar().elem()
    }
}

/// Fails, naming `what`, when `largest` (the largest magnitude of a tensor) is finite but
/// overflows `dtype`: stored, it would become an infinity.
pub fn check_fits(what: &str, largest: f32, dtype: Dtype) -> Result<()> {
    let (stored, max, wider) = match dtype {
        Dtype::F16 => (
            half::f16::from_f32(largest).to_f32(),
            half::f16::MAX.to_f32(),
            "bf16 or f32",
        ),
        Dtype::BF16 => (
            half::bf16::from_f32(largest).to_f32(),
            half::bf16::MAX.to_f32(),
            "f32",
        ),
        _ => return Ok(()),
    };
    if largest.is_finite() && !stored.is_finite() {
        bail!(
            "{what}: its largest value {largest:e} overflows {dtype:?} (largest finite {max:e}) and would be stored as infinity; nothing is written (store it as {wider})"
        );
    }
    Ok(())
}

/// [`check_fits`] for every weight, before anything is written.
fn check_all_fit<B: Backend>(weights: &[(String, Weight<B>)], dtype: Dtype) -> Result<()> {
    if !matches!(dtype, Dtype::F16 | Dtype::BF16) {
        return Ok(());
    }
    for (name, w) in weights {
        check_fits(&format!("tensor {name}"), w.largest(), dtype)?;
    }
    Ok(())
}

/// Storage dtype of the written safetensors.
pub fn storage_dtype(dtype: Dtype) -> Result<DType> {
    float_dtype(dtype).ok_or_else(|| anyhow!("cannot write weights as {dtype:?}"))
}

/// A weight converted to the storage dtype only when safetensors asks for its bytes.
struct LazyWeight<'a, B: Backend> {
    weight: &'a Weight<B>,
    dtype: Dtype,
    shape: Vec<usize>,
}

impl<B: Backend> View for LazyWeight<'_, B> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let data = match self.weight {
            Weight::Vector(t) => t.to_data(),
            Weight::Matrix(t) => t.to_data(),
        };
        let target = storage_dtype(self.dtype).expect("checked before writing");
        Cow::Owned(data.convert_dtype(target).as_bytes().to_vec())
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// Writes `weights` to one safetensors file in `dtype`; refuses, writing nothing, weights that
/// overflow it (see [`check_fits`]).
pub fn write_safetensors<B: Backend>(
    weights: &[(String, Weight<B>)],
    dtype: Dtype,
    path: &Path,
) -> Result<()> {
    check_all_fit(weights, dtype)?;
    write_file(weights, dtype, path)
}

fn write_file<B: Backend>(
    weights: &[(String, Weight<B>)],
    dtype: Dtype,
    path: &Path,
) -> Result<()> {
    storage_dtype(dtype)?;
    let views: Vec<_> = weights
        .iter()
        .map(|(n, w)| {
            (
                n.clone(),
                LazyWeight {
                    weight: w,
                    dtype,
                    shape: w.shape(),
                },
            )
        })
        .collect();
    let metadata = Some(
        [("format".to_string(), "pt".to_string())]
            .into_iter()
            .collect(),
    );
    safetensors::serialize_to_file(views, metadata, path)
        .map_err(|e| anyhow!("{}: cannot write ({e:?})", path.display()))
}

/// Writes `weights` into `dir` as Hugging Face does: `model.safetensors` when `shards` is 1,
/// else that many files of about equal size, `model-0000i-of-0000n.safetensors`, named by
/// `model.safetensors.index.json`. Weights that overflow `dtype` are refused before any file
/// is written (see [`check_fits`]).
pub fn write_sharded<B: Backend>(
    weights: &[(String, Weight<B>)],
    dtype: Dtype,
    shards: usize,
    dir: &Path,
) -> Result<()> {
    check_all_fit(weights, dtype)?;
    let bytes: Vec<usize> = weights
        .iter()
        .map(|(_, w)| w.shape().iter().product::<usize>() * dtype.bitsize() / 8)
        .collect();
    let total: usize = bytes.iter().sum();
    let groups = split_evenly(&bytes, shards.max(1));
    let mut weight_map = serde_json::Map::new();
    for (i, range) in groups.iter().enumerate() {
        let file = if groups.len() == 1 {
            SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, groups.len())
        };
        for (name, _) in &weights[range.clone()] {
            weight_map.insert(name.clone(), serde_json::Value::String(file.clone()));
        }
        write_file(&weights[range.clone()], dtype, &dir.join(&file))?;
    }
    if groups.len() > 1 {
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let text = serde_json::to_string_pretty(&index).expect("JSON values serialise");
        let path = dir.join(INDEX_FILE);
        std::fs::write(&path, text + "\n")
            .with_context(|| format!("{}: cannot write", path.display()))?;
    }
    Ok(())
}

/// Consecutive index ranges over `sizes`, `parts` of them, each about `sum / parts` bytes.
fn split_evenly(sizes: &[usize], parts: usize) -> Vec<std::ops::Range<usize>> {
    let target = sizes.iter().sum::<usize>().div_ceil(parts);
    let mut ranges = Vec::new();
    let (mut start, mut acc) = (0, 0);
    for (i, &s) in sizes.iter().enumerate() {
        if acc > 0 && acc + s > target && ranges.len() + 1 < parts {
            ranges.push(start..i);
            (start, acc) = (i, 0);
        }
        acc += s;
    }
    ranges.push(start..sizes.len());
    ranges
}

#[cfg(test)]
mod tests {
    use super::split_evenly;

    #[test]
    fn shards_split_by_size_and_cover_everything() {
        let r = split_evenly(&[10, 10, 10, 10, 10, 10], 3);
        assert_eq!(r, vec![0..2, 2..4, 4..6]);
        assert_eq!(split_evenly(&[5, 5], 1), vec![0..2]);
        // A dominant tensor gets a file of its own; the rest share one.
        assert_eq!(split_evenly(&[100, 1, 1], 3), vec![0..1, 1..3]);
    }
}
