//! Python bindings of dstack-rs: the `dstack._native` extension module.
//!
//! No business logic lives here: [`client`] and [`run`] expose `dstack_core::Client` and its
//! run handles to the Python package (`python/dstack`), [`runtime`] bridges tokio to Python
//! (blocking with Ctrl-C honoured, or callbacks for asyncio), [`convert`] moves plain data,
//! and [`errors`] maps Rust errors to `dstack.errors`. Validation happens only in Rust.

mod client;
mod convert;
mod errors;
mod group;
mod run;
mod runtime;

use pyo3::prelude::*;

/// The `dstack._native` module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(client::validate, m)?)?;
    m.add_function(wrap_pyfunction!(client::with_profile, m)?)?;
    m.add(
        "MAX_TEXT_BYTES",
        dstack_core::config::limits::MAX_TEXT_BYTES,
    )?;
    m.add_class::<client::RawClient>()?;
    m.add_class::<run::RawRun>()?;
    m.add_class::<run::RawLogs>()?;
    m.add_class::<group::RawGroupWatch>()?;
    m.add_class::<run::RawForward>()?;
    m.add_class::<runtime::RawTask>()?;
    Ok(())
}
