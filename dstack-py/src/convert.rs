//! Plain data between Python and Rust: JSON-shaped values both ways.

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde_json::{Map, Number, Value};

use dstack_core::config::{limits, ConfigErrors};

use crate::errors::Failure;

/// A Python value as JSON: `dict` (string keys), `list`/`tuple`, `str`, `int`, `float`,
/// `bool` and `None`. Anything else is a `TypeError` naming where it was found. Data nested
/// deeper than [`limits::MAX_DEPTH`] (a dict that contains itself, say) is a
/// `ConfigurationError` naming `source` and the field: the walk stops there.
pub fn from_py(obj: &Bound<'_, PyAny>, source: &str) -> PyResult<Value> {
    convert(obj, &mut String::new(), 0).map_err(|e| match e {
        NotPlain::Python(e) => e,
        NotPlain::TooDeep(path) => {
            let errors = ConfigErrors {
                file: source.to_string(),
                errors: vec![limits::too_deep(path)],
            };
            Failure::from(errors).into_pyerr(obj.py())
        }
    })
}

/// Why a value could not be converted.
enum NotPlain {
    /// A Python error (a wrong type, a failed extraction).
    Python(PyErr),
    /// Nested deeper than the limit, at this field path.
    TooDeep(String),
}

impl From<PyErr> for NotPlain {
    fn from(e: PyErr) -> Self {
        NotPlain::Python(e)
    }
}

fn convert(obj: &Bound<'_, PyAny>, path: &mut String, depth: usize) -> Result<Value, NotPlain> {
    if obj.is_none() {
        return Ok(Value::Null);
    }
    if let Ok(b) = obj.downcast::<PyBool>() {
        return Ok(Value::Bool(b.is_true()));
    }
    if obj.is_instance_of::<PyInt>() {
        if let Ok(i) = obj.extract::<i64>() {
            return Ok(Value::from(i));
        }
        let f: f64 = obj.extract()?;
        return Ok(Number::from_f64(f).map_or(Value::Null, Value::Number));
    }
    if let Ok(f) = obj.downcast::<PyFloat>() {
        return match Number::from_f64(f.value()) {
            Some(n) => Ok(Value::Number(n)),
            None => Err(type_error(path, "a finite number").into()),
        };
    }
    if let Ok(s) = obj.downcast::<PyString>() {
        return Ok(Value::String(s.to_cow()?.into_owned()));
    }
    let nested = obj.is_instance_of::<PyDict>()
        || obj.is_instance_of::<PyList>()
        || obj.is_instance_of::<PyTuple>();
    if nested && depth >= limits::MAX_DEPTH {
        return Err(NotPlain::TooDeep(path.clone()));
    }
    if let Ok(d) = obj.downcast::<PyDict>() {
        let mut map = Map::new();
        for (k, v) in d.iter() {
            let key: String = k
                .extract()
                .map_err(|_| type_error(path, "string keys in mappings"))?;
            let len = path.len();
            push_key(path, &key);
            let value = convert(&v, path, depth + 1)?;
            path.truncate(len);
            map.insert(key, value);
        }
        return Ok(Value::Object(map));
    }
    if obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>() {
        let mut items = Vec::new();
        for (i, item) in obj.try_iter()?.enumerate() {
            let len = path.len();
            path.push_str(&format!("[{i}]"));
            items.push(convert(&item?, path, depth + 1)?);
            path.truncate(len);
        }
        return Ok(Value::Array(items));
    }
    let kind = obj.get_type().name()?.to_string();
    Err(type_error(
        path,
        &format!("plain data (dict, list, str, int, float, bool, None), not {kind}"),
    )
    .into())
}

fn push_key(path: &mut String, key: &str) {
    if !path.is_empty() {
        path.push('.');
    }
    path.push_str(key);
}

fn type_error(path: &str, expected: &str) -> PyErr {
    let at = if path.is_empty() { "(root)" } else { path };
    PyTypeError::new_err(format!("{at}: expected {expected}"))
}

/// A JSON value as Python objects.
pub fn to_py(py: Python<'_>, value: &Value) -> PyResult<PyObject> {
    Ok(match value {
        Value::Null => py.None(),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any().unbind(),
        Value::Number(n) => match n.as_i64() {
            Some(i) => i.into_pyobject(py)?.into_any().unbind(),
            None => n
                .as_f64()
                .unwrap_or(f64::NAN)
                .into_pyobject(py)?
                .into_any()
                .unbind(),
        },
        Value::String(s) => PyString::new(py, s).into_any().unbind(),
        Value::Array(items) => {
            let list = PyList::empty(py);
            for item in items {
                list.append(to_py(py, item)?)?;
            }
            list.into_any().unbind()
        }
        Value::Object(entries) => {
            let dict = PyDict::new(py);
            for (k, v) in entries {
                dict.set_item(k, to_py(py, v)?)?;
            }
            dict.into_any().unbind()
        }
    })
}

/// A serializable record as Python objects.
pub fn record_to_py(py: Python<'_>, record: &impl serde::Serialize) -> PyResult<PyObject> {
    let value = serde_json::to_value(record)
        .map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(e.to_string()))?;
    to_py(py, &value)
}
