//! Reading training and evaluation data.

pub mod text;

pub use text::read_text;
