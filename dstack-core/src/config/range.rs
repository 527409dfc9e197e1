//! `Range` (`N`, `N..`, `..M`, `N..M`, `{min, max}`) and `Memory` (`512MB`, `16GB`, `1TB`).
//!
//! A bare value is an exact range: `cpu: 4` means exactly 4, `memory: 64GB` exactly 64 GB.

use std::fmt;

use serde::Serialize;

use super::de::{scalar_key, Cx, Path};
use super::error::ErrorCode;
use super::yaml::{py_float_repr, Node, NodeKind};

/// An amount of memory in GB (GiB, as dstack counts), stored as a float.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd, Serialize)]
#[serde(transparent)]
pub struct Memory(pub f64);

impl Memory {
    /// Parses `"512MB"`, `"16 Gb"`, `"1 TB "`, `"24"` (GB when no unit).
    pub fn parse_str(s: &str) -> Option<Memory> {
        let lower = s.trim().to_ascii_lowercase();
        let (number, factor) = if let Some(n) = lower.strip_suffix("tb") {
            (n, 1024.0)
        } else if let Some(n) = lower.strip_suffix("gb") {
            (n, 1.0)
        } else if let Some(n) = lower.strip_suffix("mb") {
            (n, 1.0 / 1024.0)
        } else {
            (lower.as_str(), 1.0)
        };
        let number = number.trim();
        let valid = !number.is_empty()
            && number
                .bytes()
                .all(|b| b.is_ascii_digit() || b == b'.' || b == b'-' || b == b'+');
        if !valid {
            return None;
        }
        let v: f64 = number.parse().ok()?;
        v.is_finite().then_some(Memory(v * factor))
    }
}

impl fmt::Display for Memory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let repr = py_float_repr(self.0);
        write!(f, "{}GB", repr.strip_suffix(".0").unwrap_or(&repr))
    }
}

/// A value type that can be a bound of a [`Range`].
pub trait Bound: Copy + PartialOrd + fmt::Display + Serialize {
    /// What the bound is, for messages ("an integer", "a memory size").
    const WHAT: &'static str;
    /// Parses a scalar bound; `Err` carries the reason.
    fn from_node(node: &Node) -> Result<Self, String>;
    /// Parses one side of a `min..max` string.
    fn from_str_bound(s: &str) -> Result<Self, String>;
    /// Whether the value is negative.
    fn is_negative(&self) -> bool;
}

impl Bound for i64 {
    const WHAT: &'static str = "an integer";

    fn from_node(node: &Node) -> Result<Self, String> {
        match &node.kind {
            NodeKind::Int(i) => Ok(*i),
            NodeKind::Float(f) if f.fract() == 0.0 && f.abs() < 9.2e18 => Ok(*f as i64),
            NodeKind::Str(s) => Self::from_str_bound(s),
            _ => Err(format!("expected {}, found {}", Self::WHAT, node.preview())),
        }
    }

    fn from_str_bound(s: &str) -> Result<Self, String> {
        s.trim()
            .parse()
            .map_err(|_| format!("'{}' is not an integer", s.trim()))
    }

    fn is_negative(&self) -> bool {
        *self < 0
    }
}

impl Bound for Memory {
    const WHAT: &'static str = "a memory size";

    fn from_node(node: &Node) -> Result<Self, String> {
        match &node.kind {
            NodeKind::Int(i) => Ok(Memory(*i as f64)),
            NodeKind::Float(f) if f.is_finite() => Ok(Memory(*f)),
            NodeKind::Str(s) => Self::from_str_bound(s),
            _ => Err(format!("expected {}, found {}", Self::WHAT, node.preview())),
        }
    }

    fn from_str_bound(s: &str) -> Result<Self, String> {
        Memory::parse_str(s).ok_or_else(|| {
            format!(
                "'{}' is not a memory size (expected e.g. 512MB, 16GB, 1TB)",
                s.trim()
            )
        })
    }

    fn is_negative(&self) -> bool {
        self.0 < 0.0
    }
}

/// An inclusive range; either side may be open.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Range<T> {
    /// The lower bound, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min: Option<T>,
    /// The upper bound, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max: Option<T>,
}

impl<T: Bound> Range<T> {
    /// `min..` (no upper bound).
    pub fn at_least(min: T) -> Self {
        Range {
            min: Some(min),
            max: None,
        }
    }

    /// Exactly `v`.
    pub fn exact(v: T) -> Self {
        Range {
            min: Some(v),
            max: Some(v),
        }
    }

    /// The intersection of two ranges, or `None` when they do not overlap.
    pub fn intersect(&self, other: &Self) -> Option<Self> {
        let min = match (self.min, other.min) {
            (Some(a), Some(b)) => Some(if a > b { a } else { b }),
            (a, b) => a.or(b),
        };
        let max = match (self.max, other.max) {
            (Some(a), Some(b)) => Some(if a < b { a } else { b }),
            (a, b) => a.or(b),
        };
        match (min, max) {
            (Some(lo), Some(hi)) if lo > hi => None,
            _ => Some(Range { min, max }),
        }
    }

    /// Whether `v` lies inside the range (bounds inclusive).
    pub fn contains(&self, v: T) -> bool {
        self.min.is_none_or(|lo| v >= lo) && self.max.is_none_or(|hi| v <= hi)
    }

    /// Parses the string grammar: `N`, `N..`, `..M`, `N..M`.
    pub fn parse_str(s: &str) -> Result<Self, String> {
        let compact: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        let Some((lo, hi)) = compact.split_once("..") else {
            return T::from_str_bound(s).map(Self::exact);
        };
        if lo.is_empty() && hi.is_empty() {
            return Err("empty range '..'; expected N, N.., ..M or N..M".to_string());
        }
        let min = if lo.is_empty() {
            None
        } else {
            Some(T::from_str_bound(lo)?)
        };
        let max = if hi.is_empty() {
            None
        } else {
            Some(T::from_str_bound(hi)?)
        };
        Ok(Range { min, max })
    }

    /// Checks the order of the bounds and that neither is negative.
    pub fn check(&self) -> Result<(), (ErrorCode, String)> {
        for v in [self.min, self.max].into_iter().flatten() {
            if v.is_negative() {
                return Err((
                    ErrorCode::OutOfRange,
                    format!("must not be negative, got {v}"),
                ));
            }
        }
        if let (Some(lo), Some(hi)) = (self.min, self.max) {
            if lo > hi {
                return Err((
                    ErrorCode::OutOfRange,
                    format!("invalid range order: {self} (the minimum is above the maximum)"),
                ));
            }
        }
        Ok(())
    }
}

impl Range<i64> {
    /// Checks that neither bound is above `limit`, a limit of this parser (dstack sets
    /// none): [`ErrorCode::Limit`] naming it otherwise.
    pub fn check_limit(&self, limit: i64) -> Result<(), (ErrorCode, String)> {
        match [self.min, self.max]
            .into_iter()
            .flatten()
            .find(|v| *v > limit)
        {
            Some(v) => Err((ErrorCode::Limit, above_limit(v, limit))),
            None => Ok(()),
        }
    }
}

/// "must be at most LIMIT (the limit), got V".
pub fn above_limit(v: i64, limit: i64) -> String {
    format!("must be at most {limit} (the limit), got {v}")
}

impl<T: Bound> fmt::Display for Range<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.min, self.max) {
            (Some(a), Some(b)) if a == b => write!(f, "{a}"),
            (a, b) => {
                if let Some(a) = a {
                    write!(f, "{a}")?;
                }
                f.write_str("..")?;
                if let Some(b) = b {
                    write!(f, "{b}")?;
                }
                Ok(())
            }
        }
    }
}

/// Decodes a range from a scalar, a string with `..`, or a `{min, max}` mapping.
pub fn decode_range<T: Bound>(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Range<T>> {
    let parsed = match &node.kind {
        NodeKind::Str(s) => Range::<T>::parse_str(s),
        NodeKind::Int(_) | NodeKind::Float(_) => T::from_node(node).map(Range::exact),
        NodeKind::Map(entries) => {
            let mut range = Range {
                min: None,
                max: None,
            };
            let mut ok = true;
            for (k, v) in entries {
                let key = scalar_key(k);
                let slot = match key.as_str() {
                    "min" => &mut range.min,
                    "max" => &mut range.max,
                    _ => {
                        let message =
                            format!("unknown field `{key}`; a range has only min and max");
                        cx.error(k.mark, &path.key(&key), ErrorCode::UnknownField, message);
                        ok = false;
                        continue;
                    }
                };
                if v.is_null() {
                    continue;
                }
                match T::from_node(v) {
                    Ok(b) => *slot = Some(b),
                    Err(message) => {
                        let code = ErrorCode::InvalidValue;
                        cx.error(
                            v.mark,
                            &path.key(if key == "min" { "min" } else { "max" }),
                            code,
                            message,
                        );
                        ok = false;
                    }
                }
            }
            if !ok {
                return None;
            }
            Ok(range)
        }
        _ => Err(format!(
            "expected {} or a range (N, N.., ..M, N..M), found {}",
            T::WHAT,
            node.type_name()
        )),
    };
    let range = match parsed {
        Ok(r) => r,
        Err(message) => {
            let code = if matches!(
                node.kind,
                NodeKind::Seq(_) | NodeKind::Bool(_) | NodeKind::Null
            ) {
                ErrorCode::InvalidType
            } else {
                ErrorCode::InvalidValue
            };
            cx.error(node.mark, path, code, message);
            return None;
        }
    };
    if let Err((code, message)) = range.check() {
        cx.error(node.mark, path, code, message);
        return None;
    }
    Some(range)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::yaml::load;

    fn range<T: Bound>(text: &str) -> Option<Range<T>> {
        let doc = load(&format!("v: {text}")).unwrap();
        decode_range(doc.get("v").unwrap(), &mut Cx::default(), &Path::ROOT)
    }

    fn r<T>(min: Option<T>, max: Option<T>) -> Option<Range<T>> {
        Some(Range { min, max })
    }

    #[test]
    fn memory_vectors() {
        assert_eq!(Memory::parse_str("512MB"), Some(Memory(0.5)));
        assert_eq!(Memory::parse_str("16 Gb"), Some(Memory(16.0)));
        assert_eq!(Memory::parse_str("1 TB "), Some(Memory(1024.0)));
        assert_eq!(Memory::parse_str("1.5"), Some(Memory(1.5)));
        assert_eq!(Memory::parse_str("1.5xb"), None);
        assert_eq!(Memory::parse_str("GB"), None);
    }

    #[test]
    fn int_range_vectors() {
        assert_eq!(range::<i64>("1"), r(Some(1), Some(1)));
        assert_eq!(range::<i64>("'1'"), r(Some(1), Some(1)));
        assert_eq!(range::<i64>("1.."), r(Some(1), None));
        assert_eq!(range::<i64>("..1"), r(None, Some(1)));
        assert_eq!(range::<i64>("{min: 1, max: 3}"), r(Some(1), Some(3)));
        for bad in ["..", "1...3", "3..1", "{min: 1, mx: 3}", "[1]", "x"] {
            assert_eq!(range::<i64>(bad), None, "{bad}");
        }
    }

    #[test]
    fn memory_range_vectors() {
        let m = |v: f64| Some(Memory(v));
        assert_eq!(range::<Memory>("512MB"), r(m(0.5), m(0.5)));
        assert_eq!(range::<Memory>("512MB.."), r(m(0.5), None));
        assert_eq!(range::<Memory>("..1 TB"), r(None, m(1024.0)));
        assert_eq!(range::<Memory>("512..1 TB"), r(m(512.0), m(1024.0)));
        assert_eq!(
            range::<Memory>("{min: 512MB, max: 1TB}"),
            r(m(0.5), m(1024.0))
        );
        assert_eq!(range::<Memory>("-5GB"), None);
    }

    #[test]
    fn intersection_vectors() {
        let x = |a: Option<i64>, b: Option<i64>| Range { min: a, max: b };
        assert_eq!(x(Some(1), Some(2)).intersect(&x(Some(3), Some(4))), None);
        assert_eq!(
            x(Some(1), Some(2)).intersect(&x(Some(2), Some(3))),
            Some(x(Some(2), Some(2)))
        );
        assert_eq!(
            x(Some(1), Some(3)).intersect(&x(Some(2), Some(4))),
            Some(x(Some(2), Some(3)))
        );
        assert_eq!(
            x(None, Some(1)).intersect(&x(Some(1), None)),
            Some(x(Some(1), Some(1)))
        );
        assert_eq!(
            x(None, Some(1)).intersect(&x(None, Some(2))),
            Some(x(None, Some(1)))
        );
        assert_eq!(
            x(Some(1), None).intersect(&x(None, Some(2))),
            Some(x(Some(1), Some(2)))
        );
    }

    #[test]
    fn displays_like_dstack() {
        assert_eq!(Range::exact(2i64).to_string(), "2");
        assert_eq!(Range::at_least(Memory(8.0)).to_string(), "8GB..");
        assert_eq!(
            Range {
                min: None,
                max: Some(Memory(0.5))
            }
            .to_string(),
            "..0.5GB"
        );
    }
}
