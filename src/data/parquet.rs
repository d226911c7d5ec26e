//! Row-by-row reading of Parquet files in Hugging Face dataset layouts. Files are read one
//! record batch at a time (never whole), and every type or column mistake is reported with the
//! file and column it concerns.

use anyhow::{anyhow, bail, Context, Result};
use arrow_array::{
    Array, BooleanArray, Int16Array, Int32Array, Int64Array, Int8Array, LargeListArray,
    LargeStringArray, ListArray, RecordBatch, StringArray, UInt8Array,
};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use std::path::{Path, PathBuf};

/// An open Parquet file with at least one row.
pub struct ParquetRows {
    path: PathBuf,
    columns: Vec<String>,
    reader: ParquetRecordBatchReader,
}

impl ParquetRows {
    pub fn open(path: &Path) -> Result<Self> {
        let p = path.display();
        let file = std::fs::File::open(path).with_context(|| format!("{p}: cannot open"))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| anyhow!("{p}: not a Parquet file ({e})"))?;
        let columns = builder
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let empty = builder.metadata().file_metadata().num_rows() == 0;
        let reader = builder
            .with_batch_size(1024)
            .build()
            .map_err(|e| anyhow!("{p}: {e}"))?;
        let rows = Self {
            path: path.to_path_buf(),
            columns,
            reader,
        };
        if empty {
            bail!("{p}: has no rows");
        }
        Ok(rows)
    }

    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// Fails naming the first of `needed` that the file lacks; `layout` describes the expected
    /// schema for the message.
    pub fn require(&self, needed: &[&str], layout: &str) -> Result<()> {
        for c in needed {
            if !self.columns.iter().any(|x| x == c) {
                bail!(
                    "{}: column {c} is missing ({layout}); found {:?}",
                    self.path.display(),
                    self.columns
                );
            }
        }
        Ok(())
    }

    /// Calls `each` for every row in order until it returns `false`.
    pub fn for_each(self, mut each: impl FnMut(&Row) -> Result<bool>) -> Result<()> {
        for batch in self.reader {
            let batch = batch.map_err(|e| anyhow!("{}: {e}", self.path.display()))?;
            for index in 0..batch.num_rows() {
                let row = Row {
                    path: &self.path,
                    batch: &batch,
                    index,
                };
                if !each(&row)? {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

/// One row of a record batch, read by column name.
pub struct Row<'a> {
    path: &'a Path,
    batch: &'a RecordBatch,
    index: usize,
}

impl Row<'_> {
    fn column(&self, name: &str) -> Result<&dyn Array> {
        self.batch
            .column_by_name(name)
            .map(|c| c.as_ref())
            .ok_or_else(|| anyhow!("{}: column {name} is missing", self.path.display()))
    }

    fn wrong_type(&self, name: &str, col: &dyn Array, expected: &str) -> anyhow::Error {
        anyhow!(
            "{}: column {name} has type {}, expected {expected}",
            self.path.display(),
            col.data_type()
        )
    }

    /// A string column; null reads as "".
    pub fn string(&self, name: &str) -> Result<String> {
        let col = self.column(name)?;
        if col.is_null(self.index) {
            return Ok(String::new());
        }
        string_value(col, self.index).ok_or_else(|| self.wrong_type(name, col, "string"))
    }

    /// An integer column (any signed width or u8).
    pub fn int(&self, name: &str) -> Result<i64> {
        let col = self.column(name)?;
        if col.is_null(self.index) {
            bail!(
                "{}: column {name} is null in row {}",
                self.path.display(),
                self.index
            );
        }
        let any = col.as_any();
        let i = self.index;
        let v = if let Some(a) = any.downcast_ref::<Int64Array>() {
            a.value(i)
        } else if let Some(a) = any.downcast_ref::<Int32Array>() {
            a.value(i) as i64
        } else if let Some(a) = any.downcast_ref::<Int16Array>() {
            a.value(i) as i64
        } else if let Some(a) = any.downcast_ref::<Int8Array>() {
            a.value(i) as i64
        } else if let Some(a) = any.downcast_ref::<UInt8Array>() {
            a.value(i) as i64
        } else {
            return Err(self.wrong_type(name, col, "integer"));
        };
        Ok(v)
    }

    pub fn boolean(&self, name: &str) -> Result<bool> {
        let col = self.column(name)?;
        let a = col
            .as_any()
            .downcast_ref::<BooleanArray>()
            .ok_or_else(|| self.wrong_type(name, col, "bool"))?;
        Ok(a.value(self.index))
    }

    /// A list-of-strings column.
    pub fn strings(&self, name: &str) -> Result<Vec<String>> {
        let col = self.column(name)?;
        let any = col.as_any();
        let values = if let Some(a) = any.downcast_ref::<ListArray>() {
            a.value(self.index)
        } else if let Some(a) = any.downcast_ref::<LargeListArray>() {
            a.value(self.index)
        } else {
            return Err(self.wrong_type(name, col, "list of strings"));
        };
        (0..values.len())
            .map(|i| {
                string_value(values.as_ref(), i)
                    .ok_or_else(|| self.wrong_type(name, col, "list of strings"))
            })
            .collect()
    }
}

fn string_value(col: &dyn Array, i: usize) -> Option<String> {
    let any = col.as_any();
    if let Some(a) = any.downcast_ref::<StringArray>() {
        Some(a.value(i).to_string())
    } else {
        any.downcast_ref::<LargeStringArray>()
            .map(|a| a.value(i).to_string())
    }
}
