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

/// Parses TOML `text` from `origin`; an error names the line and the key, found from where the
/// value lies in the document, also inside multi-line arrays and inline tables
/// (`configs/x.toml: line 7, optim.lr: invalid type: string "fast", expected f64`).
pub fn parse_toml<T: DeserializeOwned>(text: &str, origin: &str) -> Result<T> {
    toml::from_str(text).map_err(|e| {
        let Some(span) = e.span() else {
            return anyhow!("{origin}: {}", e.message().trim());
        };
        let line_no = text[..span.start].matches('\n').count() + 1;
        let at = key_at(text, span.start).map_or(String::new(), |k| format!(", {k}"));
        anyhow!("{origin}: line {line_no}{at}: {}", e.message().trim())
    })
}

/// The dotted key (`optim.lr`, `data.weights[1]`) of the key or value at byte `at` of the TOML
/// document `text`; `None` when it does not parse or `at` is outside every key and value.
fn key_at(text: &str, at: usize) -> Option<String> {
    let doc = toml::de::DeTable::parse(text).ok()?;
    find_key(doc.get_ref(), at, "")
}

fn find_key(table: &toml::de::DeTable, at: usize, path: &str) -> Option<String> {
    use toml::de::DeValue;
    for (key, value) in table {
        let p = match path {
            "" => key.get_ref().to_string(),
            _ => format!("{path}.{}", key.get_ref()),
        };
        if key.span().contains(&at) {
            return Some(p);
        }
        let inner = match value.get_ref() {
            DeValue::Table(t) => find_key(t, at, &p),
            DeValue::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
                let p = format!("{p}[{i}]");
                match item.get_ref() {
                    DeValue::Table(t) => find_key(t, at, &p),
                    _ => item.span().contains(&at).then_some(p),
                }
            }),
            _ => None,
        };
        if inner.is_some() {
            return inner;
        }
        if value.span().contains(&at) {
            return Some(p);
        }
    }
    None
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
        // The key of a value on a line of its own, and inside an inline table.
        #[derive(Debug, serde::Deserialize)]
        struct Data {
            data: DataTable,
        }
        #[derive(Debug, serde::Deserialize)]
        struct DataTable {
            weights: Vec<f64>,
            mix: Option<Optim>,
        }
        let ok: Data =
            parse_toml("[data]\nweights = [1.0]\nmix = { lr = 3.0 }\n", "y.toml").unwrap();
        assert_eq!((ok.data.weights, ok.data.mix.unwrap().lr), (vec![1.0], 3.0));
        let e = parse_toml::<Data>("[data]\nweights = [\n  0.5,\n  \"x\",\n]\n", "y.toml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("y.toml: line 4, data.weights[1]: "), "{e}");
        let e = parse_toml::<Data>("[data]\nweights = []\nmix = { lr = true }\n", "y.toml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("y.toml: line 3, data.mix.lr: "), "{e}");
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
