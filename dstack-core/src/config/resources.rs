//! `resources:` — CPU (`x86:2..`), memory, shared memory, GPU (`A100:80GB:2`) and disk.

use serde::{Serialize, Serializer};

use super::de::{string_enum, Cx, Decode, Fields, Path};
use super::error::ErrorCode;
use super::limits;
use super::range::{decode_range, Memory, Range};
use super::yaml::{Node, NodeKind};

string_enum! {
    /// A CPU architecture.
    CpuArch { X86 = "x86", Arm = "arm" }
}

string_enum! {
    /// An accelerator vendor.
    AcceleratorVendor {
        Nvidia = "nvidia", Amd = "amd", Google = "google", Intel = "intel",
        Tenstorrent = "tenstorrent",
    }
}

impl AcceleratorVendor {
    /// Parses a vendor name case-insensitively, with the aliases `tpu` (Google) and `tt`.
    pub fn parse_alias(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "tpu" => Some(AcceleratorVendor::Google),
            "tt" => Some(AcceleratorVendor::Tenstorrent),
            other => Self::parse(other),
        }
    }
}

/// `cpu:` — an optional architecture and a count range (default `2..`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CpuSpec {
    /// The architecture, if constrained.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arch: Option<CpuArch>,
    /// How many vCPUs.
    pub count: Range<i64>,
}

impl Default for CpuSpec {
    fn default() -> Self {
        CpuSpec {
            arch: None,
            count: Range::at_least(2),
        }
    }
}

impl CpuSpec {
    /// Parses the string grammar: tokens split on `:`, each a count or an architecture.
    pub fn parse_str(s: &str) -> Result<Self, String> {
        let compact: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        let mut arch = None;
        let mut count = None;
        for token in compact.split(':') {
            if token.is_empty() {
                return Err(format!("empty token in CPU spec '{s}'"));
            }
            if token.contains("..") || token.bytes().all(|b| b.is_ascii_digit()) {
                if count.is_some() {
                    return Err(format!("CPU count conflict in '{s}': two counts given"));
                }
                count = Some(Range::<i64>::parse_str(token)?);
            } else {
                let Some(a) = CpuArch::parse(&token.to_ascii_lowercase()) else {
                    return Err(format!(
                        "invalid CPU architecture '{token}'; expected x86 or arm, or a count"
                    ));
                };
                if arch.is_some() {
                    return Err(format!(
                        "CPU arch conflict in '{s}': two architectures given"
                    ));
                }
                arch = Some(a);
            }
        }
        Ok(CpuSpec {
            arch,
            count: count.unwrap_or_else(|| CpuSpec::default().count),
        })
    }
}

impl Decode for CpuSpec {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        let spec = match &node.kind {
            NodeKind::Int(_) => CpuSpec {
                arch: None,
                count: decode_range(node, cx, path)?,
            },
            NodeKind::Str(s) => match CpuSpec::parse_str(s) {
                Ok(spec) => spec,
                Err(message) => {
                    cx.invalid(node, path, message);
                    return None;
                }
            },
            NodeKind::Map(_) if node.get("arch").is_none() && node.get("count").is_none() => {
                // Back-compat: `{min, max}` is a count range; `{}` keeps the defaults.
                if node.as_map().is_some_and(|m| m.is_empty()) {
                    CpuSpec::default()
                } else {
                    CpuSpec {
                        arch: None,
                        count: decode_range(node, cx, path)?,
                    }
                }
            }
            NodeKind::Map(_) => {
                let mut f = Fields::new(node, cx, path, "CPU spec")?;
                let arch = f.opt_with(cx, path, "arch", |n, cx, p| {
                    let text = String::decode(n, cx, p)?;
                    let arch = CpuArch::parse(&text.to_ascii_lowercase());
                    if arch.is_none() {
                        cx.invalid(
                            n,
                            p,
                            format!("invalid CPU architecture '{text}'; expected x86 or arm"),
                        );
                    }
                    arch
                });
                let count = f.or_with(cx, path, "count", || CpuSpec::default().count, decode_range);
                f.finish(cx, path);
                CpuSpec {
                    arch,
                    count: count?,
                }
            }
            _ => {
                cx.expected(
                    node,
                    path,
                    "a CPU spec (a count such as 4 or 2.., or arch:count such as x86:2..)",
                );
                return None;
            }
        };
        let checked = spec.count.check();
        if let Err((code, message)) =
            checked.and_then(|()| spec.count.check_limit(limits::MAX_CPU_COUNT))
        {
            cx.error(node.mark, path, code, message);
            return None;
        }
        Some(spec)
    }
}

/// A minimum CUDA compute capability, `major.minor`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ComputeCapability(pub u32, pub u32);

impl ComputeCapability {
    /// Parses `"7.5"`.
    pub fn parse_str(s: &str) -> Option<Self> {
        let (major, minor) = s.trim().split_once('.')?;
        Some(ComputeCapability(major.parse().ok()?, minor.parse().ok()?))
    }
}

impl Serialize for ComputeCapability {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (self.0, self.1).serialize(s)
    }
}

impl Decode for ComputeCapability {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        let parsed = match &node.kind {
            NodeKind::Str(s) => ComputeCapability::parse_str(s),
            NodeKind::Float(f) => ComputeCapability::parse_str(&super::yaml::py_float_repr(*f)),
            NodeKind::Int(i) => u32::try_from(*i).ok().map(|m| ComputeCapability(m, 0)),
            NodeKind::Seq(items) if items.len() == 2 => match (&items[0].kind, &items[1].kind) {
                (NodeKind::Int(a), NodeKind::Int(b)) => Some(ComputeCapability(
                    u32::try_from(*a).ok()?,
                    u32::try_from(*b).ok()?,
                )),
                _ => None,
            },
            _ => None,
        };
        if parsed.is_none() {
            cx.invalid(
                node,
                path,
                format!(
                    "invalid compute capability {}; expected e.g. \"7.5\"",
                    node.preview()
                ),
            );
        }
        parsed
    }
}

/// `gpu:` — vendor, names, count, per-GPU memory, total memory, compute capability.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GpuSpec {
    /// The vendor, if constrained.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vendor: Option<AcceleratorVendor>,
    /// Acceptable GPU names (any of them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<Vec<String>>,
    /// How many GPUs (default `1..` once a GPU spec is given).
    pub count: Range<i64>,
    /// Memory per GPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<Range<Memory>>,
    /// Memory summed over all GPUs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_memory: Option<Range<Memory>>,
    /// Minimum compute capability.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compute_capability: Option<ComputeCapability>,
}

impl GpuSpec {
    /// The spec used when `gpu` is not given: GPUs optional (`0..`).
    pub fn optional() -> Self {
        GpuSpec {
            count: Range::at_least(0),
            ..GpuSpec::any()
        }
    }

    /// An explicit spec without constraints: at least one GPU.
    fn any() -> Self {
        GpuSpec {
            vendor: None,
            name: None,
            count: Range::at_least(1),
            memory: None,
            total_memory: None,
            compute_capability: None,
        }
    }

    /// Parses the string grammar `vendor:name[,name]:memory:count` (tokens in any order).
    pub fn parse_str(s: &str) -> Result<Self, String> {
        let compact: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        let mut spec = GpuSpec::any();
        let (mut names, mut memory, mut count) = (None, None, None);
        for token in compact.split(':') {
            if token.is_empty() {
                return Err(format!("empty token in GPU spec '{s}'"));
            }
            if let Some(vendor) = AcceleratorVendor::parse_alias(token) {
                if spec.vendor.is_some() {
                    return Err(format!("GPU vendor conflict in '{s}': two vendors given"));
                }
                spec.vendor = Some(vendor);
            } else if token.as_bytes()[0].is_ascii_alphabetic() {
                if names.is_some() {
                    return Err(format!("GPU name conflict in '{s}': two name lists given"));
                }
                names = Some(parse_gpu_names(token.split(','))?);
            } else if token.bytes().any(|b| b.is_ascii_alphabetic()) {
                if memory.is_some() {
                    return Err(format!(
                        "GPU memory conflict in '{s}': two memory sizes given"
                    ));
                }
                memory = Some(Range::<Memory>::parse_str(token)?);
            } else {
                if count.is_some() {
                    return Err(format!("GPU count conflict in '{s}': two counts given"));
                }
                count = Some(Range::<i64>::parse_str(token)?);
            }
        }
        spec.name = names;
        spec.memory = memory;
        if let Some(count) = count {
            spec.count = count;
        }
        Ok(spec)
    }
}

/// Validates names and strips the deprecated `tpu-` prefix.
fn parse_gpu_names<'a>(names: impl Iterator<Item = &'a str>) -> Result<Vec<String>, String> {
    names
        .map(|n| {
            if n.is_empty() {
                return Err("empty GPU name in the name list".to_string());
            }
            Ok(n.strip_prefix("tpu-").unwrap_or(n).to_string())
        })
        .collect()
}

impl Decode for GpuSpec {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        let spec = match &node.kind {
            NodeKind::Int(_) => GpuSpec {
                count: decode_range(node, cx, path)?,
                ..GpuSpec::any()
            },
            NodeKind::Str(s) => match GpuSpec::parse_str(s) {
                Ok(spec) => spec,
                Err(message) => {
                    cx.invalid(node, path, message);
                    return None;
                }
            },
            NodeKind::Map(_) => decode_gpu_mapping(node, cx, path)?,
            _ => {
                cx.expected(
                    node,
                    path,
                    "a GPU spec (e.g. A100:80GB:2, 24GB.., 1..4, nvidia:2)",
                );
                return None;
            }
        };
        for (range_path, check) in [
            (
                "count",
                spec.count
                    .check()
                    .and_then(|()| spec.count.check_limit(limits::MAX_GPU_COUNT)),
            ),
            ("memory", spec.memory.map_or(Ok(()), |m| m.check())),
            (
                "total_memory",
                spec.total_memory.map_or(Ok(()), |m| m.check()),
            ),
        ] {
            if let Err((code, message)) = check {
                let p = if matches!(node.kind, NodeKind::Map(_)) {
                    path.key(range_path)
                } else {
                    *path
                };
                cx.error(node.mark, &p, code, message);
                return None;
            }
        }
        Some(spec)
    }
}

fn decode_gpu_mapping(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<GpuSpec> {
    let mut f = Fields::new(node, cx, path, "GPU spec")?;
    let before = cx.error_count();
    let vendor = f.opt_with(cx, path, "vendor", |n, cx, p| {
        let text = String::decode(n, cx, p)?;
        let vendor = AcceleratorVendor::parse_alias(&text);
        if vendor.is_none() {
            let allowed = AcceleratorVendor::ALL;
            cx.invalid(n, p, super::de::one_of_message(&text, allowed));
        }
        vendor
    });
    let name = f.opt_with(cx, path, "name", |n, cx, p| {
        let names: Vec<String> = match &n.kind {
            NodeKind::Seq(_) => Vec::<String>::decode(n, cx, p)?,
            _ => vec![String::decode(n, cx, p)?],
        };
        match parse_gpu_names(names.iter().map(String::as_str)) {
            Ok(names) => Some(names),
            Err(message) => {
                cx.invalid(n, p, message);
                None
            }
        }
    });
    let count = f.or_with(cx, path, "count", || Range::at_least(1), decode_range);
    let memory = f.opt_with(cx, path, "memory", decode_range::<Memory>);
    let total_memory = f.opt_with(cx, path, "total_memory", decode_range::<Memory>);
    let compute_capability = f.opt(cx, path, "compute_capability");
    f.finish(cx, path);
    if cx.error_count() > before {
        return None;
    }
    Some(GpuSpec {
        vendor,
        name,
        count: count?,
        memory,
        total_memory,
        compute_capability,
    })
}

/// `disk:` — the size range of the instance disk.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DiskSpec {
    /// Size in GB.
    pub size: Range<Memory>,
}

impl Default for DiskSpec {
    fn default() -> Self {
        DiskSpec {
            size: Range::at_least(Memory(100.0)),
        }
    }
}

impl Decode for DiskSpec {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        if let NodeKind::Map(_) = node.kind {
            if node.get("size").is_some() || node.get("min").is_none() && node.get("max").is_none()
            {
                let mut f = Fields::new(node, cx, path, "disk spec")?;
                let size = f.req_with(cx, path, "size", decode_range);
                f.finish(cx, path);
                return Some(DiskSpec { size: size? });
            }
        }
        Some(DiskSpec {
            size: decode_range(node, cx, path)?,
        })
    }
}

/// `resources:` of a run, a node or replica group, or a fleet.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ResourcesSpec {
    /// CPU requirements.
    pub cpu: CpuSpec,
    /// RAM in GB.
    pub memory: Range<Memory>,
    /// Shared memory size (`/dev/shm`) in GB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shm_size: Option<Memory>,
    /// GPU requirements; `None` when explicitly `null`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuSpec>,
    /// Disk requirements; `None` when explicitly `null` (no constraint).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskSpec>,
}

impl Default for ResourcesSpec {
    fn default() -> Self {
        ResourcesSpec {
            cpu: CpuSpec::default(),
            memory: Range::at_least(Memory(8.0)),
            shm_size: None,
            gpu: Some(GpuSpec::optional()),
            disk: Some(DiskSpec::default()),
        }
    }
}

impl Decode for ResourcesSpec {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        let mut f = Fields::new(node, cx, path, "resources")?;
        let d = ResourcesSpec::default();
        let cpu = f.or(cx, path, "cpu", || d.cpu.clone());
        let memory = f.or_with(cx, path, "memory", || d.memory, decode_range);
        let shm_size = f.opt_with(cx, path, "shm_size", decode_memory);
        let gpu = nullable(&mut f, cx, path, "gpu", GpuSpec::optional);
        let disk = nullable(&mut f, cx, path, "disk", DiskSpec::default);
        f.finish(cx, path);
        Some(ResourcesSpec {
            cpu: cpu?,
            memory: memory?,
            shm_size,
            gpu: gpu?,
            disk: disk?,
        })
    }
}

/// A field whose absence means `default()` and whose explicit `null` means "none".
fn nullable<T: Decode>(
    f: &mut Fields<'_>,
    cx: &mut Cx,
    path: &Path<'_>,
    key: &'static str,
    default: impl FnOnce() -> T,
) -> Option<Option<T>> {
    match f.take(key) {
        None => Some(Some(default())),
        Some(n) if n.is_null() => Some(None),
        Some(n) => T::decode(n, cx, &path.key(key)).map(Some),
    }
}

/// Decodes a single memory size (not a range); negatives are rejected.
pub fn decode_memory(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Memory> {
    use super::range::Bound;
    match Memory::from_node(node) {
        Ok(m) if m.0 < 0.0 => {
            cx.error(
                node.mark,
                path,
                ErrorCode::OutOfRange,
                format!("must not be negative, got {m}"),
            );
            None
        }
        Ok(m) => Some(m),
        Err(message) => {
            cx.invalid(node, path, message);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::yaml::load;

    fn decode<T: Decode>(text: &str) -> Result<T, String> {
        let doc = load(&format!("v: {text}")).unwrap();
        let mut cx = Cx::default();
        let v = T::decode(doc.get("v").unwrap(), &mut cx, &Path::ROOT);
        match v {
            Some(v) if !cx.has_errors() => Ok(v),
            _ => Err(cx
                .into_errors()
                .into_iter()
                .map(|e| e.message)
                .collect::<Vec<_>>()
                .join("; ")),
        }
    }

    fn cpu(arch: Option<CpuArch>, min: Option<i64>, max: Option<i64>) -> Result<CpuSpec, String> {
        Ok(CpuSpec {
            arch,
            count: Range { min, max },
        })
    }

    #[test]
    fn cpu_vectors() {
        use CpuArch::*;
        assert_eq!(decode::<CpuSpec>("1"), cpu(None, Some(1), Some(1)));
        assert_eq!(decode::<CpuSpec>("1..2"), cpu(None, Some(1), Some(2)));
        assert_eq!(decode::<CpuSpec>("X86"), cpu(Some(X86), Some(2), None));
        assert_eq!(decode::<CpuSpec>("x86:2"), cpu(Some(X86), Some(2), Some(2)));
        assert_eq!(
            decode::<CpuSpec>("'2..:ARM'"),
            cpu(Some(Arm), Some(2), None)
        );
        assert_eq!(
            decode::<CpuSpec>("{min: 1, max: 2}"),
            cpu(None, Some(1), Some(2))
        );
        assert_eq!(decode::<CpuSpec>("{min: 1}"), cpu(None, Some(1), None));
        assert_eq!(decode::<CpuSpec>("{max: 2}"), cpu(None, None, Some(2)));
        assert_eq!(decode::<CpuSpec>("{}"), cpu(None, Some(2), None));
        assert_eq!(
            decode::<CpuSpec>("{arch: ARM, count: {min: 1, max: 2}}"),
            cpu(Some(Arm), Some(1), Some(2))
        );
        assert_eq!(
            decode::<CpuSpec>("{count: {max: 2}}"),
            cpu(None, None, Some(2))
        );
        assert!(decode::<CpuSpec>("{arch: x86, min: 1, max: 2}").is_err());
        assert_eq!(
            decode::<CpuSpec>("'arm:'").unwrap_err(),
            "empty token in CPU spec 'arm:'"
        );
        assert_eq!(
            decode::<CpuSpec>("'2:foo'").unwrap_err(),
            "invalid CPU architecture 'foo'; expected x86 or arm, or a count"
        );
        assert!(decode::<CpuSpec>("arm:x86")
            .unwrap_err()
            .contains("arch conflict"));
        assert!(decode::<CpuSpec>("'2:arm:2'")
            .unwrap_err()
            .contains("count conflict"));
        assert!(decode::<CpuSpec>("4..2")
            .unwrap_err()
            .contains("invalid range order"));
    }

    fn gpu(text: &str) -> GpuSpec {
        decode::<GpuSpec>(text).unwrap()
    }

    #[test]
    fn gpu_vectors() {
        use AcceleratorVendor::*;
        let g = gpu("A100:80GB:2");
        assert_eq!(g.name, Some(vec!["A100".to_string()]));
        assert_eq!(g.memory, Some(Range::exact(Memory(80.0))));
        assert_eq!(g.count, Range::exact(2));
        let g = gpu("24GB..");
        assert_eq!(
            (g.memory, g.count),
            (Some(Range::at_least(Memory(24.0))), Range::at_least(1))
        );
        let g = gpu("H100,A100:8");
        assert_eq!(g.name, Some(vec!["H100".into(), "A100".into()]));
        assert_eq!(g.count, Range::exact(8));
        let g = gpu("nvidia:2");
        assert_eq!((g.vendor, g.count), (Some(Nvidia), Range::exact(2)));
        assert_eq!(
            gpu("1..4").count,
            Range {
                min: Some(1),
                max: Some(4)
            }
        );
        assert_eq!(
            gpu("'1'"),
            GpuSpec {
                count: Range::exact(1),
                ..GpuSpec::any()
            }
        );
        assert_eq!(gpu("Nvidia").vendor, Some(Nvidia));
        let g = gpu("google:v3-64");
        assert_eq!(
            (g.vendor, g.name),
            (Some(Google), Some(vec!["v3-64".into()]))
        );
        assert_eq!(gpu("tpu:v5p-1024").vendor, Some(Google));
        assert_eq!(gpu("v5litepod-64:TPU").vendor, Some(Google));
        let g = gpu("MI300X:AMD");
        assert_eq!((g.vendor, g.name), (Some(Amd), Some(vec!["MI300X".into()])));
        for (v, want) in [
            ("NVIDIA", Nvidia),
            ("amd", Amd),
            ("Google", Google),
            ("tpu", Google),
            ("TPU", Google),
        ] {
            assert_eq!(gpu(&format!("{{vendor: {v}}}")).vendor, Some(want));
        }
        let g = gpu("tpu-v3-2048");
        assert_eq!((g.vendor, g.name), (None, Some(vec!["v3-2048".into()])));
        assert_eq!(gpu("16GB").memory, Some(Range::exact(Memory(16.0))));
        assert_eq!(
            gpu("A10,A10G:2").name,
            Some(vec!["A10".into(), "A10G".into()])
        );
        assert_eq!(
            gpu("16GB..32").memory,
            Some(Range {
                min: Some(Memory(16.0)),
                max: Some(Memory(32.0))
            })
        );
        assert_eq!(gpu("0").count, Range::exact(0));
        assert_eq!(
            decode::<GpuSpec>("'A100,:2'").unwrap_err(),
            "empty GPU name in the name list"
        );
        assert_eq!(
            decode::<GpuSpec>("'A100:'").unwrap_err(),
            "empty token in GPU spec 'A100:'"
        );
        assert!(decode::<GpuSpec>("Nvidia:A100:2:AMD")
            .unwrap_err()
            .contains("vendor conflict"));
        assert!(decode::<GpuSpec>("'A100:2:3'")
            .unwrap_err()
            .contains("count conflict"));
        assert!(decode::<GpuSpec>("8..1")
            .unwrap_err()
            .contains("invalid range order"));
    }

    #[test]
    fn compute_capability_vectors() {
        assert_eq!(
            decode::<ComputeCapability>("'3.5'"),
            Ok(ComputeCapability(3, 5))
        );
        assert_eq!(
            decode::<ComputeCapability>("8.0"),
            Ok(ComputeCapability(8, 0))
        );
        assert_eq!(
            decode::<ComputeCapability>("[7, 5]"),
            Ok(ComputeCapability(7, 5))
        );
        assert!(decode::<ComputeCapability>("3.5.1").is_err());
        assert!(decode::<ComputeCapability>("3.x").is_err());
    }

    #[test]
    fn resources_defaults_and_nulls() {
        let r = decode::<ResourcesSpec>("{}").unwrap();
        assert_eq!(r, ResourcesSpec::default());
        let r = decode::<ResourcesSpec>("{gpu: null, disk: null}").unwrap();
        assert_eq!((r.gpu, r.disk), (None, None));
        assert_eq!(
            decode::<ResourcesSpec>("{cpu: null}").unwrap_err(),
            "must not be null"
        );
        let r = decode::<ResourcesSpec>("{disk: 200GB.., shm_size: 16GB}").unwrap();
        assert_eq!(r.disk.unwrap().size, Range::at_least(Memory(200.0)));
        assert_eq!(r.shm_size, Some(Memory(16.0)));
    }
}
