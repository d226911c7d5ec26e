//! Reading training and evaluation data.

pub mod batch;
pub mod instruct;
pub mod mixture;
pub mod parquet;
pub mod text;

pub use text::read_text;
