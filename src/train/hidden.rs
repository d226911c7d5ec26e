//! Hidden-state distillation (as Minitron's intermediate-state loss and DistillKit's hidden
//! states): after chosen student layers, the student's hidden state against the teacher's at
//! the layer it stands for. A LaCo student's layer `i` replaced the teacher's layers
//! `origin[i]` (laco_report.json's `layers_kept`), so its output corresponds to the teacher's
//! output after the last of them.
//!
//! The term is `hidden_weight x` the mean over the chosen layers and the counted positions of a
//! per-position distance: `cosine` (1 - cosine similarity) or `mse` (mean squared difference of
//! the RMS-normalised states). Its gradient with respect to each chosen layer's output is taken
//! at once on a detached leaf ([`layer_term`], as [`super::loss::chunked_kd`] does for the
//! logits) and joins the backward pass at that layer ([`super::step`]).

use crate::model::chunk::predicting_rows;
use anyhow::{bail, Context, Result};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Int, Tensor};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Which student layers the hidden term reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HiddenLayers {
    /// Every student layer.
    #[default]
    All,
    /// The layers that stand for more than one teacher layer.
    Merged,
    /// The last layer only.
    Last,
}

/// The hidden term's per-position distance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HiddenDistance {
    /// 1 - cosine similarity.
    #[default]
    Cosine,
    /// Mean squared difference of the states, each divided by its RMS.
    Mse,
}

/// The hidden term of a run: which student layer is compared with which teacher layer's output.
#[derive(Debug, Clone, PartialEq)]
pub struct HiddenTerm {
    /// (student layer, teacher layer) pairs, student layers ascending.
    pub pairs: Vec<(usize, usize)>,
    pub weight: f64,
    pub distance: HiddenDistance,
}

impl HiddenTerm {
    /// The term from `map` (for each student layer, the teacher layer whose output it stands
    /// for) and the layers chosen.
    pub fn new(map: &[usize], layers: HiddenLayers, weight: f64, distance: HiddenDistance) -> Self {
        let last = map.len().saturating_sub(1);
        let pairs = map
            .iter()
            .enumerate()
            .filter(|&(i, &t)| match layers {
                HiddenLayers::All => true,
                HiddenLayers::Last => i == last,
                HiddenLayers::Merged => t - i.checked_sub(1).map_or(0, |p| map[p] + 1) > 0,
            })
            .map(|(i, &t)| (i, t))
            .collect();
        Self {
            pairs,
            weight,
            distance,
        }
    }

    /// The teacher's layers whose outputs the term reads, ascending.
    pub fn teacher_layers(&self) -> Vec<usize> {
        self.pairs.iter().map(|&(_, t)| t).collect()
    }

    /// The index among the pairs of student layer `l`, if the term reads it.
    pub fn index_of(&self, l: usize) -> Option<usize> {
        self.pairs.iter().position(|&(s, _)| s == l)
    }

    /// What turns the sum of distances into their mean over the layers and the step's `count`
    /// of rows.
    pub fn mean_factor(&self, count: usize) -> f64 {
        1.0 / (self.pairs.len().max(1) * count.max(1)) as f64
    }

    /// What multiplies the sum of distances in the loss: the weight times [`Self::mean_factor`].
    pub fn scale(&self, count: usize) -> f64 {
        self.weight * self.mean_factor(count)
    }
}

/// Where a map came from, for the run's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapSource {
    Config,
    PruneReport,
    Proportional,
}

/// For each of `student_layers` layers, the teacher layer (of `teacher_layers`) whose output it
/// stands for: `configured` (`[loss] hidden_layer_map`, named by `origin` in errors) when set;
/// else from `student`'s laco_report.json (`layers_kept`: the last teacher layer each replaced);
/// else proportional (layer i of S stands for the teacher's layer round((i + 1) T / S) - 1).
pub fn layer_map(
    student: &Path,
    student_layers: usize,
    teacher_layers: usize,
    configured: Option<&[usize]>,
    origin: &str,
) -> Result<(Vec<usize>, MapSource)> {
    let report = student.join(crate::prune::job::REPORT);
    let (map, source, what) = if let Some(map) = configured {
        (
            map.to_vec(),
            MapSource::Config,
            format!("{origin}: loss.hidden_layer_map"),
        )
    } else if report.exists() {
        let text = std::fs::read_to_string(&report)
            .with_context(|| format!("{}: cannot read", report.display()))?;
        let what = format!("{}: layers_kept", report.display());
        let json: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}", report.display()))?;
        let kept: Vec<Vec<usize>> =
            serde_json::from_value(json["layers_kept"].clone()).with_context(|| what.clone())?;
        let map = kept
            .iter()
            .map(|o| o.iter().max().copied())
            .collect::<Option<Vec<usize>>>()
            .with_context(|| format!("{what}: a student layer stands for no teacher layer"))?;
        (map, MapSource::PruneReport, what)
    } else {
        let map = (0..student_layers)
            .map(|i| {
                let t = ((i + 1) as f64 * teacher_layers as f64 / student_layers as f64).round();
                (t as usize).clamp(1, teacher_layers) - 1
            })
            .collect();
        (map, MapSource::Proportional, "proportional".into())
    };
    if map.len() != student_layers {
        bail!(
            "{what}: {} entries for a student of {student_layers} layers",
            map.len()
        );
    }
    if map.windows(2).any(|w| w[0] >= w[1]) || map.iter().any(|&t| t >= teacher_layers) {
        bail!("{what}: {map:?} must be increasing teacher layers below {teacher_layers}");
    }
    Ok((map, source))
}

/// The sum over rows of the distance between the student's `[rows, hidden]` states and the
/// teacher's, in f32 (`[1]`).
pub fn distance_sum<B: Backend>(
    student: Tensor<B, 2>,
    teacher: Tensor<B, 2>,
    distance: HiddenDistance,
) -> Tensor<B, 1> {
    let (s, t) = (student.cast(DType::F32), teacher.cast(DType::F32));
    let rows = s.dims()[0];
    let per_row = match distance {
        HiddenDistance::Cosine => {
            let dot = (s.clone() * t.clone()).sum_dim(1);
            let norms = (s.powi_scalar(2).sum_dim(1) * t.powi_scalar(2).sum_dim(1))
                .sqrt()
                .clamp_min(1e-12);
            (dot / norms).neg().add_scalar(1.0)
        }
        HiddenDistance::Mse => {
            let rms = |x: Tensor<B, 2>| {
                let r = x.clone().powi_scalar(2).mean_dim(1).add_scalar(1e-6).sqrt();
                x / r
            };
            (rms(s) - rms(t)).powi_scalar(2).mean_dim(1)
        }
    };
    per_row.reshape([rows]).sum()
}

/// One student layer's share of the hidden term: the sum of distances over the counted `rows`
/// of its `output` `[batch, seq, hidden]` against the teacher's counted rows `[count, hidden]`,
/// and the gradient with respect to `output` of that sum times `scale`.
pub fn layer_term<B: AutodiffBackend>(
    output: Tensor<B::InnerBackend, 3>,
    teacher: Tensor<B::InnerBackend, 2>,
    rows: Tensor<B, 1, Int>,
    scale: f64,
    distance: HiddenDistance,
) -> (Tensor<B::InnerBackend, 1>, Tensor<B::InnerBackend, 3>) {
    let x = Tensor::<B, 3>::from_inner(output).require_grad();
    let student = predicting_rows(x.clone()).select(0, rows);
    let sum = distance_sum(student, Tensor::from_inner(teacher), distance);
    let grads = sum.clone().mul_scalar(scale).backward();
    let grad = x.grad(&grads).expect("the layer's output takes a gradient");
    (sum.inner(), grad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Cpu;

    #[test]
    fn distances_of_known_rows() {
        let dev = Default::default();
        let t = |v: [[f32; 2]; 2]| Tensor::<Cpu, 2>::from_floats(v, &dev);
        let sum = |d, s, o| -> f32 { distance_sum(t(s), t(o), d).into_scalar() };
        // Rows: orthogonal (cosine distance 1), parallel (0).
        let (s, o) = ([[1.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [2.0, 2.0]]);
        assert!((sum(HiddenDistance::Cosine, s, o) - 1.0).abs() < 1e-6);
        // RMS-normalised: [1, 0] -> [1.414, 0] against [0, 1.414] (2 + 2) / 2 = 2; the parallel
        // rows normalise to the same state (0).
        assert!((sum(HiddenDistance::Mse, s, o) - 2.0).abs() < 1e-5);
    }

    #[test]
    fn the_map_of_a_prune_report_is_the_last_layer_each_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let report = serde_json::json!({"layers_kept": [[0], [1, 2, 3], [4], [5, 6]]});
        std::fs::write(dir.path().join("laco_report.json"), report.to_string()).unwrap();
        let (map, source) = layer_map(dir.path(), 4, 7, None, "c.toml").unwrap();
        assert_eq!((map, source), (vec![0, 3, 4, 6], MapSource::PruneReport));
        let term = HiddenTerm::new(
            &[0, 3, 4, 6],
            HiddenLayers::Merged,
            1.0,
            HiddenDistance::Mse,
        );
        assert_eq!(term.pairs, [(1, 3), (3, 6)]);
        // A configured map wins over the report.
        let (map, source) = layer_map(dir.path(), 4, 7, Some(&[1, 2, 5, 6]), "c").unwrap();
        assert_eq!((map, source), (vec![1, 2, 5, 6], MapSource::Config));
        let err = layer_map(dir.path(), 3, 7, None, "c")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("laco_report.json: layers_kept: 4 entries"),
            "{err}"
        );
    }

    #[test]
    fn layers_chosen_from_the_map() {
        // Student layer 2 replaced teacher layers 2..=4.
        let map = [0, 1, 4, 5];
        let pairs = |l| HiddenTerm::new(&map, l, 1.0, HiddenDistance::Cosine).pairs;
        assert_eq!(pairs(HiddenLayers::All), [(0, 0), (1, 1), (2, 4), (3, 5)]);
        assert_eq!(pairs(HiddenLayers::Merged), [(2, 4)]);
        assert_eq!(pairs(HiddenLayers::Last), [(3, 5)]);
        let term = HiddenTerm::new(&map, HiddenLayers::All, 0.5, HiddenDistance::Mse);
        assert_eq!(term.scale(10), 0.5 / 40.0);
        assert_eq!(term.index_of(2), Some(2));
    }

    #[test]
    fn proportional_map_and_bad_config_maps() {
        let none = Path::new("/nonexistent-student");
        let (map, source) = layer_map(none, 4, 10, None, "c.toml").unwrap();
        assert_eq!((map, source), (vec![2, 4, 7, 9], MapSource::Proportional));
        let (map, _) = layer_map(none, 3, 3, None, "c.toml").unwrap();
        assert_eq!(map, [0, 1, 2]);
        for bad in [&[0, 1][..], &[1, 1, 2], &[0, 1, 3]] {
            let err = layer_map(none, 3, 3, Some(bad), "c.toml").unwrap_err();
            assert!(
                err.to_string()
                    .starts_with("c.toml: loss.hidden_layer_map: "),
                "{err}"
            );
        }
    }
}
