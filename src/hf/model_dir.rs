//! Writing a Hugging Face model directory that transformers loads unchanged: config.json,
//! safetensors in the source's dtype (sharded with an index when asked), and every other file of
//! the source directory (tokenizer, generation config, chat template) copied.

use super::weights::{storage_dtype, write_sharded, Weight, INDEX_FILE};
use anyhow::{Context, Result};
use burn::tensor::backend::Backend;
use safetensors::Dtype;
use std::path::Path;

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

/// Writes `weights` (a model's, under their Hugging Face names) into `out` (which must exist
/// and be empty) as a Hugging Face directory.
///
/// - `config`: the config.json to write (the caller updates what changed); its `dtype` and
///   `torch_dtype` are set to `dtype` (`torch_dtype` added when it has neither)
/// - `source`: the directory whose non-weight files are copied
/// - `dtype`: storage dtype; `shards`: number of files (1 writes `model.safetensors`)
pub fn save_pretrained<B: Backend>(
    weights: &[(String, Weight<B>)],
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
    write_sharded(weights, dtype, shards, out)
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
    use super::set_config_dtype;
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
}
