//! Rewinding TensorBoard event files for a resumed run: records logged after the checkpoint's
//! step are dropped, so the resumed run's curves continue without duplicated steps. Event files
//! are TFRecord streams (`u64 length, u32 crc, Event proto, u32 crc`); records are copied
//! unchanged, so their checksums stay valid.

use anyhow::{Context, Result};
use std::path::Path;

/// Drops every record with a step above `max_step` from the event files in `dir`.
pub fn truncate_after(dir: &Path, max_step: usize) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for path in entries.filter_map(|e| e.ok().map(|e| e.path())) {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !name.starts_with("events.out.tfevents.") {
            continue;
        }
        let bytes =
            std::fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?;
        let kept = keep_records(&bytes, max_step as i64);
        if kept.len() == bytes.len() {
            continue;
        }
        let tmp = path.with_extension("rewind");
        std::fs::write(&tmp, &kept)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .with_context(|| format!("{}: cannot rewrite", path.display()))?;
    }
    Ok(())
}

/// The records of a TFRecord stream whose Event step is at most `max_step`; a torn record at
/// the end (a killed writer) is dropped.
fn keep_records(bytes: &[u8], max_step: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at + 12 <= bytes.len() {
        let len = u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes")) as usize;
        let end = at + 12 + len + 4;
        if end > bytes.len() {
            break;
        }
        if event_step(&bytes[at + 12..at + 12 + len]) <= max_step {
            out.extend_from_slice(&bytes[at..end]);
        }
        at = end;
    }
    out
}

/// Field 2 (`int64 step`) of an Event message; 0 when absent.
fn event_step(msg: &[u8]) -> i64 {
    let mut at = 0;
    while at < msg.len() {
        let Some(key) = varint(msg, &mut at) else {
            return 0;
        };
        let skip = match key & 7 {
            0 => {
                let Some(v) = varint(msg, &mut at) else {
                    return 0;
                };
                if key >> 3 == 2 {
                    return v as i64;
                }
                0
            }
            1 => 8,
            2 => match varint(msg, &mut at) {
                Some(n) => n as usize,
                None => return 0,
            },
            5 => 4,
            _ => return 0,
        };
        at += skip;
    }
    0
}

fn varint(msg: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *msg.get(*at)?;
        *at += 1;
        v |= ((b & 0x7f) as u64) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}
