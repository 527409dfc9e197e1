//! The one tokio runtime of the extension, and the two ways Python waits on it: blocking
//! (GIL released, Ctrl-C checked every [`SIGNAL_CHECK`]) and as a [`RawTask`] whose pipe an
//! `asyncio` loop watches.

use std::future::Future;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
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

/// A result waiting for the GIL: converted to Python by whoever collects it.
type Deferred = Box<dyn FnOnce(Python<'_>) -> PyResult<PyObject> + Send>;

/// A Rust task for asyncio. Runtime threads never touch the interpreter: when the task ends
/// it stores its result and writes a byte to a pipe whose read end (`fileno()`) the event
/// loop watches (`loop.add_reader`); the loop's thread then collects it with `result()`.
/// (Taking the GIL from a runtime thread could race with interpreter shutdown.)
#[pyclass(module = "dstack._native", frozen)]
pub struct RawTask {
    abort: AbortHandle,
    ready: std::io::PipeReader,
    result: Arc<Mutex<Option<Deferred>>>,
}

#[pymethods]
impl RawTask {
    /// The file descriptor that becomes readable when the task has ended.
    fn fileno(&self) -> i32 {
        self.ready.as_raw_fd()
    }

    /// The task's value (or its exception, raised); only once it has ended, and only once.
    fn result(&self, py: Python<'_>) -> PyResult<PyObject> {
        let taken = self
            .result
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match taken {
            Some(deferred) => deferred(py),
            None => Err(PyRuntimeError::new_err(
                "the task has not ended (or was collected)",
            )),
        }
    }

    /// Cancels the task (dropping its future); it then never becomes ready.
    fn cancel(&self) {
        self.abort.abort();
    }
}

/// Runs `fut` on the runtime; its output, converted by `convert` (or its error), is collected
/// from the returned [`RawTask`] once its pipe is readable.
pub fn spawn<T, F, C>(fut: F, convert: C) -> PyResult<RawTask>
where
    F: Future<Output = Outcome<T>> + Send + 'static,
    T: Send + 'static,
    C: FnOnce(Python<'_>, T) -> PyResult<PyObject> + Send + 'static,
{
    let (ready, mut notify) = std::io::pipe()
        .map_err(|e| PyRuntimeError::new_err(format!("cannot create a pipe: {e}")))?;
    let result: Arc<Mutex<Option<Deferred>>> = Arc::default();
    let slot = result.clone();
    let handle = runtime()?.spawn(async move {
        let output = fut.await;
        let deferred: Deferred = Box::new(move |py| raise(py, output).and_then(|v| convert(py, v)));
        *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(deferred);
        // The reader may be gone (the task was dropped); nothing else to tell then.
        let _ = notify.write_all(b"x");
    });
    Ok(RawTask {
        abort: handle.abort_handle(),
        ready,
        result,
    })
}
