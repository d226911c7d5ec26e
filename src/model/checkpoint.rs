//! Reading a Hugging Face checkpoint directory: `model.safetensors`, or the shards named by
//! `model.safetensors.index.json`, memory-mapped. Each tensor is copied once, straight from the
//! map into a device tensor of the compute dtype; nothing reads a whole file into memory.

use anyhow::{anyhow, bail, Context, Result};
use burn::tensor::{backend::Backend, DType, Tensor, TensorData};
use memmap2::Mmap;
use safetensors::{tensor::Metadata, Dtype, SafeTensors};
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

/// An open checkpoint. Every tensor taken is recorded, so [`Checkpoint::finish`] can name the
/// ones nobody asked for.
pub struct Checkpoint {
    shards: Vec<Shard>,
    location: HashMap<String, usize>,
    taken: RefCell<BTreeSet<String>>,
}

impl Checkpoint {
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

    /// The safetensors dtype of tensor `name` (the checkpoint's storage dtype).
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
        let data = self.data(name, &shape)?;
        self.taken.borrow_mut().insert(name.to_string());
        Ok(Tensor::from_data(data, device))
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

    /// Fails, naming them, when the checkpoint holds tensors the model did not take.
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
        // SAFETY: the map is read-only; a checkpoint changed under a running job is a user error
        // that at worst yields wrong numbers, never unsoundness in our own data structures.
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("{}: cannot memory-map", path.display()))?;
        let (header_len, meta) = SafeTensors::read_metadata(&map).map_err(|e| {
            anyhow!(
                "{}: not a valid safetensors file ({e:?}); truncated or another format?",
                path.display()
            )
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            map,
            header_len,
            meta,
        })
    }
}
