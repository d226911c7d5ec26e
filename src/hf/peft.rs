//! PEFT LoRA adapter directories: `adapter_config.json` plus `adapter_model.safetensors` with
//! keys `base_model.model.{module}.lora_A.weight` (`[r, in]`) and `.lora_B.weight` (`[out, r]`)
//! (see [`key`]). The adapted projection computes `x W^T + scaling * (x A^T) B^T`, scaling =
//! alpha / r (alpha / sqrt(r) with rsLoRA).

use super::weights::WeightReader;
use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use std::path::Path;

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// The two matrices of a LoRA adapter, as PEFT names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// `lora_A.weight`, `[r, in_features]`.
    A,
    /// `lora_B.weight`, `[out_features, r]`.
    B,
}

/// PEFT's tensor name for `part` of the adapter on `module` (a Hugging Face module name such as
/// `model.layers.0.self_attn.q_proj`): `base_model.model.{module}.lora_A.weight`.
pub fn key(module: &str, part: Part) -> String {
    let part = match part {
        Part::A => "lora_A",
        Part::B => "lora_B",
    };
    format!("base_model.model.{module}.{part}.weight")
}

/// An adapter_config.json read as PEFT reads it into a `LoraConfig`: every field is honoured
/// with PEFT's meaning or refused naming it (see [`LoraConfig::parse`]), so that the model built
/// here is the one PEFT builds.
#[derive(Debug, Clone)]
pub struct LoraConfig {
    /// The rank of modules no `rank_pattern` key matches.
    pub r: usize,
    /// The alpha of modules no `alpha_pattern` key matches.
    pub lora_alpha: f64,
    pub use_rslora: bool,
    targets: Modules,
    exclude: Option<Modules>,
    /// `layers_to_transform`: the layer indices adapted (all when `None`).
    layers: Option<Vec<usize>>,
    /// `rank_pattern` and `alpha_pattern` in file order (PEFT takes the first key that matches).
    rank_pattern: Vec<Pattern<usize>>,
    alpha_pattern: Vec<Pattern<f64>>,
}

/// `target_modules` or `exclude_modules`: names (a module matches one when its name is that
/// name or ends with `.name`), or a regular expression the whole module name must match.
#[derive(Debug, Clone)]
enum Modules {
    Names(Vec<String>),
    Regex(regex::Regex),
}

impl Modules {
    fn matches(&self, module: &str) -> bool {
        match self {
            Modules::Names(names) => names
                .iter()
                .any(|n| module == n || module.ends_with(&format!(".{n}"))),
            Modules::Regex(re) => re.is_match(module),
        }
    }
}

/// A `rank_pattern` or `alpha_pattern` entry: PEFT's `get_pattern_key` takes the first key `k`
/// for which `(.*\.)?(k)$` matches the module name from its start.
#[derive(Debug, Clone)]
struct Pattern<T> {
    re: regex::Regex,
    value: T,
}

/// The projections PEFT adapts when `target_modules` is null, for the architectures laco-train
/// loads (Qwen2, Qwen3, Llama: PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
const DEFAULT_TARGETS: [&str; 2] = ["q_proj", "v_proj"];
/// Every linear layer but the output one: what PEFT's `"all-linear"` expands to on a decoder.
const ALL_LINEAR: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Fields that describe the adapter without changing the model it computes: PEFT's metadata,
/// training-only settings (dropout is off at inference), initialisations that only set the
/// starting A and B (the file's tensors replace them), and `fan_in_fan_out`, which PEFT resets
/// to false on `nn.Linear` layers (every projection here).
const NO_EFFECT: &[&str] = &[
    "peft_version",
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "auto_mapping",
    "lora_dropout",
    "fan_in_fan_out",
    "megatron_core",
    "qalora_group_size",
    "runtime_config",
    "ensure_weight_tying",
    "loftq_config",
    "eva_config",
];

/// Fields that change the model PEFT builds and that laco-train does not implement: accepted
/// only at their "off" value (null, false, empty), else refused naming the field.
const REFUSED: &[(&str, &str)] = &[
    ("use_dora", "DoRA's magnitude vectors"),
    ("lora_bias", "a bias on lora_B"),
    ("use_qalora", "QALoRA's pooled input"),
    ("use_bdlora", "block-diagonal LoRA"),
    ("modules_to_save", "fully trained copies of other modules"),
    ("layer_replication", "replicated layers"),
    (
        "target_parameters",
        "adapters on parameters rather than modules",
    ),
    ("trainable_token_indices", "trained embedding rows"),
    ("alora_invocation_tokens", "activated LoRA"),
    ("megatron_config", "Megatron parallel layers"),
    ("arrow_config", "Arrow routing between adapters"),
    ("kasa_config", "KaSA"),
    ("velora_config", "VeLoRA"),
    ("monteclora_config", "MonteCLoRA"),
    ("corda_config", "CorDA, which changes the base weights"),
    ("lora_ga_config", "LoRA-GA, which changes the base weights"),
];

/// Whether a JSON value is a field's "off" value.
fn is_off(v: &serde_json::Value) -> bool {
    use serde_json::Value;
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::String(s) => s.is_empty(),
        Value::Number(_) | Value::Bool(true) => false,
    }
}

impl LoraConfig {
    /// Reads the text of an adapter_config.json at `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let p = path.display();
        let doc: serde_json::Value = serde_json::from_str(text).map_err(|e| {
            anyhow!("{p}: not valid JSON ({e}); a PEFT adapter_config.json was expected")
        })?;
        let fields = doc
            .as_object()
            .ok_or_else(|| anyhow!("{p}: expected a JSON object (PEFT's LoraConfig)"))?;
        let field = |name: &str| fields.get(name).filter(|v| !v.is_null());
        let wrong = |name: &str, expected: &str| {
            let v = fields.get(name).map(|v| v.to_string()).unwrap_or_default();
            anyhow!("{p}: {name} is {v}, expected {expected}")
        };
        for (name, value) in fields {
            if is_off(value) || NO_EFFECT.contains(&name.as_str()) {
                continue;
            }
            if let Some((_, what)) = REFUSED.iter().find(|(n, _)| n == name) {
                bail!("{p}: {name} = {value} is not supported ({what}): laco-train would compute another model than PEFT");
            }
            const HONOURED: &[&str] = &[
                "peft_type",
                "r",
                "lora_alpha",
                "use_rslora",
                "target_modules",
                "exclude_modules",
                "layers_to_transform",
                "layers_pattern",
                "rank_pattern",
                "alpha_pattern",
                "bias",
                "init_lora_weights",
            ];
            if !HONOURED.contains(&name.as_str()) {
                bail!("{p}: {name} = {value} is not a LoraConfig field laco-train knows (PEFT 0.21); it may change the model, so the adapter is refused");
            }
        }
        if let Some(t) = field("peft_type") {
            if t.as_str() != Some("LORA") {
                bail!("{p}: peft_type is {t}, expected \"LORA\" (laco-train reads LoRA adapters only)");
            }
        }
        if let Some(b) = field("bias") {
            if b.as_str() != Some("none") {
                bail!("{p}: bias = {b} is not supported (trained biases); expected \"none\"");
            }
        }
        if let Some(init) = field("init_lora_weights") {
            // Initialisations that only set A and B are replaced by the file's tensors; those
            // that also change the base weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) need the
            // changed base, which PEFT recomputes on load.
            let plain = init.is_boolean() || matches!(init.as_str(), Some("gaussian" | "eva"));
            if !plain {
                bail!("{p}: init_lora_weights = {init} is not supported: that initialisation changes the base weights; convert the adapter to a plain LoRA first (PEFT's save_pretrained with path_initial_model_for_weight_conversion)");
            }
        }
        let count = |name: &str, default: usize| -> Result<usize> {
            match field(name) {
                None => Ok(default),
                Some(v) => v
                    .as_u64()
                    .filter(|&n| n >= 1)
                    .map(|n| n as usize)
                    .ok_or_else(|| wrong(name, "an integer of at least 1")),
            }
        };
        let number = |name: &str, default: f64| -> Result<f64> {
            match field(name) {
                None => Ok(default),
                Some(v) => v
                    .as_f64()
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| wrong(name, "a finite number")),
            }
        };
        // PEFT's defaults: r 8, lora_alpha 8.
        let r = count("r", 8)?;
        let lora_alpha = number("lora_alpha", 8.0)?;
        let use_rslora = match field("use_rslora") {
            None => false,
            Some(v) => v
                .as_bool()
                .ok_or_else(|| wrong("use_rslora", "true or false"))?,
        };
        let modules = |name: &str| -> Result<Option<Modules>> {
            let Some(v) = field(name) else {
                return Ok(None);
            };
            if let Some(re) = v.as_str() {
                if re == "all-linear" && name == "target_modules" {
                    return Ok(Some(Modules::Names(
                        ALL_LINEAR.iter().map(|s| s.to_string()).collect(),
                    )));
                }
                return regex::Regex::new(&format!("^(?:{re})$"))
                    .map(|re| Some(Modules::Regex(re)))
                    .map_err(|e| {
                        anyhow!(
                            "{p}: {name} {v} is not a regular expression laco-train can read ({e})"
                        )
                    });
            }
            let names = v
                .as_array()
                .and_then(|a| a.iter().map(|x| x.as_str().map(String::from)).collect())
                .ok_or_else(|| wrong(name, "a list of module names or a regular expression"))?;
            Ok(Some(Modules::Names(names)))
        };
        let targets = modules("target_modules")?.unwrap_or_else(|| {
            Modules::Names(DEFAULT_TARGETS.iter().map(|s| s.to_string()).collect())
        });
        let exclude = modules("exclude_modules")?;
        let layers = match field("layers_to_transform") {
            None => None,
            Some(v) => {
                let ints: Option<Vec<usize>> = match v {
                    serde_json::Value::Array(a) => {
                        a.iter().map(|x| x.as_u64().map(|n| n as usize)).collect()
                    }
                    _ => v.as_u64().map(|n| vec![n as usize]),
                };
                let ints = ints.ok_or_else(|| {
                    wrong("layers_to_transform", "a layer index or a list of them")
                })?;
                (!ints.is_empty()).then_some(ints)
            }
        };
        if layers.is_some() && matches!(targets, Modules::Regex(_)) {
            bail!("{p}: layers_to_transform needs target_modules as a list of names (PEFT refuses it with a regular expression)");
        }
        if let Some(v) = field("layers_pattern") {
            let patterns: Option<Vec<&str>> = match v {
                serde_json::Value::Array(a) => a.iter().map(|x| x.as_str()).collect(),
                _ => v.as_str().map(|s| vec![s]),
            };
            let patterns =
                patterns.ok_or_else(|| wrong("layers_pattern", "a name or a list of names"))?;
            if !patterns.is_empty() && !patterns.contains(&"layers") {
                bail!("{p}: layers_pattern {v} names no layer list of this decoder (its layers are model.layers.N)");
            }
        }
        Ok(Self {
            r,
            lora_alpha,
            use_rslora,
            targets,
            exclude,
            layers,
            rank_pattern: patterns(text, path, "rank_pattern", |v| {
                v.as_u64().filter(|&n| n >= 1).map(|n| n as usize)
            })?,
            alpha_pattern: patterns(text, path, "alpha_pattern", |v| {
                v.as_f64().filter(|x| x.is_finite())
            })?,
        })
    }

    /// The scaling of modules no pattern matches: alpha / r (alpha / sqrt(r) with rsLoRA).
    pub fn scaling(&self) -> f64 {
        scaling(self.lora_alpha, self.r, self.use_rslora)
    }

    /// Whether PEFT puts an adapter on `module` (`model.layers.3.mlp.up_proj`): it is a target,
    /// not excluded, and in `layers_to_transform`.
    pub fn adapts(&self, module: &str) -> bool {
        if self.exclude.as_ref().is_some_and(|e| e.matches(module)) {
            return false;
        }
        if !self.targets.matches(module) {
            return false;
        }
        // A module named in full is adapted whatever its layer, as PEFT does.
        let named = matches!(&self.targets, Modules::Names(n) if n.iter().any(|t| t == module));
        match &self.layers {
            Some(layers) if !named => layer_index(module).is_some_and(|i| layers.contains(&i)),
            _ => true,
        }
    }

    /// The rank and scaling of the adapter on `module`: r and lora_alpha, or the values of the
    /// first `rank_pattern` and `alpha_pattern` keys that match it.
    pub fn module(&self, module: &str) -> (usize, f64) {
        let r = first_match(&self.rank_pattern, module).unwrap_or(self.r);
        let alpha = first_match(&self.alpha_pattern, module).unwrap_or(self.lora_alpha);
        (r, scaling(alpha, r, self.use_rslora))
    }
}

/// The value of the first pattern matching `module`.
fn first_match<T: Copy>(patterns: &[Pattern<T>], module: &str) -> Option<T> {
    patterns
        .iter()
        .find(|p| p.re.is_match(module))
        .map(|p| p.value)
}

fn scaling(alpha: f64, r: usize, rslora: bool) -> f64 {
    if rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

/// The layer index in a module name (`model.layers.3.mlp.up_proj` -> 3) as PEFT finds it: the
/// first all-digit segment after two others and before another.
fn layer_index(module: &str) -> Option<usize> {
    let parts: Vec<&str> = module.split('.').collect();
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (2..parts.len().saturating_sub(1))
        .find(|&i| digits(parts[i]))
        .and_then(|i| parts[i].parse().ok())
}

/// The `field` map of the JSON document `text` (`rank_pattern`, `alpha_pattern`) in file order,
/// each key compiled as PEFT matches it and each value read by `value`.
fn patterns<T>(
    text: &str,
    path: &Path,
    field: &str,
    value: impl Fn(&serde_json::Value) -> Option<T>,
) -> Result<Vec<Pattern<T>>> {
    let p = path.display();
    let ordered: OrderedFields = serde_json::from_str(text).map_err(|e| anyhow!("{p}: {e}"))?;
    let Some(entries) = ordered
        .0
        .into_iter()
        .find(|(k, _)| k == field)
        .map(|(_, v)| v)
    else {
        return Ok(Vec::new());
    };
    let entries: OrderedMap = match entries {
        serde_json::Value::Null => return Ok(Vec::new()),
        v => serde_json::from_value(v)
            .map_err(|_| anyhow!("{p}: {field} must map module names to values"))?,
    };
    entries
        .0
        .into_iter()
        .map(|(key, v)| {
            let re = regex::Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")).map_err(|e| {
                anyhow!("{p}: {field} key \"{key}\" is not a regular expression laco-train can read ({e})")
            })?;
            let value = value(&v)
                .ok_or_else(|| anyhow!("{p}: {field}[\"{key}\"] is {v}, expected a positive number"))?;
            Ok(Pattern { re, value })
        })
        .collect()
}

/// A JSON object's entries in document order (serde_json's own map sorts them).
struct OrderedMap(Vec<(String, serde_json::Value)>);
/// The top-level object's entries in document order, values kept as JSON.
struct OrderedFields(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for OrderedMap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_map(EntriesVisitor).map(OrderedMap)
    }
}

impl<'de> Deserialize<'de> for OrderedFields {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_map(EntriesVisitor).map(OrderedFields)
    }
}

struct EntriesVisitor;

impl<'de> serde::de::Visitor<'de> for EntriesVisitor {
    type Value = Vec<(String, serde_json::Value)>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(entry) = map.next_entry()? {
            out.push(entry);
        }
        Ok(out)
    }
}

/// An adapter directory opened for reading: its checked config and its tensors (see [`key`]).
pub struct AdapterFiles {
    pub config: LoraConfig,
    pub weights: WeightReader,
}

impl AdapterFiles {
    pub fn open(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join(ADAPTER_CONFIG);
        let text = std::fs::read_to_string(&cfg_path)
            .with_context(|| format!("{}: cannot read", cfg_path.display()))?;
        let config = LoraConfig::parse(&text, &cfg_path)?;
        let weights = WeightReader::open_file(&dir.join(ADAPTER_WEIGHTS))?;
        Ok(Self { config, weights })
    }
}

/// Writes `dir/adapter_config.json` for a LoRA adapter trained on `base_model` (the adapter's
/// tensors go to `dir/adapter_model.safetensors`, see [`key`]).
pub fn write_config(
    dir: &Path,
    base_model: &Path,
    r: usize,
    alpha: f64,
    dropout: f64,
    target_modules: &[String],
) -> Result<()> {
    let config = serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model.display().to_string(),
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": target_modules,
        "bias": "none", "fan_in_fan_out": false, "inference_mode": true, "init_lora_weights": true,
        "use_rslora": false, "use_dora": false, "modules_to_save": null, "layers_to_transform": null,
    });
    let path = dir.join(ADAPTER_CONFIG);
    std::fs::write(&path, serde_json::to_string_pretty(&config)? + "\n")
        .with_context(|| format!("{}: cannot write", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_peft_names() {
        assert_eq!(
            key("model.layers.3.mlp.down_proj", Part::B),
            "base_model.model.model.layers.3.mlp.down_proj.lora_B.weight"
        );
    }
}
