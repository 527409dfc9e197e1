//! Python bindings of dstack-rs: the `dstack._native` extension module.
//!
//! Validation happens only in Rust; Python receives the normalized configuration as the same
//! JSON that `dstack validate --json` prints.

use pyo3::create_exception;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

create_exception!(
    _native,
    ConfigurationError,
    PyValueError,
    "A configuration is invalid; the message lists every problem as FILE:LINE:COL: FIELD: MESSAGE."
);

/// Parses and validates a configuration and returns it normalized, as a JSON string.
#[pyfunction]
#[pyo3(signature = (text, file = "<string>"))]
fn parse_configuration(py: Python<'_>, text: &str, file: &str) -> PyResult<String> {
    let parsed = py.allow_threads(|| dstack_core::config::parse(text, file));
    match parsed {
        Ok(config) => Ok(config.to_json().to_string()),
        Err(errors) => Err(ConfigurationError::new_err(errors.to_string())),
    }
}

/// The `dstack._native` module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(parse_configuration, m)?)?;
    m.add(
        "ConfigurationError",
        m.py().get_type::<ConfigurationError>(),
    )?;
    Ok(())
}
