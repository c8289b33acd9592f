//! pipit as a library: the calls the C ABI (`capi/`) and the Python package (`python/`) wrap.
//!
//! Each call takes its options as one JSON object whose keys are the flags of the `pipit`
//! subcommand of the same name, with `_` for `-`: `{"schedule": "1f1b", "stages": 4,
//! "microbatches": 8}` is `pipit plan --schedule 1f1b --stages 4 --microbatches 8`. The
//! options go through the command line's own parser and code, so the defaults, the checks,
//! the one-line errors and the results are the command line's: [`plan`] returns what
//! `pipit plan --format json` prints, [`Training::step`] the line `pipit train --log-json`
//! writes for that step. A switch (`no_save`) takes `true` or `false`; a flag that takes a
//! list (`fwd`) takes a string (`"1,2"`) or an array. Errors a caller can fix are
//! [`pipit_engine::is_invalid_input`].
//!
//! One option is the library's own: `verbose` (default false) keeps the messages the command
//! line prints on stderr (which device, how the layers were cut, progress bars); without it a
//! call prints nothing. Everything runs in this process, one rank per thread (no launcher).

use std::path::Path;

use anyhow::Result;
use clap::{ArgAction, Args, FromArgMatches};
use pipit_engine::invalid_input;
use serde_json::{Map, Value};

use crate::cli::{eval, generate, plan, train};

/// A call's options: `pipit <command>`'s flags, `_` for `-`.
pub type Options = Map<String, Value>;

/// The options in `text`: a JSON object, or a TOML table (as in `pipit train --config`).
pub fn options_from_text(text: &str) -> Result<Options> {
    let value: Value = if text.trim_start().starts_with('{') {
        serde_json::from_str(text).map_err(|e| invalid_input!("options: bad JSON: {e}"))?
    } else {
        let table: toml::Table = toml::from_str(text).map_err(|e| {
            invalid_input!(
                "options: neither a JSON object nor TOML: {}",
                e.to_string().lines().next().unwrap_or_default()
            )
        })?;
        serde_json::to_value(table)?
    };
    match value {
        Value::Object(options) => Ok(options),
        other => Err(invalid_input!("options must be a JSON object, got {other}")),
    }
}

/// `options` parsed by `pipit <command>`'s own parser into its arguments `A`, with `forced`
/// flags added after them (`--format json`).
fn parse<A: Args + FromArgMatches>(
    command: &'static str,
    options: &Options,
    forced: &[&str],
) -> Result<A> {
    let cmd = A::augment_args(clap::Command::new(command).no_binary_name(true));
    let mut argv: Vec<String> = Vec::new();
    for (key, value) in options {
        let flag = key.replace('_', "-");
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(flag.as_str()))
            .ok_or_else(|| {
                invalid_input!(
                    "unknown option `{key}` (the options are `pipit {command}`'s flags, with _ for -; see `pipit {command} --help`)"
                )
            })?;
        if forced
            .iter()
            .any(|f| f.split('=').next() == Some(format!("--{flag}").as_str()))
        {
            return Err(invalid_input!(
                "option `{key}` is set by this call itself; leave it out"
            ));
        }
        if matches!(arg.get_action(), ArgAction::SetTrue) {
            match value {
                Value::Bool(true) => argv.push(format!("--{flag}")),
                Value::Bool(false) | Value::Null => {}
                other => {
                    return Err(invalid_input!(
                        "option `{key}` is a switch: give true or false, got {other}"
                    ))
                }
            }
            continue;
        }
        let text = match value {
            Value::Null => continue,
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join(","),
            Value::Object(_) => {
                return Err(invalid_input!(
                    "option `{key}` takes a value, not an object"
                ))
            }
        };
        argv.push(format!("--{flag}={text}"));
    }
    argv.extend(forced.iter().map(|s| s.to_string()));
    let matches = cmd.try_get_matches_from(&argv).map_err(|e| {
        // clap's message, first line, without its "error: " (the caller adds its own).
        let text = e.to_string();
        let line = text.lines().next().unwrap_or_default();
        invalid_input!("{}", line.trim_start_matches("error: "))
    })?;
    A::from_arg_matches(&matches).map_err(|e| invalid_input!("{e}"))
}

/// `call` on `options` less the library's own `verbose`, quietly unless that is true.
fn with_options<R>(options: &Options, call: impl FnOnce(&Options) -> Result<R>) -> Result<R> {
    let mut options = options.clone();
    let verbose = match options.remove("verbose") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Bool(true)) => true,
        Some(other) => {
            return Err(invalid_input!(
                "option `verbose` is a switch: give true or false, got {other}"
            ))
        }
    };
    if verbose {
        call(&options)
    } else {
        crate::cli::quietly(|| call(&options))
    }
}

/// Errors if `options` sets one of `keys`, flags of the command line that a library call
/// has no use for (`why` says what to do instead).
fn refuse(options: &Options, keys: &[&str], why: &str) -> Result<()> {
    match keys.iter().find(|k| options.contains_key(**k)) {
        Some(key) => Err(invalid_input!(
            "option `{key}` is the command line's: {why}"
        )),
        None => Ok(()),
    }
}

/// `pipit plan --format json`: the plan's figures (or, with `compare`, one entry per schedule).
pub fn plan(options: &Options) -> Result<Value> {
    with_options(options, |options| {
        refuse(options, &["output"], "the plan is returned")?;
        let args: plan::PlanArgs = parse("plan", options, &["--format=json"])?;
        Ok(serde_json::from_str(&plan::report(&args)?)?)
    })
}

/// `pipit generate --format json`: `{"samples": [{"prompt", "seed", "text", "ids", "end"}],
/// "tokens", "seconds", "tokens_per_sec"}`.
pub fn generate(options: &Options) -> Result<Value> {
    with_options(options, |options| {
        refuse(options, &["dry_run"], "run `pipit generate --dry-run`")?;
        let args: generate::GenerateArgs = parse("generate", options, &["--format=json"])?;
        let mut out = Vec::new();
        generate::run_to(args, &mut out)?;
        Ok(serde_json::from_slice(&out)?)
    })
}

/// `pipit eval --format json`: `{"loss", "tokens", "per"}`.
pub fn evaluate(options: &Options) -> Result<Value> {
    with_options(options, |options| {
        let args: eval::EvalArgs = parse("eval", options, &["--format=json"])?;
        let mut out = Vec::new();
        eval::run_to(args, &mut out)?;
        Ok(serde_json::from_slice(&out)?)
    })
}

/// `pipit train`, a step at a time: the same settings, the same batches, the same losses.
pub struct Training {
    run: train::Run,
}

impl Training {
    /// Build the pipeline `pipit train` would build from these flags (on `backend`, `auto` by
    /// default); nothing is trained yet, nothing is saved unless [`Training::save`] says so.
    pub fn new(options: &Options) -> Result<Self> {
        with_options(options, |options| {
            refuse(
                options,
                &["dry_run", "show_config"],
                "run `pipit train` with it",
            )?;
            refuse(
                options,
                &["save", "no_save", "save_every"],
                "a library run saves when told to (save)",
            )?;
            refuse(
                options,
                &["log_json", "trace", "transport", "peer_timeout"],
                "each step returns its log line; a library run is one process",
            )?;
            let args: train::TrainArgs = parse("train", options, &[])?;
            Ok(Training {
                run: train::Run::new(&args)?,
            })
        })
    }

    /// One optimizer step, then an evaluation where `pipit train` would make one (every
    /// `eval_every` steps and after the last): the step's `--log-json` line (`step`, `loss`,
    /// `lr`, `tokens_per_sec`, `bubble_fraction`, `peak_bytes`, and `val_loss` after an
    /// evaluation).
    pub fn step(&mut self) -> Result<Value> {
        self.run.step()
    }

    /// Steps done, and the run's `steps`.
    pub fn progress(&self) -> (u64, u64) {
        (self.run.trainer.step(), self.run.trainer.config().steps)
    }

    /// Train to the last step; `on_step` gets each step's line and returns false to stop
    /// there. The last line, or `None` if no step was left.
    pub fn run(&mut self, on_step: &mut dyn FnMut(&Value) -> bool) -> Result<Option<Value>> {
        let mut last = None;
        while self.run.trainer.step() < self.run.trainer.config().steps {
            let line = self.step()?;
            let go_on = on_step(&line);
            last = Some(line);
            if !go_on {
                break;
            }
        }
        Ok(last)
    }

    /// Validation loss now (nats per token), over the run's `eval_tokens` held-out tokens.
    pub fn evaluate(&mut self) -> Result<f64> {
        self.run.evaluate()
    }

    /// Save a checkpoint to `dir`, as `pipit train --save` does (`--resume` continues it).
    pub fn save(&mut self, dir: &Path) -> Result<()> {
        self.run.save(dir)
    }

    /// The logits after `tokens` (one sequence, at most the model's `n_positions` long):
    /// `vocab_size` numbers.
    pub fn logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.run.trainer.next_token_logits(tokens)
    }

    /// The run's settings as `pipit train --show-config` prints them, as JSON.
    pub fn config(&self) -> Result<Value> {
        Ok(serde_json::to_value(self.run.trainer.config())?)
    }
}
