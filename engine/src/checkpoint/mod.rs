//! Checkpoint directories in Hugging Face GPT-2 layout, plus pipit's own training state.
//!
//! A checkpoint directory holds:
//! - `model.safetensors`: the weights under Hugging Face's names (`transformer.wte.weight`, ...,
//!   Conv1D weights stored `[in, out]`), loadable by `GPT2LMHeadModel.from_pretrained(dir)`;
//! - `config.json`: Hugging Face's GPT-2 config;
//! - `optimizer.safetensors` (pipit's): AdamW moments, `{name}.exp_avg` and `{name}.exp_avg_sq`;
//! - `trainer_state.json` (pipit's): step, seed, data position and the run's settings;
//! - `vocab.json` and `merges.txt`, GPT-2's tokenizer, when the model was trained with it.
//!
//! Saving is atomic at the directory level: everything is written into a temporary sibling
//! directory, which then replaces the old one by rename, so a crash mid-save leaves the previous
//! checkpoint intact.

pub mod safetensors;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::invalid_input;
use crate::model::{GptConfig, HostTensors, OptimizerState};

/// Everything a checkpoint directory holds, with tensor names as pipit uses them internally
/// (Hugging Face's without the `transformer.` prefix, and `wte`/`wpe` without `.weight`).
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// Model sizes.
    pub config: GptConfig,
    /// The weights.
    pub params: HostTensors,
    /// AdamW moments (absent in Hugging Face checkpoints).
    pub optimizer: Option<OptimizerState>,
    /// Training state (step, seed, data position, settings); absent in Hugging Face checkpoints.
    pub trainer_state: Option<Value>,
}

const PREFIX: &str = "transformer.";

/// Write `ckpt` to `dir`, replacing any checkpoint there only once the new one is complete.
pub fn save(dir: &Path, ckpt: &Checkpoint) -> Result<()> {
    save_with(dir, ckpt, &[])
}

/// [`save`], with `files` (name, contents) written beside the model: the tokenizer's, for a
/// model that speaks GPT-2's BPE (see [`crate::tokenizer::Tokenizer::files`]).
pub fn save_with(dir: &Path, ckpt: &Checkpoint, files: &[(&str, &[u8])]) -> Result<()> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = sibling(dir, "tmp");
    if tmp.exists() {
        fs::remove_dir_all(&tmp).with_context(|| format!("removing stale {}", tmp.display()))?;
    }
    fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    write_contents(&tmp, ckpt)
        .and_then(|()| {
            files
                .iter()
                .try_for_each(|(name, bytes)| write_synced(&tmp.join(name), bytes))
        })
        .with_context(|| format!("writing checkpoint to {}", tmp.display()))?;

    // Swap: the old directory is moved aside first, so at every instant one complete
    // checkpoint exists under `dir` or under its `.old` sibling.
    let old = sibling(dir, "old");
    if dir.exists() {
        if old.exists() {
            fs::remove_dir_all(&old)?;
        }
        fs::rename(dir, &old).with_context(|| format!("moving {} aside", dir.display()))?;
    }
    fs::rename(&tmp, dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    if old.exists() {
        fs::remove_dir_all(&old)?;
    }
    Ok(())
}

fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.with_file_name(format!(".{name}.{suffix}"))
}

fn write_contents(dir: &Path, ckpt: &Checkpoint) -> Result<()> {
    let format = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let mut prefixed = HostTensors::new();
    for (name, t) in ckpt.params.iter() {
        prefixed.insert(hf_name(name), t.shape.clone(), t.data.clone())?;
    }
    write_synced(
        &dir.join("model.safetensors"),
        &safetensors::to_bytes(&prefixed, &format),
    )?;
    let config = serde_json::to_vec_pretty(&hf_config(&ckpt.config))?;
    write_synced(&dir.join("config.json"), &config)?;
    if let Some(opt) = &ckpt.optimizer {
        let mut moments = HostTensors::new();
        for (suffix, tensors) in [("exp_avg", &opt.m), ("exp_avg_sq", &opt.v)] {
            for (name, t) in tensors.iter() {
                moments.insert(format!("{name}.{suffix}"), t.shape.clone(), t.data.clone())?;
            }
        }
        write_synced(
            &dir.join("optimizer.safetensors"),
            &safetensors::to_bytes(&moments, &format),
        )?;
    }
    if let Some(state) = &ckpt.trainer_state {
        write_synced(
            &dir.join("trainer_state.json"),
            &serde_json::to_vec_pretty(state)?,
        )?;
    }
    Ok(())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

/// Hugging Face's `config.json` for a GPT-2 of these sizes.
pub fn hf_config(c: &GptConfig) -> Value {
    json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.n_positions,
        "n_ctx": c.n_positions,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": null,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": true,
        "tie_word_embeddings": true,
        "bos_token_id": c.vocab_size - 1,
        "eos_token_id": c.vocab_size - 1,
    })
}

/// The model sizes in a Hugging Face GPT-2 `config.json`; variants pipit does not implement
/// (another activation, an unusual MLP width, untied embeddings) are rejected by name.
pub fn parse_hf_config(v: &Value) -> Result<GptConfig> {
    let field = |name: &str| -> Result<usize> {
        v.get(name)
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .ok_or_else(|| invalid_input!("config.json: `{name}` must be a positive integer"))
    };
    let config = GptConfig {
        vocab_size: field("vocab_size")?,
        n_positions: field("n_positions")?,
        n_embd: field("n_embd")?,
        n_layer: field("n_layer")?,
        n_head: field("n_head")?,
    };
    if let Some(model_type) = v.get("model_type").and_then(Value::as_str) {
        if model_type != "gpt2" {
            return Err(invalid_input!(
                "config.json: model_type must be gpt2, got {model_type}"
            ));
        }
    }
    if let Some(act) = v.get("activation_function").and_then(Value::as_str) {
        if act != "gelu_new" && act != "gelu_pytorch_tanh" {
            return Err(invalid_input!(
                "config.json: activation_function must be gelu_new (GPT-2's tanh GELU), got {act}"
            ));
        }
    }
    if let Some(inner) = v.get("n_inner").and_then(Value::as_u64) {
        if inner as usize != 4 * config.n_embd {
            return Err(invalid_input!(
                "config.json: n_inner must be 4·n_embd = {}, got {inner}",
                4 * config.n_embd
            ));
        }
    }
    if v.get("tie_word_embeddings").and_then(Value::as_bool) == Some(false) {
        return Err(invalid_input!(
            "config.json: tie_word_embeddings must be true (GPT-2 ties the LM head to wte)"
        ));
    }
    config.validate()?;
    Ok(config)
}

/// Read a checkpoint directory: pipit's own, or a Hugging Face GPT-2 one. Every tensor the
/// model needs must be present with the shape the config implies.
pub fn load(dir: &Path) -> Result<Checkpoint> {
    load_some(dir, &|_| true)
}

/// Read the config and training state of a checkpoint directory, without its tensors
/// (`params` is empty, `optimizer` is `None`).
pub fn load_header(dir: &Path) -> Result<Checkpoint> {
    let mut c = load_some(dir, &|_| false)?;
    c.optimizer = None;
    Ok(c)
}

/// [`load`], keeping only the tensors (and their optimizer moments) whose pipit names `keep`
/// accepts, and reading only their bytes: a pipeline rank's share of a checkpoint. Each kept
/// tensor the model needs must be present with its shape.
pub fn load_some(dir: &Path, keep: &dyn Fn(&str) -> bool) -> Result<Checkpoint> {
    if !dir.is_dir() {
        return Err(invalid_input!(
            "checkpoint directory {} does not exist",
            dir.display()
        ));
    }
    let config_path = dir.join("config.json");
    let config_text = fs::read(&config_path)
        .map_err(|e| invalid_input!("cannot read {}: {e}", config_path.display()))?;
    let config_json: Value = serde_json::from_slice(&config_text)
        .map_err(|e| invalid_input!("{} is not JSON: {e}", config_path.display()))?;
    let config = parse_hf_config(&config_json)?;

    let model_path = dir.join("model.safetensors");
    let wanted = |hf: &str| internal_name(hf).is_some_and(|n| keep(&n));
    let raw = safetensors::read_some(&model_path, &wanted)?;
    let params = hf_names_to_internal(raw)?;
    check_shapes_of(&config, &params, keep).with_context(|| model_path.display().to_string())?;

    let opt_path = dir.join("optimizer.safetensors");
    let optimizer = if opt_path.exists() {
        let base = |name: &str| {
            let base = name
                .strip_suffix(".exp_avg_sq")
                .or_else(|| name.strip_suffix(".exp_avg"));
            // Anything else is read, so that split_moments can name it as unexpected.
            base.is_none_or(keep)
        };
        let moments = safetensors::read_some(&opt_path, &base)?;
        Some(split_moments(moments).with_context(|| opt_path.display().to_string())?)
    } else {
        None
    };
    let state_path = dir.join("trainer_state.json");
    let trainer_state = if state_path.exists() {
        let text = fs::read(&state_path)?;
        Some(
            serde_json::from_slice(&text)
                .map_err(|e| invalid_input!("{} is not JSON: {e}", state_path.display()))?,
        )
    } else {
        None
    };
    Ok(Checkpoint {
        config,
        params,
        optimizer,
        trainer_state,
    })
}

/// Sort `{name}.exp_avg` / `{name}.exp_avg_sq` tensors into first and second moments.
fn split_moments(moments: HostTensors) -> Result<OptimizerState> {
    let mut state = OptimizerState::default();
    for (name, t) in moments.iter() {
        let (target, base) = if let Some(base) = name.strip_suffix(".exp_avg_sq") {
            (&mut state.v, base)
        } else if let Some(base) = name.strip_suffix(".exp_avg") {
            (&mut state.m, base)
        } else {
            return Err(invalid_input!(
                "optimizer state has unexpected tensor `{name}`"
            ));
        };
        target.insert(base, t.shape.clone(), t.data.clone())?;
    }
    Ok(state)
}

/// The Hugging Face name of an internal tensor name (`wte` -> `transformer.wte.weight`).
fn hf_name(name: &str) -> String {
    match name {
        "wte" | "wpe" => format!("{PREFIX}{name}.weight"),
        _ => format!("{PREFIX}{name}"),
    }
}

/// The pipit name of a Hugging Face tensor name: the `transformer.` prefix stripped, `wte`
/// and `wpe` without `.weight`; `None` for what GPT-2 checkpoints carry besides weights (the
/// causal-mask buffers `attn.bias`, `attn.masked_bias` and the tied `lm_head.weight`).
fn internal_name(hf: &str) -> Option<String> {
    let name = hf.strip_prefix(PREFIX).unwrap_or(hf);
    let name = match name {
        "wte.weight" | "wpe.weight" => name.trim_end_matches(".weight"),
        _ => name,
    };
    let skip = name == "lm_head.weight"
        || name.ends_with(".attn.bias")
        || name.ends_with(".attn.masked_bias");
    (!skip).then(|| name.to_string())
}

/// Rename Hugging Face tensors to pipit's names, dropping the non-weights ([`internal_name`]).
fn hf_names_to_internal(raw: HostTensors) -> Result<HostTensors> {
    let mut out = HostTensors::new();
    for (name, t) in raw.iter() {
        if let Some(name) = internal_name(name) {
            out.insert(name, t.shape.clone(), t.data.clone())?;
        }
    }
    Ok(out)
}

/// Every parameter of `config` present with its expected shape; extra tensors are an error.
pub fn check_shapes(config: &GptConfig, params: &HostTensors) -> Result<()> {
    check_shapes_of(config, params, &|_| true)
}

/// [`check_shapes`] for the tensors `keep` accepts: each of those the model needs is present
/// with its shape (and `params` holds nothing else).
fn check_shapes_of(
    config: &GptConfig,
    params: &HostTensors,
    keep: &dyn Fn(&str) -> bool,
) -> Result<()> {
    let expected = config.all_params();
    for (name, shape) in expected.iter().filter(|(n, _)| keep(n)) {
        match params.get(name) {
            None => return Err(invalid_input!("checkpoint lacks tensor `{name}`")),
            Some(t) if &t.shape != shape => {
                return Err(invalid_input!(
                    "tensor `{name}` has shape {:?}, the model (n_layer={}, n_embd={}, vocab_size={}, n_positions={}) needs {shape:?}",
                    t.shape,
                    config.n_layer,
                    config.n_embd,
                    config.vocab_size,
                    config.n_positions
                ))
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = params
        .names()
        .find(|k| !expected.iter().any(|(n, _)| n == k))
    {
        return Err(invalid_input!(
            "checkpoint has tensor `{extra}`, which this model does not"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::init_parameters;

    fn tiny() -> GptConfig {
        GptConfig {
            vocab_size: 11,
            n_positions: 6,
            n_embd: 8,
            n_layer: 2,
            n_head: 2,
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pipit-ckpt-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_rank_loads_only_its_share() {
        let dir = scratch("share").join("ckpt");
        let params = init_parameters(&tiny(), 5).unwrap();
        let moments = |scale: f32| {
            let mut t = HostTensors::new();
            for (name, x) in params.iter() {
                let data = x.data.iter().map(|v| v * scale).collect();
                t.insert(name, x.shape.clone(), data).unwrap();
            }
            t
        };
        let ckpt = Checkpoint {
            config: tiny(),
            params: params.clone(),
            optimizer: Some(OptimizerState {
                m: moments(2.0),
                v: moments(3.0),
            }),
            trainer_state: Some(json!({"step": 9})),
        };
        save(&dir, &ckpt).unwrap();
        let own =
            |name: &str| name.starts_with("h.1.") || name.starts_with("ln_f") || name == "wte";
        let part = load_some(&dir, &own).unwrap();
        let names: Vec<_> = part.params.names().map(str::to_string).collect();
        assert!(
            !names.is_empty() && names.iter().all(|n| own(n)),
            "{names:?}"
        );
        assert_eq!(names.len(), params.names().filter(|n| own(n)).count());
        for name in &names {
            assert_eq!(part.params.get(name), params.get(name), "{name}");
        }
        let opt = part.optimizer.unwrap();
        assert_eq!(opt.m.names().count(), names.len());
        assert_eq!(
            opt.v.get("wte").unwrap().data[0],
            params.get("wte").unwrap().data[0] * 3.0
        );
        assert_eq!(part.trainer_state.unwrap()["step"], 9);

        let header = load_header(&dir).unwrap();
        assert_eq!(header.config, tiny());
        assert_eq!(header.params.names().count(), 0);
        assert!(header.optimizer.is_none());
    }

    #[test]
    fn save_then_load_round_trips_and_replaces_atomically() {
        let dir = scratch("round").join("ckpt");
        let params = init_parameters(&tiny(), 3).unwrap();
        let ckpt = Checkpoint {
            config: tiny(),
            params: params.clone(),
            optimizer: Some(OptimizerState {
                m: params.clone(),
                v: params.clone(),
            }),
            trainer_state: Some(json!({"step": 7})),
        };
        save(&dir, &ckpt).unwrap();
        save(&dir, &ckpt).unwrap();
        let back = load(&dir).unwrap();
        assert_eq!(back.params, params);
        assert_eq!(back.optimizer.unwrap().v, params);
        assert_eq!(back.trainer_state.unwrap()["step"], 7);
        let siblings: Vec<String> = fs::read_dir(dir.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            siblings,
            vec!["ckpt".to_string()],
            "no temporary directory left behind"
        );
        let (raw, meta) =
            safetensors::from_bytes(&fs::read(dir.join("model.safetensors")).unwrap()).unwrap();
        assert_eq!(
            meta["format"], "pt",
            "transformers refuses safetensors without format=pt"
        );
        assert!(
            raw.get("transformer.wte.weight").is_some()
                && raw.get("transformer.h.1.mlp.c_fc.weight").is_some()
        );
    }

    #[test]
    fn loads_hugging_face_hub_layout() {
        // The Hub's gpt2 files: no `transformer.` prefix, causal-mask buffers, and sometimes an
        // explicit copy of the tied head.
        let dir = scratch("hub");
        let params = init_parameters(&tiny(), 5).unwrap();
        let mut hub = HostTensors::new();
        for (name, t) in params.iter() {
            let name = if name == "wte" || name == "wpe" {
                format!("{name}.weight")
            } else {
                name.to_string()
            };
            hub.insert(name, t.shape.clone(), t.data.clone()).unwrap();
        }
        hub.insert("h.0.attn.bias", vec![1, 1, 6, 6], vec![1.0; 36])
            .unwrap();
        let wte = params.get("wte").unwrap();
        hub.insert("lm_head.weight", wte.shape.clone(), wte.data.clone())
            .unwrap();
        fs::write(
            dir.join("model.safetensors"),
            safetensors::to_bytes(&hub, &BTreeMap::new()),
        )
        .unwrap();
        let mut config = hf_config(&tiny());
        config["n_inner"] = Value::Null;
        fs::write(dir.join("config.json"), config.to_string()).unwrap();
        let back = load(&dir).unwrap();
        assert_eq!(back.params, params);
        assert!(back.optimizer.is_none() && back.trainer_state.is_none());
    }

    #[test]
    fn wrong_sizes_and_variants_are_invalid_input() {
        let dir = scratch("sizes").join("ckpt");
        let ckpt = Checkpoint {
            config: tiny(),
            params: init_parameters(&tiny(), 1).unwrap(),
            optimizer: None,
            trainer_state: None,
        };
        save(&dir, &ckpt).unwrap();
        let mut bigger = hf_config(&tiny());
        bigger["n_embd"] = json!(16);
        fs::write(dir.join("config.json"), bigger.to_string()).unwrap();
        let err = load(&dir).unwrap_err();
        assert!(
            crate::is_invalid_input(&err) && format!("{err:#}").contains("shape"),
            "{err:#}"
        );
        let mut relu = hf_config(&tiny());
        relu["activation_function"] = json!("relu");
        assert!(crate::is_invalid_input(
            &parse_hf_config(&relu).unwrap_err()
        ));
    }
}
