//! LaCo layer collapse (Yang, Cao, Zhao, arXiv 2402.11187): merge windows of consecutive layers
//! into their lowest one while the pruned model's representations stay close to the original's.

pub mod job;
pub mod laco;
pub mod merge;
pub mod settings;
pub mod similarity;

pub use job::{
    calibration_lines, check_pruned, prune_into, BUNDLED_CALIBRATION, CALIBRATION_BATCH,
};
pub use laco::{collapse, Pruned, Step};
pub use merge::MergeMode;
pub use settings::LacoSettings;
pub use similarity::Calibration;
