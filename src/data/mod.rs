//! Reading training and evaluation data.

pub mod batch;
pub mod config;
pub mod instruct;
pub mod mixture;
pub mod parquet;
pub mod text;

pub use config::DataConfig;
pub use text::read_text;
