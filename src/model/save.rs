//! Writing a Hugging Face model directory that transformers loads unchanged: config.json,
//! safetensors in the source's dtype (sharded with an index when asked), and every other file of
//! the source directory (tokenizer, generation config, chat template) copied. Tensors are pulled
//! from the device one at a time while the file is written, so the host never holds a full copy.

use super::{
    checkpoint::{float_dtype, INDEX_FILE, SINGLE_FILE},
    CausalLm,
};
use anyhow::{anyhow, Context, Result};
use burn::tensor::{backend::Backend, DType, Tensor};
use safetensors::{Dtype, View};
use std::borrow::Cow;
use std::path::Path;

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

/// The source directory's config.json, to be updated and passed to [`save_pretrained`].
pub fn read_config(source: &Path) -> Result<serde_json::Value> {
    let path = source.join("config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// Sets config.json's `dtype` and `torch_dtype` (whichever it has; `torch_dtype`, which
/// transformers 4 and 5 both read, when it has neither) to transformers' name of `dtype`.
fn set_config_dtype(config: &mut serde_json::Value, dtype: Dtype) {
    let name = match dtype {
        Dtype::BF16 => "bfloat16",
        Dtype::F16 => "float16",
        _ => "float32",
    };
    let mut named = false;
    for key in ["dtype", "torch_dtype"] {
        if let Some(v) = config.get_mut(key) {
            *v = name.into();
            named = true;
        }
    }
    if !named {
        config["torch_dtype"] = name.into();
    }
}

/// Writes `lm` into `out` (which must exist and be empty) as a Hugging Face directory.
///
/// - `config`: the config.json to write (the caller updates what changed); its `dtype` and
///   `torch_dtype` are set to `dtype` (`torch_dtype` added when it has neither)
/// - `source`: the directory whose non-weight files are copied
/// - `dtype`: storage dtype; `shards`: number of files (1 writes `model.safetensors`)
pub fn save_pretrained<B: Backend>(
    lm: &CausalLm<B>,
    config: &serde_json::Value,
    source: &Path,
    out: &Path,
    dtype: Dtype,
    shards: usize,
) -> Result<()> {
    storage_dtype(dtype)?;
    copy_side_files(source, out)?;
    let mut config = config.clone();
    set_config_dtype(&mut config, dtype);
    let config_text = serde_json::to_string_pretty(&config).expect("JSON values serialise");
    std::fs::write(out.join("config.json"), config_text + "\n")
        .with_context(|| format!("{}: cannot write", out.join("config.json").display()))?;

    let weights = lm.weights();
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
        write_safetensors(&weights[range.clone()], dtype, &out.join(&file))?;
    }
    if groups.len() > 1 {
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let text = serde_json::to_string_pretty(&index).expect("JSON values serialise");
        std::fs::write(out.join(INDEX_FILE), text + "\n")
            .with_context(|| format!("{}: cannot write", out.join(INDEX_FILE).display()))?;
    }
    Ok(())
}

/// Writes `weights` to one safetensors file in `dtype`.
pub fn write_safetensors<B: Backend>(
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

/// Copies every file of `source` except weights and config.json (tokenizer, generation config, ...).
fn copy_side_files(source: &Path, out: &Path) -> Result<()> {
    for entry in
        std::fs::read_dir(source).with_context(|| format!("{}: cannot list", source.display()))?
    {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let is_weights =
            name.ends_with(".safetensors") || name == INDEX_FILE || name.ends_with(".bin");
        if path.is_file() && !is_weights && name != "config.json" {
            std::fs::copy(&path, out.join(&name))
                .with_context(|| format!("{}: cannot copy", path.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{set_config_dtype, split_evenly};
    use safetensors::Dtype;

    #[test]
    fn config_dtype_names_the_written_dtype() {
        let mut c = serde_json::json!({"dtype": "float32", "torch_dtype": "float32"});
        set_config_dtype(&mut c, Dtype::BF16);
        assert_eq!(
            c,
            serde_json::json!({"dtype": "bfloat16", "torch_dtype": "bfloat16"})
        );
        let mut c = serde_json::json!({"dtype": "bfloat16"});
        set_config_dtype(&mut c, Dtype::F16);
        assert_eq!(c, serde_json::json!({"dtype": "float16"}));
        let mut c = serde_json::json!({});
        set_config_dtype(&mut c, Dtype::F32);
        assert_eq!(c, serde_json::json!({"torch_dtype": "float32"}));
    }

    #[test]
    fn shards_split_by_size_and_cover_everything() {
        let r = split_evenly(&[10, 10, 10, 10, 10, 10], 3);
        assert_eq!(r, vec![0..2, 2..4, 4..6]);
        assert_eq!(split_evenly(&[5, 5], 1), vec![0..2]);
        // A dominant tensor gets a file of its own; the rest share one.
        assert_eq!(split_evenly(&[100, 1, 1], 3), vec![0..1, 1..3]);
    }
}
