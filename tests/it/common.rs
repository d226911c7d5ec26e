//! Shared test helpers: golden files, the bundled fixtures, tolerances, and running the binary.

use burn::tensor::{Int, Tensor, TensorData};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::{Command, Output};

pub type B = laco_train::device::Cpu;

/// The laco-train binary, ready for its arguments.
pub fn laco_command() -> Command {
    Command::new(env!("CARGO_BIN_EXE_laco-train"))
}

/// Runs the laco-train binary with `args` and waits for it.
pub fn laco<S: AsRef<OsStr>>(args: &[S]) -> Output {
    laco_command().args(args).output().expect("run laco-train")
}

/// The last line of a successful run's stdout (what `--json` prints), parsed; a failed run
/// panics with its stderr.
pub fn json_line(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().expect("stdout has a line"))
        .expect("last line is JSON")
}

pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

pub fn device() -> burn::tensor::Device<B> {
    Default::default()
}

/// A golden safetensors file, tensors read as f32 (floats) or i64 (ints).
pub struct Golden {
    bytes: Vec<u8>,
}

impl Golden {
    pub fn open(rel: &str) -> Self {
        Self::open_path(&fixture(rel))
    }

    pub fn open_path(path: &std::path::Path) -> Self {
        Self {
            bytes: std::fs::read(path).expect("safetensors file"),
        }
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let mut n: Vec<String> = st.names().into_iter().map(String::from).collect();
        n.sort();
        n
    }

    pub fn f32(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("golden tensor {name}"));
        assert_eq!(t.dtype(), Dtype::F32);
        let v = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        (v, t.shape().to_vec())
    }

    pub fn i64(&self, name: &str) -> (Vec<i64>, Vec<usize>) {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("golden tensor {name}"));
        assert_eq!(t.dtype(), Dtype::I64);
        let v = t
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        (v, t.shape().to_vec())
    }

    pub fn ids(&self, name: &str) -> Tensor<B, 2, Int> {
        let (v, s) = self.i64(name);
        let v: Vec<i32> = v.into_iter().map(|x| x as i32).collect();
        Tensor::from_data(TensorData::new(v, [s[0], s[1]]), &device())
    }
}

pub fn to_vec<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap()
}

/// Largest absolute difference; panics on length mismatch.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A copy of the tiny model in a temporary directory, its weights rewritten by `edit`.
pub fn edited_model(
    edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<u8>)>),
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(fixture("tiny-qwen3").join(f), dir.path().join(f)).unwrap();
    }
    let bytes = std::fs::read(fixture("tiny-qwen3/model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.shape().to_vec(), t.data().to_vec()))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
    dir
}

/// Writes a Parquet file of string columns (`None`: null), one row per element.
pub fn write_parquet(path: &std::path::Path, columns: &[(&str, Vec<Option<&str>>)]) {
    use arrow_array::{ArrayRef, RecordBatch, StringArray};
    use std::sync::Arc;
    let arrays = columns
        .iter()
        .map(|(name, v)| (*name, Arc::new(StringArray::from(v.clone())) as ArrayRef));
    let batch = RecordBatch::try_from_iter(arrays).unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}
