//! `pipit._pipit`, the native half of the Python package: [`pipit_lib::api`] with options and
//! results as JSON text (the Python half, `pipit/__init__.py`, turns them into keyword
//! arguments and dicts). Every call releases the GIL while pipit computes; pipit's errors
//! become `ValueError` (input the caller can fix) or `RuntimeError`, with pipit's one-line
//! message.

use std::path::Path;
use std::sync::Mutex;

use pipit_lib::api::{self, Options, Training as ApiTraining};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

/// pipit's error as the Python exception it is.
fn raise(e: anyhow::Error) -> PyErr {
    let message = format!("{e:#}");
    if pipit_engine::is_invalid_input(&e) {
        PyValueError::new_err(message)
    } else {
        PyRuntimeError::new_err(message)
    }
}

fn options(text: &str) -> PyResult<Options> {
    api::options_from_text(text).map_err(raise)
}

/// `call` on the options (JSON text) with the GIL released; its result as JSON text.
fn json_call(
    py: Python<'_>,
    options_json: &str,
    call: fn(&Options) -> anyhow::Result<serde_json::Value>,
) -> PyResult<String> {
    let o = options(options_json)?;
    py.detach(|| call(&o)).map(|v| v.to_string()).map_err(raise)
}

/// `pipit plan --format json` for the options (JSON text); its JSON.
#[pyfunction]
fn plan(py: Python<'_>, options_json: &str) -> PyResult<String> {
    json_call(py, options_json, api::plan)
}

/// `pipit generate --format json` for the options (JSON text); its JSON.
#[pyfunction]
fn generate(py: Python<'_>, options_json: &str) -> PyResult<String> {
    json_call(py, options_json, api::generate)
}

/// `pipit eval --format json` for the options (JSON text); its JSON.
#[pyfunction]
fn evaluate(py: Python<'_>, options_json: &str) -> PyResult<String> {
    json_call(py, options_json, api::evaluate)
}

/// A training run (`pipit train`'s flags as JSON text), a step at a time.
#[pyclass(module = "pipit._pipit")]
struct Training {
    run: Mutex<ApiTraining>,
}

impl Training {
    /// Run `f` on the run with the GIL released.
    fn with<R: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut ApiTraining) -> anyhow::Result<R> + Send,
    ) -> PyResult<R> {
        py.detach(|| {
            let mut run = self
                .run
                .lock()
                .map_err(|_| anyhow::anyhow!("an earlier call on this run panicked"))?;
            f(&mut run)
        })
        .map_err(raise)
    }
}

#[pymethods]
impl Training {
    #[new]
    fn new(py: Python<'_>, options_json: &str) -> PyResult<Self> {
        let o = options(options_json)?;
        let run = py.detach(|| ApiTraining::new(&o)).map_err(raise)?;
        Ok(Training {
            run: Mutex::new(run),
        })
    }

    /// One step (and an evaluation where `pipit train` makes one): its log line as JSON.
    fn step(&self, py: Python<'_>) -> PyResult<String> {
        self.with(py, |run| Ok(run.step()?.to_string()))
    }

    /// Steps done and the run's steps.
    fn progress(&self, py: Python<'_>) -> PyResult<(u64, u64)> {
        self.with(py, |run| Ok(run.progress()))
    }

    /// The validation loss now.
    fn evaluate(&self, py: Python<'_>) -> PyResult<f64> {
        self.with(py, |run| run.evaluate())
    }

    /// Save a checkpoint to the directory `path`.
    fn save(&self, py: Python<'_>, path: &str) -> PyResult<()> {
        self.with(py, |run| run.save(Path::new(path)))
    }

    /// The logits after `tokens`, as the bytes of `vocab_size` native-endian f32.
    fn logits<'py>(&self, py: Python<'py>, tokens: Vec<u32>) -> PyResult<Bound<'py, PyBytes>> {
        let row = self.with(py, |run| run.logits(&tokens))?;
        let bytes: Vec<u8> = row.iter().flat_map(|x| x.to_ne_bytes()).collect();
        Ok(PyBytes::new(py, &bytes))
    }

    /// The run's settings as JSON (`pipit train --show-config`'s, as JSON).
    fn config(&self, py: Python<'_>) -> PyResult<String> {
        self.with(py, |run| Ok(run.config()?.to_string()))
    }
}

#[pymodule]
fn _pipit(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(plan, m)?)?;
    m.add_function(wrap_pyfunction!(generate, m)?)?;
    m.add_function(wrap_pyfunction!(evaluate, m)?)?;
    m.add_class::<Training>()?;
    Ok(())
}
