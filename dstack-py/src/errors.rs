//! Rust errors as the exceptions of `dstack.errors` (defined in `python/dstack/errors.py`,
//! so they carry attributes such as `ConfigurationError.errors`). One exhaustive mapping.

use dstack_core::artifacts::ArtifactError;
use dstack_core::backend::ComputeError;
use dstack_core::config::ConfigErrors;
use dstack_core::engine::EngineError;
use dstack_core::store::StoreError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// A failure to hand to Python: the name of a class in `dstack.errors` and its message.
/// Built without the GIL (inside Rust futures); [`Failure::into_pyerr`] makes the exception.
#[derive(Debug)]
pub struct Failure {
    class: &'static str,
    message: String,
    config: Option<ConfigErrors>,
}

impl Failure {
    /// A failure of class `class` (a name in `dstack.errors`).
    pub fn new(class: &'static str, message: impl Into<String>) -> Self {
        Failure {
            class,
            message: message.into(),
            config: None,
        }
    }

    /// The exception.
    pub fn into_pyerr(self, py: Python<'_>) -> PyErr {
        match self.exception(py) {
            Ok(e) => e,
            Err(e) => e,
        }
    }

    fn exception(self, py: Python<'_>) -> PyResult<PyErr> {
        let class = py.import("dstack.errors")?.getattr(self.class)?;
        let kwargs = PyDict::new(py);
        if let Some(config) = &self.config {
            let errors = pyo3::types::PyList::empty(py);
            for e in &config.errors {
                let item = PyDict::new(py);
                item.set_item("file", &config.file)?;
                item.set_item("line", (e.mark.line > 0).then_some(e.mark.line))?;
                item.set_item("column", (e.mark.line > 0).then_some(e.mark.col))?;
                item.set_item("loc", &e.path)?;
                item.set_item("type", e.code.as_str())?;
                item.set_item("msg", &e.message)?;
                errors.append(item)?;
            }
            kwargs.set_item("errors", errors)?;
        }
        let exc = class.call((self.message,), Some(&kwargs))?;
        Ok(PyErr::from_value(exc))
    }
}

impl From<ConfigErrors> for Failure {
    fn from(errors: ConfigErrors) -> Self {
        Failure {
            class: "ConfigurationError",
            message: errors.to_string(),
            config: Some(errors),
        }
    }
}

impl From<EngineError> for Failure {
    fn from(error: EngineError) -> Self {
        let class = match &error {
            EngineError::Store(StoreError::NameTaken(_)) => "ResourceExistsError",
            EngineError::Store(
                StoreError::Sqlite(_)
                | StoreError::Corrupt(_)
                | StoreError::Io(_)
                | StoreError::TooNew { .. },
            ) => "DstackError",
            EngineError::Compute(c) => match c {
                ComputeError::NoCapacity(_) => "NoCapacityError",
                ComputeError::NotFound(_) => "ResourceNotExistsError",
                ComputeError::Unauthenticated(_) => "BackendAuthError",
                ComputeError::NotSupported(_) => "NotSupportedError",
                ComputeError::Other(_) | ComputeError::Unknown(_) => "BackendError",
            },
            EngineError::Agent(_) => "BackendError",
            EngineError::Unsupported(_) => "NotSupportedError",
            EngineError::Invalid(_) => "DstackError",
            EngineError::PortUsed(_) => "PortUsedError",
            EngineError::Artifacts(a) => match a {
                ArtifactError::Exists(_) => "ResourceExistsError",
                ArtifactError::NotFound(_) => "ResourceNotExistsError",
                ArtifactError::Unsupported(_) => "NotSupportedError",
                _ => "DstackError",
            },
            EngineError::Server(e) => match e.code() {
                Some("resource_exists") => "ResourceExistsError",
                Some("resource_not_exists") => "ResourceNotExistsError",
                Some("no_capacity") => "NoCapacityError",
                Some("backend_auth_error") => "BackendAuthError",
                Some("not_supported") => "NotSupportedError",
                Some("backend_error") => "BackendError",
                Some("configuration_error") => "ConfigurationError",
                Some("not_authenticated" | "forbidden") => "ClientError",
                Some(_) | None => "DstackError",
            },
        };
        Failure::new(class, error.to_string())
    }
}

/// `Result` of work done without the GIL.
pub type Outcome<T> = Result<T, Failure>;

/// Turns an [`Outcome`] into a `PyResult` (needs the GIL).
pub fn raise<T>(py: Python<'_>, outcome: Outcome<T>) -> PyResult<T> {
    outcome.map_err(|f| f.into_pyerr(py))
}
