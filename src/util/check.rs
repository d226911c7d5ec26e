//! Settings are checked once, where they are parsed (a config file's field or a flag), for range
//! and finiteness; the error names the place (`configs/x.toml: optim.lr`, `--top-p`).

use anyhow::{anyhow, bail, Result};
use serde::de::DeserializeOwned;

/// `v` is a finite number above 0.
pub fn positive(place: &str, v: f64) -> Result<()> {
    if !(v.is_finite() && v > 0.0) {
        bail!("{place} must be a finite number above 0, got {v}");
    }
    Ok(())
}

/// `v` is a finite number, 0 or more.
pub fn non_negative(place: &str, v: f64) -> Result<()> {
    if !(v.is_finite() && v >= 0.0) {
        bail!("{place} must be a finite number, 0 or more, got {v}");
    }
    Ok(())
}

/// `v` lies in `[lo, hi]`, or `[lo, hi)` when `hi_open`.
pub fn within(place: &str, v: f64, lo: f64, hi: f64, hi_open: bool) -> Result<()> {
    let ok = v >= lo && if hi_open { v < hi } else { v <= hi };
    if !ok {
        let close = if hi_open { ')' } else { ']' };
        bail!("{place} must be in [{lo}, {hi}{close}, got {v}");
    }
    Ok(())
}

/// `v` is at least `min`.
pub fn at_least(place: &str, v: usize, min: usize) -> Result<()> {
    if v < min {
        bail!("{place} must be at least {min}, got {v}");
    }
    Ok(())
}

/// Parses TOML `text` from `origin`; an error names the line and the key
/// (`configs/x.toml: line 7, optim.lr: invalid type: string "fast", expected f64`).
pub fn parse_toml<T: DeserializeOwned>(text: &str, origin: &str) -> Result<T> {
    toml::from_str(text).map_err(|e| {
        let Some(span) = e.span() else {
            return anyhow!("{origin}: {}", e.message());
        };
        let line_no = text[..span.start].matches('\n').count() + 1;
        let line = text.lines().nth(line_no - 1).unwrap_or_default();
        let key = line.split('=').next().unwrap_or_default().trim();
        let table = text[..span.start]
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| l.starts_with('[') && l.ends_with(']'))
            .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim());
        let at = match (table, key.is_empty() || key.starts_with('[')) {
            (Some(t), false) => format!(", {t}.{key}"),
            (None, false) => format!(", {key}"),
            _ => String::new(),
        };
        anyhow!("{origin}: line {line_no}{at}: {}", e.message().trim())
    })
}

/// The first setting (as a dotted path) whose value differs between two JSON records of
/// settings (`saved`, e.g. a checkpoint's, and `now`), with both values labelled by `names`:
/// `lora.r (checkpoint: 8, now: 16)`.
pub fn first_difference(
    saved: &serde_json::Value,
    now: &serde_json::Value,
    names: (&str, &str),
) -> Option<String> {
    differing(saved, now, "", names)
}

fn differing(
    saved: &serde_json::Value,
    now: &serde_json::Value,
    path: &str,
    names: (&str, &str),
) -> Option<String> {
    use serde_json::Value;
    match (saved, now) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter().find_map(|k| {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                differing(
                    a.get(k).unwrap_or(&Value::Null),
                    b.get(k).unwrap_or(&Value::Null),
                    &p,
                    names,
                )
            })
        }
        _ if saved == now => None,
        _ => Some(format!("{path} ({}: {saved}, {}: {now})", names.0, names.1)),
    }
}

/// Clap parser of a finite number, 0 or more.
pub fn non_negative_flag(s: &str) -> Result<f64, String> {
    flag(s, non_negative)
}

/// Clap parser of a number in (0, 1].
pub fn fraction_flag(s: &str) -> Result<f64, String> {
    let v = flag(s, |place, v| within(place, v, 0.0, 1.0, false))?;
    if v == 0.0 {
        return Err("must be above 0, got 0".into());
    }
    Ok(v)
}

fn flag(s: &str, rule: impl Fn(&str, f64) -> Result<()>) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("\"{s}\" is not a number"))?;
    rule("the value", v).map_err(|e| e.to_string())?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Cfg {
        optim: Optim,
    }
    #[derive(Debug, serde::Deserialize)]
    struct Optim {
        lr: f64,
    }

    #[test]
    fn toml_errors_name_the_line_and_key() {
        let ok: Cfg = parse_toml("[optim]\nlr = 2.0\n", "x.toml").unwrap();
        assert_eq!(ok.optim.lr, 2.0);
        let e = parse_toml::<Cfg>("# run\n[optim]\nlr = \"fast\"\n", "x.toml").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("x.toml: line 3, optim.lr: invalid type"),
            "{msg}"
        );
        assert_eq!(msg.lines().count(), 1);
    }

    #[test]
    fn numbers_are_checked_for_range_and_finiteness() {
        assert!(positive("lr", f64::INFINITY).is_err());
        assert!(positive("lr", f64::NAN).is_err());
        assert!(non_negative("clip", -1.0).is_err());
        assert!(within("p", 1.0, 0.0, 1.0, true).is_err());
        assert!(within("p", f64::NAN, 0.0, 1.0, false).is_err());
        assert!(fraction_flag("0").is_err() && fraction_flag("nan").is_err());
        assert_eq!(non_negative_flag("0.5"), Ok(0.5));
    }
}
