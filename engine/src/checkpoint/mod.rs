//! Checkpoint directories in Hugging Face layout (`GPT2LMHeadModel`, `LlamaForCausalLM`), plus
//! pipit's own training state.
//!
//! A checkpoint directory holds:
//! - `model.safetensors`: the weights under Hugging Face's names (`transformer.wte.weight`, ...,
//!   Conv1D weights stored `[in, out]`), loadable by `GPT2LMHeadModel.from_pretrained(dir)`;
//! - `config.json`: Hugging Face's GPT-2 config;
//! - `optimizer.safetensors` (pipit's): AdamW moments, `{name}.exp_avg` and `{name}.exp_avg_sq`;
//! - `trainer_state.json` (pipit's): step, seed, data position and the run's settings;
//! - `vocab.json` and `merges.txt`, GPT-2's tokenizer, when the model was trained with it;
//! - `pipit-checksums.json` (pipit's): a checksum of every other file, each checked as a load
//!   opens it (a rank checks its own shards only), so a file that changed after pipit wrote it
//!   (a flipped byte, a truncated copy) is refused by name. Directories made elsewhere have
//!   none and load as they are.
//!
//! Saving is atomic at the directory level: everything is written into a temporary sibling
//! directory, which then replaces the old one by rename, so a crash mid-save leaves the previous
//! checkpoint intact.

pub mod safetensors;

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::invalid_input;
use crate::model::{Family, HostTensors, ModelConfig, OptimizerState};

/// Everything a checkpoint directory holds, with tensor names as pipit uses them internally
/// (Hugging Face's without the `transformer.` prefix, and `wte`/`wpe` without `.weight`).
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// Model sizes.
    pub config: ModelConfig,
    /// The weights.
    pub params: HostTensors,
    /// AdamW moments (absent in Hugging Face checkpoints).
    pub optimizer: Option<OptimizerState>,
    /// Training state (step, seed, data position, settings); absent in Hugging Face checkpoints.
    pub trainer_state: Option<Value>,
}

impl Checkpoint {
    /// The first weight, in name order, holding a NaN or an infinity: its Hugging Face name,
    /// the element's index and its value.
    pub fn first_non_finite(&self) -> Option<(String, usize, f32)> {
        self.params.iter().find_map(|(name, t)| {
            let at = t.data.iter().position(|x| !x.is_finite())?;
            Some((self.config.family.hf_name(name), at, t.data[at]))
        })
    }

    /// The error for a `what` (the loss, the logits) that came out `value`: it names the
    /// first weight that is not finite, or says that every weight is.
    pub fn non_finite(&self, what: &str, value: f64) -> anyhow::Error {
        match self.first_non_finite() {
            Some((name, at, x)) => invalid_input!(
                "{what} came out {value}: the checkpoint's tensor {name} holds {x} (element {at})"
            ),
            None => anyhow::anyhow!(
                "{what} came out {value} with every weight finite (the model's arithmetic overflowed)"
            ),
        }
    }
}

/// Write `ckpt` to `dir`, replacing any checkpoint there only once the new one is complete.
pub fn save(dir: &Path, ckpt: &Checkpoint) -> Result<()> {
    save_with(dir, ckpt, &[])
}

/// [`save`], with `files` (name, contents) written beside the model: the tokenizer's, for a
/// model that speaks GPT-2's BPE (see [`crate::tokenizer::Tokenizer::files`]).
pub fn save_with(dir: &Path, ckpt: &Checkpoint, files: &[(&str, &[u8])]) -> Result<()> {
    save_sharded(dir, ckpt, files, MAX_SHARD_BYTES)
}

/// Weights beyond this many bytes are saved in shards of at most this size (one tensor larger
/// than it gets a shard of its own), with the index transformers writes.
pub const MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// [`save_with`], cutting the weights into shards of at most `max_shard_bytes`.
pub fn save_sharded(
    dir: &Path,
    ckpt: &Checkpoint,
    files: &[(&str, &[u8])],
    max_shard_bytes: u64,
) -> Result<()> {
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
    write_contents(&tmp, ckpt, max_shard_bytes)
        .and_then(|()| {
            files
                .iter()
                .try_for_each(|(name, bytes)| write_synced(&tmp.join(name), bytes))
        })
        .and_then(|()| write_manifest(&tmp))
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

fn write_contents(dir: &Path, ckpt: &Checkpoint, max_shard_bytes: u64) -> Result<()> {
    let format = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let mut prefixed = HostTensors::new();
    for (name, t) in ckpt.params.iter() {
        prefixed.insert(
            ckpt.config.family.hf_name(name),
            t.shape.clone(),
            t.data.clone(),
        )?;
    }
    write_weights(dir, prefixed, &format, max_shard_bytes)?;
    let config = serde_json::to_vec_pretty(&ckpt.config.hf_config())?;
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

/// The file in which pipit records a checksum of each file it saved.
pub const MANIFEST: &str = "pipit-checksums.json";

static VERIFY: AtomicBool = AtomicBool::new(true);

/// Whether loading checks each file against [`MANIFEST`] (yes unless `--no-verify` says so),
/// for this process.
pub fn verify_checksums(on: bool) {
    VERIFY.store(on, Ordering::Relaxed);
}

/// FNV-1a (64 bits) of the file at `path`, read in pieces, as 16 hex digits.
fn file_checksum(path: &Path) -> Result<String> {
    let mut file = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut sum = crate::dist::frame::Fnv64::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            return Ok(format!("{:016x}", sum.finish()));
        }
        sum.update(&buf[..n]);
    }
}

/// Record a checksum of every file in `dir` in its [`MANIFEST`].
fn write_manifest(dir: &Path) -> Result<()> {
    let mut files = BTreeMap::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type()?.is_file() && name != MANIFEST {
            files.insert(name, file_checksum(&entry.path())?);
        }
    }
    let manifest = serde_json::json!({ "algorithm": "fnv1a-64", "files": files });
    write_synced(&dir.join(MANIFEST), &serde_json::to_vec_pretty(&manifest)?)
}

/// The checksums a checkpoint directory's [`MANIFEST`] records, each checked as a load opens
/// its file: a rank checks the files it reads (its shards, not every shard), and a file the
/// manifest does not list (one added by hand) is read unchecked.
struct Checksums {
    dir: PathBuf,
    files: serde_json::Map<String, Value>,
}

impl Checksums {
    /// The manifest of `dir`: none without one, or when `verify` is off.
    fn of(dir: &Path, verify: bool) -> Result<Self> {
        let path = dir.join(MANIFEST);
        let mut files = serde_json::Map::new();
        if verify && path.exists() {
            let text = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let manifest: Value = serde_json::from_slice(&text)
                .map_err(|e| invalid_input!("{} is not JSON: {e}", path.display()))?;
            files = manifest
                .get("files")
                .and_then(Value::as_object)
                .cloned()
                .ok_or_else(|| invalid_input!("{} lists no files", path.display()))?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
        })
    }

    /// Errors unless the file `path` (in the directory) has the checksum recorded for it.
    fn check(&self, path: &Path) -> Result<()> {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let Some(want) = name.as_deref().and_then(|n| self.files.get(n)) else {
            return Ok(());
        };
        if want.as_str() != Some(file_checksum(path)?.as_str()) {
            return Err(invalid_input!(
                "checkpoint {}: {} does not match the checksum pipit recorded when it saved it ({MANIFEST}): the file changed since (--no-verify loads it anyway)",
                self.dir.display(),
                name.unwrap_or_default()
            ));
        }
        Ok(())
    }
}

/// Read a checkpoint directory: pipit's own, or a Hugging Face GPT-2 one. Every tensor the
/// model needs must be present with the shape the config implies.
pub fn load(dir: &Path) -> Result<Checkpoint> {
    load_some(dir, &|_| true)
}

/// Read the config and training state of a checkpoint directory, without its tensors
/// (`params` is empty, `optimizer` is `None`).
pub fn load_header(dir: &Path) -> Result<Checkpoint> {
    let mut c = read_checkpoint(dir, &|_| false, &Checksums::of(dir, false)?)?;
    c.optimizer = None;
    Ok(c)
}

/// [`load`], keeping only the tensors (and their optimizer moments) whose pipit names `keep`
/// accepts, and reading only their bytes: a pipeline rank's share of a checkpoint. Each kept
/// tensor the model needs must be present with its shape.
/// Each file read is first checked against the checksum pipit recorded for it when it saved
/// the checkpoint, if it did ([`MANIFEST`]; [`verify_checksums`] turns this off).
pub fn load_some(dir: &Path, keep: &dyn Fn(&str) -> bool) -> Result<Checkpoint> {
    let verify = dir.is_dir() && VERIFY.load(Ordering::Relaxed);
    read_checkpoint(dir, keep, &Checksums::of(dir, verify)?)
}

/// [`load_some`], checking each file it opens against `sums`.
fn read_checkpoint(
    dir: &Path,
    keep: &dyn Fn(&str) -> bool,
    sums: &Checksums,
) -> Result<Checkpoint> {
    if !dir.is_dir() {
        return Err(invalid_input!(
            "checkpoint directory {} does not exist",
            dir.display()
        ));
    }
    let config_path = dir.join("config.json");
    sums.check(&config_path)?;
    let config_text = fs::read(&config_path)
        .map_err(|e| invalid_input!("cannot read {}: {e}", config_path.display()))?;
    let config_json: Value = serde_json::from_slice(&config_text)
        .map_err(|e| invalid_input!("{} is not JSON: {e}", config_path.display()))?;
    let config = ModelConfig::from_hf_config(&config_json)?;

    let family = config.family;
    let wanted = |hf: &str| family.internal_name(hf).is_some_and(|n| keep(&n));
    let (model_path, raw) = read_weights(dir, &wanted, sums)?;
    let params = hf_names_to_internal(family, raw)?;
    check_shapes_of(&config, &params, keep).with_context(|| model_path.display().to_string())?;

    let opt_path = dir.join("optimizer.safetensors");
    let optimizer = if opt_path.exists() {
        sums.check(&opt_path)?;
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
        sums.check(&state_path)?;
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

/// `model.safetensors`, or shards of at most `max_shard_bytes` (tensors in name order) and
/// their index.
fn write_weights(
    dir: &Path,
    tensors: HostTensors,
    format: &BTreeMap<String, String>,
    max_shard_bytes: u64,
) -> Result<()> {
    let bytes = |t: &crate::model::HostTensor| 4 * t.data.len() as u64;
    let total: u64 = tensors.iter().map(|(_, t)| bytes(t)).sum();
    if total <= max_shard_bytes {
        let single = safetensors::to_bytes(&tensors, format);
        return write_synced(&dir.join("model.safetensors"), &single);
    }
    let mut shards: Vec<HostTensors> = vec![HostTensors::new()];
    let mut size = 0;
    for (name, t) in tensors.iter() {
        if size > 0 && size + bytes(t) > max_shard_bytes {
            shards.push(HostTensors::new());
            size = 0;
        }
        size += bytes(t);
        let shard = shards.last_mut().expect("one shard at least");
        shard.insert(name, t.shape.clone(), t.data.clone())?;
    }
    let n = shards.len();
    let mut map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        for name in shard.names() {
            map.insert(name.to_string(), Value::String(file.clone()));
        }
        write_synced(&dir.join(&file), &safetensors::to_bytes(shard, format))?;
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": map});
    write_synced(&dir.join(SHARD_INDEX), &serde_json::to_vec_pretty(&index)?)
}

/// The index of a sharded checkpoint, as transformers writes it.
pub const SHARD_INDEX: &str = "model.safetensors.index.json";

/// The weights of `dir` that `keep` accepts (by Hugging Face name), from `model.safetensors`
/// or, in a sharded checkpoint, from the shards its index names: only the shards holding a
/// kept tensor are opened, and of each only the kept tensors' bytes are read. Returns the
/// file to name in errors (the single file or the index) with the tensors.
fn read_weights(
    dir: &Path,
    keep: &dyn Fn(&str) -> bool,
    sums: &Checksums,
) -> Result<(PathBuf, HostTensors)> {
    let single = dir.join("model.safetensors");
    let index_path = dir.join(SHARD_INDEX);
    if single.exists() || !index_path.exists() {
        if single.exists() {
            sums.check(&single)?;
        }
        let raw = safetensors::read_some(&single, keep)?;
        return Ok((single, raw));
    }
    sums.check(&index_path)?;
    let text = fs::read(&index_path)
        .map_err(|e| invalid_input!("cannot read {}: {e}", index_path.display()))?;
    let index: Value = serde_json::from_slice(&text)
        .map_err(|e| invalid_input!("{} is not JSON: {e}", index_path.display()))?;
    let map = index
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| invalid_input!("{}: no `weight_map` object", index_path.display()))?;
    let mut shards: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| {
            invalid_input!(
                "{}: the shard of `{name}` is not a file name",
                index_path.display()
            )
        })?;
        if file.contains(['/', '\\']) || file.starts_with('.') {
            return Err(invalid_input!(
                "{}: shard `{file}` is not a file beside the index",
                index_path.display()
            ));
        }
        if keep(name) {
            shards.entry(file).or_default().push(name);
        }
    }
    let mut raw = HostTensors::new();
    for (file, names) in shards {
        sums.check(&dir.join(file))?;
        let got = safetensors::read_some(&dir.join(file), &|n| names.contains(&n))?;
        if let Some(missing) = names.iter().find(|n| got.get(n).is_none()) {
            return Err(invalid_input!(
                "{}: the index puts `{missing}` in {file}, which does not hold it",
                index_path.display()
            ));
        }
        raw.extend(got);
    }
    Ok((index_path, raw))
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

/// Rename Hugging Face tensors to pipit's names, dropping the non-weights
/// ([`Family::internal_name`]).
fn hf_names_to_internal(family: Family, raw: HostTensors) -> Result<HostTensors> {
    let mut out = HostTensors::new();
    for (name, t) in raw.iter() {
        if let Some(name) = family.internal_name(name) {
            out.insert(name, t.shape.clone(), t.data.clone())?;
        }
    }
    Ok(out)
}

/// Every parameter of `config` present with its expected shape; extra tensors are an error.
pub fn check_shapes(config: &ModelConfig, params: &HostTensors) -> Result<()> {
    check_shapes_of(config, params, &|_| true)
}

/// [`check_shapes`] for the tensors `keep` accepts: each of those the model needs is present
/// with its shape (and `params` holds nothing else).
fn check_shapes_of(
    config: &ModelConfig,
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
    use serde_json::json;

    fn tiny() -> ModelConfig {
        ModelConfig {
            vocab_size: 11,
            n_positions: 6,
            n_embd: 8,
            n_layer: 2,
            n_head: 2,
            ..ModelConfig::default()
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pipit-ckpt-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn sharded_checkpoints_round_trip_and_a_rank_opens_only_its_shards() {
        let config = tiny();
        let ckpt = Checkpoint {
            config: config.clone(),
            params: init_parameters(&config, 3).unwrap(),
            optimizer: None,
            trainer_state: None,
        };
        let dir = scratch("sharded");
        // wte is 11 × 8 floats (352 bytes): shards of 400 bytes hold it alone or with a bias.
        save_sharded(&dir, &ckpt, &[], 400).unwrap();
        assert!(!dir.join("model.safetensors").exists());
        let index: Value =
            serde_json::from_slice(&fs::read(dir.join(SHARD_INDEX)).unwrap()).unwrap();
        let map = index["weight_map"].as_object().unwrap();
        assert_eq!(map.len(), ckpt.params.len());
        let files: std::collections::BTreeSet<&str> =
            map.values().map(|f| f.as_str().unwrap()).collect();
        assert!(files.len() > 3, "{files:?}");
        let back = load(&dir).unwrap();
        assert_eq!(back.params, ckpt.params);
        // A changed shard is refused when a load reads it, and only then: each rank checks
        // the files it opens.
        let lnf = map["transformer.ln_f.weight"].as_str().unwrap();
        let wte = map["transformer.wte.weight"].as_str().unwrap();
        assert_ne!(lnf, wte);
        let mut bytes = fs::read(dir.join(wte)).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        fs::write(dir.join(wte), &bytes).unwrap();
        let err = load(&dir).unwrap_err().to_string();
        assert!(
            err.contains(&format!("{wte} does not match the checksum")),
            "{err}"
        );
        load_some(&dir, &|n| n.starts_with("ln_f.")).unwrap();
        // The last stage's share (the final layernorm) loads with every other shard gone.
        for f in &files {
            if *f != lnf && *f != map["transformer.ln_f.bias"].as_str().unwrap() {
                fs::remove_file(dir.join(f)).unwrap();
            }
        }
        let share = load_some(&dir, &|n| n.starts_with("ln_f.")).unwrap();
        assert_eq!(share.params.len(), 2);
        assert!(
            load(&dir).is_err(),
            "the whole checkpoint needs the removed shards"
        );
        fs::remove_dir_all(&dir).unwrap();
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
        let mut config = tiny().hf_config();
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
        // Edited by hand, as a directory made elsewhere: no checksums to stop it first.
        fs::remove_file(dir.join(MANIFEST)).unwrap();
        let mut bigger = tiny().hf_config();
        bigger["n_embd"] = json!(16);
        fs::write(dir.join("config.json"), bigger.to_string()).unwrap();
        let err = load(&dir).unwrap_err();
        assert!(
            crate::is_invalid_input(&err) && format!("{err:#}").contains("shape"),
            "{err:#}"
        );
        let mut relu = tiny().hf_config();
        relu["activation_function"] = json!("relu");
        assert!(crate::is_invalid_input(
            &ModelConfig::from_hf_config(&relu).unwrap_err()
        ));
    }
}
