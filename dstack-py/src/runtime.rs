//! The one tokio runtime of the extension, and the two ways Python waits on it: blocking
//! (GIL released, Ctrl-C checked every [`SIGNAL_CHECK`]) and through a callback (for
//! `asyncio`).

use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use tokio::runtime::Runtime;
use tokio::task::AbortHandle;

use crate::errors::{raise, Outcome};

/// How often a blocking call re-acquires the GIL to let Python handle signals (Ctrl-C).
const SIGNAL_CHECK: Duration = Duration::from_millis(50);

struct Shared {
    runtime: Runtime,
    pid: u32,
}

static SHARED: OnceLock<Shared> = OnceLock::new();

/// The runtime, built on first use. After `fork()` the child cannot use the parent's runtime
/// (its threads did not survive), so it gets a clear error instead of a hang.
pub fn runtime() -> PyResult<&'static Runtime> {
    let shared = match SHARED.get() {
        Some(shared) => shared,
        None => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("dstack-rt")
                .enable_all()
                .build()
                .map_err(|e| PyRuntimeError::new_err(format!("cannot start tokio: {e}")))?;
            let _ = SHARED.set(Shared {
                runtime,
                pid: std::process::id(),
            });
            SHARED.get().expect("set above")
        }
    };
    if shared.pid != std::process::id() {
        return Err(PyRuntimeError::new_err(
            "dstack cannot be used in a process forked from one that already used it; \
             create the Client in the child (e.g. use the `spawn` start method of multiprocessing)",
        ));
    }
    Ok(&shared.runtime)
}

/// Runs `fut` to completion with the GIL released. Every [`SIGNAL_CHECK`] the GIL is taken
/// back to run Python's signal handlers: a `KeyboardInterrupt` drops (cancels) `fut` and is
/// raised.
pub fn block_on<F: Future + Send>(py: Python<'_>, fut: F) -> PyResult<F::Output>
where
    F::Output: Send,
{
    let runtime = runtime()?;
    let mut fut = std::pin::pin!(fut);
    loop {
        let step = py.allow_threads(|| {
            runtime.block_on(async { tokio::time::timeout(SIGNAL_CHECK, &mut fut).await })
        });
        match step {
            Ok(output) => return Ok(output),
            Err(_elapsed) => py.check_signals()?,
        }
    }
}

/// A Rust task whose result goes to a Python callback; `cancel()` drops it.
#[pyclass(module = "dstack._native", frozen)]
pub struct RawTask {
    abort: AbortHandle,
}

#[pymethods]
impl RawTask {
    /// Cancels the task (its callback is then never called).
    fn cancel(&self) {
        self.abort.abort();
    }
}

/// Runs `fut` on the runtime and calls `done(True, value)` with its converted output, or
/// `done(False, exception)` with its error. `done` runs on a runtime thread: it must only
/// hand the result over (e.g. with `loop.call_soon_threadsafe`).
pub fn spawn<T, F, C>(fut: F, convert: C, done: PyObject) -> PyResult<RawTask>
where
    F: Future<Output = Outcome<T>> + Send + 'static,
    T: Send + 'static,
    C: FnOnce(Python<'_>, T) -> PyResult<PyObject> + Send + 'static,
{
    let handle = runtime()?.spawn(async move {
        let output = fut.await;
        Python::with_gil(|py| {
            let converted = raise(py, output).and_then(|v| convert(py, v));
            let (ok, value) = match converted {
                Ok(value) => (true, value),
                Err(e) => (false, e.into_value(py).into_any()),
            };
            if let Err(e) = done.call1(py, (ok, value)) {
                e.write_unraisable(py, None);
            }
        });
    });
    Ok(RawTask {
        abort: handle.abort_handle(),
    })
}
