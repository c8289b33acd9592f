//! pipit's C ABI (`include/pipit.h`, generated from this file by cbindgen): planning,
//! training, generation and evaluation, options and results as JSON text (see
//! [`pipit_lib::api`]). The conventions — status codes, the thread's last error, who frees
//! what — are at the top of the header.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::ptr;

use pipit_lib::api::{self, Options, Training};
use serde_json::Value;

/// What a call did.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PipitStatus {
    /// It did what was asked.
    PipitOk = 0,
    /// It failed for a reason outside the caller's input (a device, a file system, a bug).
    PipitError = 1,
    /// The caller's input was wrong: a bad option, value or path (the command line's exit
    /// status 2).
    PipitInvalidInput = 2,
    /// The progress callback asked to stop.
    PipitCancelled = 3,
}

/// A training run in this process (`pipit train`, a step at a time).
pub struct PipitTrainer {
    training: Training,
}

/// Called after each step by pipit_trainer_run with the step's JSON line (valid during the
/// call only) and the caller's `user` pointer; returning nonzero stops the run there.
pub type PipitProgress =
    Option<unsafe extern "C" fn(record_json: *const c_char, user: *mut c_void) -> c_int>;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(message: &str) {
    let text = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = text);
}

/// Run `body`, turning an error into a status and this thread's last error, and a panic into
/// PIPIT_ERROR.
fn guard(body: impl FnOnce() -> anyhow::Result<PipitStatus>) -> PipitStatus {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => {
            set_error(&format!("{e:#}"));
            if pipit_engine::is_invalid_input(&e) {
                PipitStatus::PipitInvalidInput
            } else {
                PipitStatus::PipitError
            }
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown".into());
            set_error(&format!("internal error (a panic in pipit): {what}"));
            PipitStatus::PipitError
        }
    }
}

/// The UTF-8 text at `text`, or an invalid-input error naming `what`.
///
/// # Safety
/// `text` is NULL or a NUL-terminated string.
unsafe fn text_arg<'a>(text: *const c_char, what: &str) -> anyhow::Result<&'a str> {
    if text.is_null() {
        return Err(pipit_engine::invalid_input!("{what} is NULL"));
    }
    // SAFETY: as the caller promises.
    unsafe { CStr::from_ptr(text) }
        .to_str()
        .map_err(|_| pipit_engine::invalid_input!("{what} is not UTF-8"))
}

/// The options at `options` (NULL: none).
///
/// # Safety
/// As [`text_arg`].
unsafe fn options_arg(options: *const c_char) -> anyhow::Result<Options> {
    if options.is_null() {
        return Ok(Options::new());
    }
    // SAFETY: as the caller promises.
    api::options_from_text(unsafe { text_arg(options, "options") }?)
}

/// Hand `value` to the caller as JSON text in `*result`.
///
/// # Safety
/// `result` is NULL or writable.
unsafe fn give(result: *mut *mut c_char, value: &Value) -> anyhow::Result<PipitStatus> {
    if result.is_null() {
        return Err(pipit_engine::invalid_input!("the result pointer is NULL"));
    }
    let text = CString::new(value.to_string())?;
    // SAFETY: as the caller promises.
    unsafe { *result = text.into_raw() };
    Ok(PipitStatus::PipitOk)
}

/// Clear `*result` (when given) before a call, so that it is NULL if the call fails.
///
/// # Safety
/// `result` is NULL or writable.
unsafe fn clear(result: *mut *mut c_char) {
    if !result.is_null() {
        // SAFETY: as the caller promises.
        unsafe { *result = ptr::null_mut() };
    }
}

/// `call` on the options at `options`, its JSON result handed over in `*result`.
///
/// # Safety
/// As [`options_arg`] and [`give`].
unsafe fn json_call(
    options: *const c_char,
    result: *mut *mut c_char,
    call: fn(&Options) -> anyhow::Result<Value>,
) -> PipitStatus {
    guard(|| unsafe {
        clear(result);
        give(result, &call(&options_arg(options)?)?)
    })
}

/// The version of the library, e.g. "0.1.0" (static; never freed). Compare with
/// PIPIT_VERSION to check that the header and the library agree.
#[no_mangle]
pub extern "C" fn pipit_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// This thread's last error message (one line, UTF-8), or "" if none yet. Owned by pipit:
/// valid until this thread's next call into pipit; never freed by the caller.
#[no_mangle]
pub extern "C" fn pipit_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Free a string pipit returned through a `char **result` (NULL is ignored).
///
/// # Safety
/// `text` is NULL or a string pipit returned and not yet freed.
#[no_mangle]
pub unsafe extern "C" fn pipit_string_free(text: *mut c_char) {
    if !text.is_null() {
        // SAFETY: it came from CString::into_raw in `give`.
        drop(unsafe { CString::from_raw(text) });
    }
}

/// Plan a pipeline step, as `pipit plan --format json`: `options` are its flags
/// ({"schedule": "1f1b", "stages": 4, "microbatches": 8}); `*result` gets its JSON.
///
/// # Safety
/// `options` is NULL or a NUL-terminated string; `result` is writable.
#[no_mangle]
pub unsafe extern "C" fn pipit_plan(
    options: *const c_char,
    result: *mut *mut c_char,
) -> PipitStatus {
    // SAFETY: as the caller promises.
    unsafe { json_call(options, result, api::plan) }
}

/// Generate from a checkpoint, as `pipit generate --format json` ({"checkpoint": "runs/latest",
/// "prompt": "ROMEO:", "max_tokens": 40, "temperature": 0}); `*result` gets its JSON.
///
/// # Safety
/// As pipit_plan.
#[no_mangle]
pub unsafe extern "C" fn pipit_generate(
    options: *const c_char,
    result: *mut *mut c_char,
) -> PipitStatus {
    // SAFETY: as the caller promises.
    unsafe { json_call(options, result, api::generate) }
}

/// Score a checkpoint on a text, as `pipit eval --format json` ({"checkpoint": "runs/latest"});
/// `*result` gets {"loss", "tokens", "per"}.
///
/// # Safety
/// As pipit_plan.
#[no_mangle]
pub unsafe extern "C" fn pipit_evaluate(
    options: *const c_char,
    result: *mut *mut c_char,
) -> PipitStatus {
    // SAFETY: as the caller promises.
    unsafe { json_call(options, result, api::evaluate) }
}

/// Build a training run from `pipit train`'s flags (JSON, or TOML as in `--config`:
/// "n_embd = 32\nsteps = 20"); `*trainer` gets it, to free with pipit_trainer_free. Nothing
/// is trained or saved yet.
///
/// # Safety
/// `options` is NULL or a NUL-terminated string; `trainer` is writable.
#[no_mangle]
pub unsafe extern "C" fn pipit_trainer_new(
    options: *const c_char,
    trainer: *mut *mut PipitTrainer,
) -> PipitStatus {
    guard(|| unsafe {
        if trainer.is_null() {
            return Err(pipit_engine::invalid_input!("the trainer pointer is NULL"));
        }
        *trainer = ptr::null_mut();
        let training = Training::new(&options_arg(options)?)?;
        *trainer = Box::into_raw(Box::new(PipitTrainer { training }));
        Ok(PipitStatus::PipitOk)
    })
}

/// The trainer behind `trainer`, or an invalid-input error.
///
/// # Safety
/// `trainer` is NULL or a live trainer used by this thread alone.
unsafe fn trainer_arg<'a>(trainer: *mut PipitTrainer) -> anyhow::Result<&'a mut PipitTrainer> {
    // SAFETY: as the caller promises.
    unsafe { trainer.as_mut() }.ok_or_else(|| pipit_engine::invalid_input!("the trainer is NULL"))
}

/// Train one step (and evaluate where `pipit train` would); `*record` gets the step's
/// `--log-json` line: {"step", "loss", "lr", "tokens_per_sec", "bubble_fraction",
/// "peak_bytes"} and "val_loss" after an evaluation.
///
/// # Safety
/// `trainer` is a live trainer; `record` is writable.
#[no_mangle]
pub unsafe extern "C" fn pipit_trainer_step(
    trainer: *mut PipitTrainer,
    record: *mut *mut c_char,
) -> PipitStatus {
    guard(|| unsafe {
        clear(record);
        let line = trainer_arg(trainer)?.training.step()?;
        give(record, &line)
    })
}

/// Train to the run's last step, calling `progress` (when not NULL) after each with its line
/// and `user`; a nonzero return stops the run after that step with PIPIT_CANCELLED (the
/// trainer stays usable). `*last` (when not NULL) gets the last step's line, or JSON null
/// when no step was left.
///
/// # Safety
/// `trainer` is a live trainer; `last` is NULL or writable; `progress` is NULL or a function
/// that may be called with `user`.
#[no_mangle]
pub unsafe extern "C" fn pipit_trainer_run(
    trainer: *mut PipitTrainer,
    progress: PipitProgress,
    user: *mut c_void,
    last: *mut *mut c_char,
) -> PipitStatus {
    guard(|| unsafe {
        clear(last);
        let t = trainer_arg(trainer)?;
        let mut stopped = false;
        let mut report = |line: &Value| -> bool {
            let Some(callback) = progress else {
                return true;
            };
            let text = CString::new(line.to_string()).unwrap_or_default();
            // SAFETY: as the caller promises.
            let stop = callback(text.as_ptr(), user) != 0;
            stopped |= stop;
            !stop
        };
        let line = t.training.run(&mut report)?;
        if !last.is_null() {
            give(last, &line.unwrap_or(Value::Null))?;
        }
        if stopped {
            let (done, steps) = t.training.progress();
            set_error(&format!(
                "stopped by the progress callback after step {done} of {steps}"
            ));
            return Ok(PipitStatus::PipitCancelled);
        }
        Ok(PipitStatus::PipitOk)
    })
}

/// The validation loss now (nats per token, over the run's `eval_tokens`) in `*loss`.
///
/// # Safety
/// `trainer` is a live trainer; `loss` is writable.
#[no_mangle]
pub unsafe extern "C" fn pipit_trainer_evaluate(
    trainer: *mut PipitTrainer,
    loss: *mut f64,
) -> PipitStatus {
    guard(|| unsafe {
        if loss.is_null() {
            return Err(pipit_engine::invalid_input!("the loss pointer is NULL"));
        }
        *loss = trainer_arg(trainer)?.training.evaluate()?;
        Ok(PipitStatus::PipitOk)
    })
}

/// Save a checkpoint to the directory `dir` (UTF-8), as `pipit train --save` does.
///
/// # Safety
/// `trainer` is a live trainer; `dir` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn pipit_trainer_save(
    trainer: *mut PipitTrainer,
    dir: *const c_char,
) -> PipitStatus {
    guard(|| unsafe {
        let dir = text_arg(dir, "the directory")?;
        trainer_arg(trainer)?.training.save(Path::new(dir))?;
        Ok(PipitStatus::PipitOk)
    })
}

/// Free a trainer and everything it holds (NULL is ignored).
///
/// # Safety
/// `trainer` is NULL or a trainer from pipit_trainer_new not yet freed.
#[no_mangle]
pub unsafe extern "C" fn pipit_trainer_free(trainer: *mut PipitTrainer) {
    if !trainer.is_null() {
        // Dropping joins nothing and cannot fail; a panic in a drop must still not unwind
        // into C.
        let _ = catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: it came from Box::into_raw in pipit_trainer_new.
            drop(unsafe { Box::from_raw(trainer) })
        }));
    }
}
