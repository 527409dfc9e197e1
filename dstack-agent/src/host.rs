//! Host detection: CPUs, memory, disk, architecture and NVIDIA GPUs (through `nvidia-smi`).

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use dstack_core::agent::{GpuInfo, HostInfo};

/// How long `nvidia-smi` may take before the host is considered GPU-less.
const NVIDIA_SMI_TIMEOUT: Duration = Duration::from_secs(30);

/// Detects the resources of this host. `disk_of` is a path on the filesystem to measure;
/// `nvidia-smi` is looked for in `search_path` (a `PATH`-style list of directories).
pub(crate) async fn detect(disk_of: &Path, search_path: Option<&OsStr>) -> HostInfo {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let gpus = match search_path.and_then(|path| find_program("nvidia-smi", path)) {
        Some(program) => nvidia_gpus(&program).await,
        None => Vec::new(),
    };
    HostInfo {
        cpus,
        memory_bytes: memory_bytes().unwrap_or(0),
        disk_bytes: disk_bytes(disk_of).unwrap_or(0),
        cpu_arch: cpu_arch(std::env::consts::ARCH).to_string(),
        gpus,
    }
}

fn memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The total size of the filesystem holding `path`.
fn disk_bytes(path: &Path) -> Option<u64> {
    let stat = nix::sys::statvfs::statvfs(path).ok()?;
    Some(stat.blocks() as u64 * stat.fragment_size() as u64)
}

fn cpu_arch(arch: &str) -> &str {
    match arch {
        "x86_64" | "x86" => "x86",
        "aarch64" | "arm" => "arm",
        other => other,
    }
}

/// The first executable file called `name` in the directories of `search_path`.
fn find_program(name: &str, search_path: &OsStr) -> Option<PathBuf> {
    std::env::split_paths(search_path)
        .map(|dir| dir.join(name))
        .find(|path| {
            path.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The GPUs `program` (an `nvidia-smi`) reports; none if it fails.
async fn nvidia_gpus(program: &Path) -> Vec<GpuInfo> {
    let output = tokio::process::Command::new(program)
        .args([
            "--query-gpu=index,name,memory.total,uuid",
            "--format=csv,noheader,nounits",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(NVIDIA_SMI_TIMEOUT, output).await {
        Ok(Ok(out)) if out.status.success() => {
            parse_nvidia_smi(&String::from_utf8_lossy(&out.stdout))
        }
        _ => Vec::new(),
    }
}

/// Parses `index, name, memory.total, uuid` CSV lines; malformed lines are skipped.
fn parse_nvidia_smi(csv: &str) -> Vec<GpuInfo> {
    csv.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            let [index, name @ .., memory, uuid] = fields.as_slice() else {
                return None;
            };
            let uuid = (!uuid.is_empty() && !uuid.starts_with('[')).then(|| uuid.to_string());
            Some(GpuInfo {
                index: index.parse().ok()?,
                name: normalize_gpu_name(&name.join(",")),
                memory_mib: memory.parse().ok()?,
                vendor: "nvidia".to_string(),
                uuid,
            })
        })
        .collect()
}

/// Shortens an `nvidia-smi` GPU name the way dstack does (`NVIDIA A100-SXM4-80GB` → `A100`,
/// `NVIDIA GeForce RTX 4060 Ti` → `RTX4060Ti`, …).
fn normalize_gpu_name(raw: &str) -> String {
    let mut name = raw.trim().to_string();
    for vendor_prefix in ["NVIDIA ", "Tesla ", "Quadro ", "GeForce "] {
        name = name.replace(vendor_prefix, "");
    }
    if name.contains("GH200") {
        return "GH200".to_string();
    }
    if name.contains("RTX A") {
        let name = name.replace("RTX A", "A");
        return model(&name, b"A", false).unwrap_or_else(|| name.replace(' ', ""));
    }
    let name = upper_super(&name.replace(" Ti", "Ti"))
        .replace(" NVL", "NVL")
        .replace(" Ada Generation", "Ada")
        .replace("RTX ", "RTX");
    model(&name, b"AHLPTV", true).unwrap_or_else(|| name.replace(' ', ""))
}

/// The first model token of `name`: one of `letters`, digits, then (with `suffix`) any word
/// characters, like the regex `[letters]\d+\w*`.
fn model(name: &str, letters: &[u8], suffix: bool) -> Option<String> {
    let bytes = name.as_bytes();
    let start = (0..bytes.len().saturating_sub(1))
        .find(|&i| letters.contains(&bytes[i]) && bytes[i + 1].is_ascii_digit())?;
    let word = |b: &u8| b.is_ascii_alphanumeric() || *b == b'_';
    let digits = bytes[start + 1..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    let end = start + 1 + digits;
    let end = if suffix {
        end + bytes[end..].iter().take_while(|b| word(b)).count()
    } else {
        end
    };
    Some(name[start..end].to_string())
}

/// Replaces every `super` (any case, with the space before it if any) by `SUPER`.
fn upper_super(name: &str) -> String {
    let lower = name.to_ascii_lowercase();
    let mut out = String::with_capacity(name.len());
    let mut last = 0;
    for (i, _) in lower.match_indices("super") {
        let start = if i > last && lower.as_bytes()[i - 1] == b' ' {
            i - 1
        } else {
            i
        };
        out.push_str(&name[last..start]);
        out.push_str("SUPER");
        last = i + "super".len();
    }
    out.push_str(&name[last..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_names_are_normalized_like_dstack() {
        let vectors = [
            ("NVIDIA A100-SXM4-80GB", "A100"),
            ("NVIDIA GeForce RTX 4060 Ti", "RTX4060Ti"),
            ("NVIDIA RTX 4000 Ada Generation", "RTX4000Ada"),
            ("NVIDIA L4", "L4"),
            ("NVIDIA GH200 120GB", "GH200"),
            ("NVIDIA A10G", "A10G"),
            ("NVIDIA L40S", "L40S"),
            ("NVIDIA H100 NVL", "H100NVL"),
            ("NVIDIA H100 80GB HBM3", "H100"),
            ("Tesla T4", "T4"),
            ("NVIDIA GeForce RTX 2070 Super", "RTX2070SUPER"),
            ("NVIDIA GeForce RTX 4070 Ti SUPER", "RTX4070TiSUPER"),
            ("NVIDIA RTX A6000", "A6000"),
            ("Tesla V100-SXM2-16GB", "V100"),
            ("NVIDIA GeForce RTX 3090", "RTX3090"),
        ];
        for (raw, expected) in vectors {
            assert_eq!(normalize_gpu_name(raw), expected, "{raw}");
        }
    }

    #[test]
    fn nvidia_smi_csv_is_parsed() {
        let gpus = parse_nvidia_smi(
            "0, NVIDIA A100-SXM4-80GB, 81920, GPU-abc\n1, Tesla T4, 15360, [N/A]\nbogus\n",
        );
        assert_eq!(gpus.len(), 2);
        assert_eq!(
            gpus[0],
            GpuInfo {
                index: 0,
                name: "A100".into(),
                memory_mib: 81920,
                vendor: "nvidia".into(),
                uuid: Some("GPU-abc".into()),
            }
        );
        assert_eq!((gpus[1].index, gpus[1].name.as_str()), (1, "T4"));
        assert_eq!(gpus[1].uuid, None);
    }

    #[test]
    fn architectures_are_named_like_dstack() {
        assert_eq!(cpu_arch("x86_64"), "x86");
        assert_eq!(cpu_arch("aarch64"), "arm");
    }

    #[tokio::test]
    async fn fake_nvidia_smi_is_used_and_a_missing_one_means_no_gpus() {
        let bin = tempfile::tempdir().unwrap();
        let script = bin.path().join("nvidia-smi");
        std::fs::write(
            &script,
            "#!/bin/sh\n[ \"$1\" = --query-gpu=index,name,memory.total,uuid ] || exit 2\n\
             printf '0, NVIDIA A100-SXM4-80GB, 81920, GPU-abc\\n1, NVIDIA A100-SXM4-80GB, 81920, GPU-def\\n'\n",
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();

        let host = detect(bin.path(), Some(bin.path().as_os_str())).await;
        let gpus: Vec<_> = host
            .gpus
            .iter()
            .map(|g| (g.index, g.name.as_str(), g.memory_mib))
            .collect();
        assert_eq!(gpus, [(0, "A100", 81920), (1, "A100", 81920)]);
        assert_eq!(host.gpus[1].uuid.as_deref(), Some("GPU-def"));
        assert!(host.cpus >= 1 && host.memory_bytes > 0 && host.disk_bytes > 0);

        let empty = tempfile::tempdir().unwrap();
        let host = detect(empty.path(), Some(empty.path().as_os_str())).await;
        assert!(host.gpus.is_empty());
    }
}
