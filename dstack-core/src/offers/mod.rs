//! Offers and requirement matching.
//!
//! Cloud capacity comes from [`catalog`]s in gpuhunt's format, filtered with a
//! [`query::QueryFilter`] built from a run's requirements.
//!
//! An [`Offer`] is capacity a backend can provide (for the local backend: this host). A job's
//! [`ResourcesSpec`] matches an offer when every minimum fits in it; on a shared host the job
//! then holds a [`Reservation`] of the minimums (CPUs, memory, whole GPUs), so several jobs run
//! side by side while their minimums add up within the host.

use serde::{Deserialize, Serialize};

pub mod catalog;
pub mod gpus;
pub mod query;

use crate::agent::{GpuInfo, HostInfo};
use crate::config::resources::{CpuArch, GpuSpec, ResourcesSpec};
use crate::model::Reservation;

/// Whether an offer can be used now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Availability {
    /// An existing instance with nothing running.
    Idle,
    /// An existing instance with jobs running (may still have room).
    Busy,
    /// New capacity that can be provisioned.
    Available,
    /// Not available now.
    NotAvailable,
}

/// Capacity a backend can provide.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Offer {
    /// The backend.
    pub backend: String,
    /// The instance type or host name.
    pub instance_type: String,
    /// The region (`local` for this machine).
    pub region: String,
    /// Price per hour in USD.
    pub price: f64,
    /// Spot capacity.
    pub spot: bool,
    /// Resources.
    pub resources: HostInfo,
    /// Availability.
    pub availability: Availability,
    /// The zones the offer is available in (`None`: unknown or not applicable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub availability_zones: Option<Vec<String>>,
    /// Provider-specific data from the catalog.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub backend_data: serde_json::Value,
}

const MIB_PER_GIB: f64 = 1024.0;

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0 * 1024.0)
}

/// Why an offer can never satisfy a spec, or `None` when it can.
pub fn mismatch(spec: &ResourcesSpec, host: &HostInfo) -> Option<String> {
    if let Some(arch) = spec.cpu.arch {
        let want = match arch {
            CpuArch::X86 => "x86",
            CpuArch::Arm => "arm",
        };
        if host.cpu_arch != want {
            return Some(format!(
                "requires {want} CPUs, the host is {}",
                host.cpu_arch
            ));
        }
    }
    let cpus = spec.cpu.count.min.unwrap_or(0);
    if cpus > i64::from(host.cpus) {
        return Some(format!("requires {cpus} CPUs, the host has {}", host.cpus));
    }
    let memory = spec.memory.min.map_or(0.0, |m| m.0);
    if memory > gib(host.memory_bytes) + 1e-9 {
        return Some(format!(
            "requires {memory}GB of memory, the host has {:.1}GB",
            gib(host.memory_bytes)
        ));
    }
    if let Some(disk) = spec.disk.as_ref().and_then(|d| d.size.min) {
        if disk.0 > gib(host.disk_bytes) + 1e-9 {
            return Some(format!(
                "requires {disk} of disk, the host has {:.1}GB",
                gib(host.disk_bytes)
            ));
        }
    }
    if let Some(gpu) = &spec.gpu {
        let wanted = gpu.count.min.unwrap_or(0);
        let matching = host.gpus.iter().filter(|g| gpu_matches(gpu, g)).count() as i64;
        if wanted > matching {
            let what = describe_gpus(gpu);
            return Some(if host.gpus.is_empty() {
                format!("requires {wanted} GPU(s){what}, the host has none")
            } else {
                format!(
                    "requires {wanted} GPU(s){what}, the host has {matching} matching of {}",
                    host.gpus.len()
                )
            });
        }
        if let Some(why) = total_memory_mismatch(gpu, host, wanted) {
            return Some(why);
        }
    }
    None
}

/// Whether the `wanted` matching GPUs of `host` can give the spec's `total_memory` (the sum
/// of their memory, as dstack counts it): the largest of them reach its minimum, the
/// smallest stay within its maximum.
fn total_memory_mismatch(gpu: &GpuSpec, host: &HostInfo, wanted: i64) -> Option<String> {
    let range = gpu.total_memory.as_ref()?;
    let mut sizes: Vec<f64> = host
        .gpus
        .iter()
        .filter(|g| gpu_matches(gpu, g))
        .map(|g| g.memory_mib as f64 / MIB_PER_GIB)
        .collect();
    sizes.sort_by(|a, b| b.total_cmp(a));
    let take = usize::try_from(wanted.max(0)).unwrap_or(usize::MAX);
    let largest: f64 = sizes.iter().take(take).sum();
    let smallest: f64 = sizes.iter().rev().take(take).sum();
    if range.min.is_some_and(|m| largest + 1e-9 < m.0)
        || range.max.is_some_and(|m| smallest > m.0 + 1e-9)
    {
        return Some(format!(
            "requires {wanted} GPU(s) with {range} of memory in all (`total_memory`), the \
             host's give {largest:.0}GB"
        ));
    }
    None
}

fn describe_gpus(gpu: &GpuSpec) -> String {
    let mut parts = Vec::new();
    if let Some(names) = &gpu.name {
        parts.push(names.join(" or "));
    }
    if let Some(m) = &gpu.memory {
        parts.push(format!("{m} memory"));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join(", "))
    }
}

/// Whether one GPU of the host satisfies the spec's per-GPU constraints.
pub fn gpu_matches(spec: &GpuSpec, gpu: &GpuInfo) -> bool {
    if let Some(vendor) = spec.vendor {
        if vendor.as_str() != gpu.vendor {
            return false;
        }
    }
    if let Some(names) = &spec.name {
        if !names.iter().any(|n| n.eq_ignore_ascii_case(&gpu.name)) {
            return false;
        }
    }
    if let Some(memory) = &spec.memory {
        let have = gpu.memory_mib as f64 / MIB_PER_GIB;
        if memory.min.is_some_and(|m| have + 1e-9 < m.0)
            || memory.max.is_some_and(|m| have > m.0 + 1e-9)
        {
            return false;
        }
    }
    // As in the offer catalog: an NVIDIA GPU whose capability is known and high enough.
    if let Some(min) = spec.compute_capability {
        let known = (gpu.vendor == "nvidia")
            .then(|| gpus::compute_capability(&gpu.name))
            .flatten();
        if known.is_none_or(|cc| cc < (min.0, min.1)) {
            return false;
        }
    }
    true
}

/// The reservation a job needs on `host` given what `held` already holds, or `None` if it does
/// not fit right now.
pub fn reserve(spec: &ResourcesSpec, host: &HostInfo, held: &[Reservation]) -> Option<Reservation> {
    // Counts too large for the host's types do not fit (never truncate into a small one).
    let cpus = u32::try_from(spec.cpu.count.min.unwrap_or(0).max(0)).ok()?;
    // A float-to-int `as` saturates: a huge size stays huge.
    let memory_mib = (spec.memory.min.map_or(0.0, |m| m.0) * MIB_PER_GIB).ceil() as u64;
    let used_cpus = held
        .iter()
        .try_fold(cpus, |sum, r| sum.checked_add(r.cpus))?;
    let used_mib = held
        .iter()
        .try_fold(memory_mib, |sum, r| sum.checked_add(r.memory_mib))?;
    let total_mib = host.memory_bytes / (1024 * 1024);
    if used_cpus > host.cpus || used_mib > total_mib {
        return None;
    }
    let mut gpus = Vec::new();
    if let Some(gpu) = &spec.gpu {
        let wanted = usize::try_from(gpu.count.min.unwrap_or(0).max(0)).ok()?;
        let busy: Vec<u32> = held.iter().flat_map(|r| r.gpus.iter().copied()).collect();
        gpus = host
            .gpus
            .iter()
            .filter(|g| !busy.contains(&g.index) && gpu_matches(gpu, g))
            .map(|g| g.index)
            .take(wanted)
            .collect();
        if gpus.len() < wanted {
            return None;
        }
    }
    Some(Reservation {
        cpus,
        memory_mib,
        gpus,
    })
}

/// The reservation a job needs on a host split into `blocks` equal blocks, given what `held`
/// already holds, or `None` if it does not fit right now. A job takes the fewest blocks whose
/// share (CPUs, memory and GPUs divided by `blocks`, times the number taken) matches its
/// requirements, or every block with `whole` (nodes of a multi-node run).
pub fn reserve_blocks(
    spec: &ResourcesSpec,
    host: &HostInfo,
    held: &[Reservation],
    blocks: u32,
    whole: bool,
) -> Option<Reservation> {
    let n = blocks.max(1);
    let total_mib = host.memory_bytes / (1024 * 1024);
    let (cpu_block, mib_block) = (host.cpus / n, total_mib / u64::from(n));
    let gpu_block = host.gpus.len() / n as usize;
    let share = |k: u32| HostInfo {
        cpus: cpu_block * k,
        memory_bytes: mib_block * u64::from(k) * 1024 * 1024,
        gpus: host
            .gpus
            .iter()
            .take(gpu_block * k as usize)
            .cloned()
            .collect(),
        ..host.clone()
    };
    let k = if whole {
        n
    } else {
        (1..=n).find(|&k| mismatch(spec, &share(k)).is_none())?
    };
    let cpus = cpu_block * k;
    let memory_mib = mib_block * u64::from(k);
    let used_cpus: u32 = held.iter().map(|r| r.cpus).sum();
    let used_mib: u64 = held.iter().map(|r| r.memory_mib).sum();
    if used_cpus + cpus > host.cpus || used_mib + memory_mib > total_mib {
        return None;
    }
    let busy: Vec<u32> = held.iter().flat_map(|r| r.gpus.iter().copied()).collect();
    let wanted = gpu_block * k as usize;
    let gpus: Vec<u32> = host
        .gpus
        .iter()
        .filter(|g| !busy.contains(&g.index))
        .filter(|g| spec.gpu.as_ref().is_none_or(|want| gpu_matches(want, g)))
        .map(|g| g.index)
        .take(wanted)
        .collect();
    (gpus.len() == wanted).then_some(Reservation {
        cpus,
        memory_mib,
        gpus,
    })
}

/// How many blocks `blocks:` (`auto`: one per GPU, or per CPU without GPUs) splits `host`
/// into, or why it cannot be split so.
pub fn block_count(blocks: crate::config::fleet::Blocks, host: &HostInfo) -> Result<u32, String> {
    use crate::config::fleet::Blocks;
    let gpus = host.gpus.len() as u32;
    let n = match blocks {
        Blocks::Auto if gpus > 0 => gpus,
        Blocks::Auto => host.cpus.max(1),
        Blocks::Count(n) => u32::try_from(n).unwrap_or(u32::MAX),
    };
    if n == 0 || !host.cpus.is_multiple_of(n) || !gpus.is_multiple_of(n) {
        return Err(format!(
            "cannot split the host into {n} blocks: its CPU count ({}) and GPU count ({gpus}) \
             must both be divisible by it",
            host.cpus
        ));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use crate::config::Configuration;

    fn host(cpus: u32, gib: u64, gpus: &[(&str, u64)]) -> HostInfo {
        HostInfo {
            cpus,
            memory_bytes: gib << 30,
            disk_bytes: 500 << 30,
            cpu_arch: "x86".into(),
            gpus: gpus
                .iter()
                .enumerate()
                .map(|(i, (name, mib))| GpuInfo {
                    index: i as u32,
                    name: name.to_string(),
                    memory_mib: *mib,
                    vendor: "nvidia".into(),
                    uuid: None,
                })
                .collect(),
        }
    }

    fn resources(yaml: &str) -> ResourcesSpec {
        let text = format!("type: task\ncommands: [x]\nresources: {yaml}\n");
        let Configuration::Task(t) = parse(&text, "t").unwrap() else {
            unreachable!()
        };
        t.common.resources.clone()
    }

    #[test]
    fn explains_why_an_offer_never_fits() {
        let h = host(2, 8, &[]);
        assert_eq!(mismatch(&resources("{cpu: 1.., memory: 1GB..}"), &h), None);
        assert_eq!(
            mismatch(&resources("{cpu: 4..}"), &h).unwrap(),
            "requires 4 CPUs, the host has 2"
        );
        assert_eq!(
            mismatch(&resources("{cpu: 1, memory: 1GB.., gpu: 1}"), &h).unwrap(),
            "requires 1 GPU(s), the host has none"
        );
        let g = host(8, 64, &[("A100", 81920), ("T4", 15360)]);
        assert_eq!(mismatch(&resources("{gpu: A100:1}"), &g), None);
        assert!(mismatch(&resources("{gpu: A100:2}"), &g)
            .unwrap()
            .contains("1 matching of 2"));
        assert!(mismatch(&resources("{gpu: 40GB..:1}"), &g).is_none());
    }

    /// `total_memory` and `compute_capability` are checked against the GPUs of an existing
    /// host as against a cloud offer.
    #[test]
    fn total_memory_and_compute_capability_hold_on_existing_hosts() {
        let g = host(8, 64, &[("A100", 81920), ("T4", 15360), ("T4", 15360)]);
        let fits = |yaml: &str| mismatch(&resources(yaml), &g);
        assert_eq!(fits("{gpu: {count: 2, total_memory: 30GB..}}"), None);
        assert_eq!(fits("{gpu: {count: 1, total_memory: 80GB..}}"), None);
        let why = fits("{gpu: {name: T4, count: 2, total_memory: 40GB..}}").unwrap();
        assert!(
            why.contains("`total_memory`") && why.contains("give 30GB"),
            "{why}"
        );
        assert!(fits("{gpu: {name: T4, count: 2, total_memory: ..20GB}}").is_some());
        // A100 is 8.0, T4 7.5.
        assert_eq!(fits("{gpu: {count: 1, compute_capability: 8.0}}"), None);
        let why = fits("{gpu: {count: 2, compute_capability: 8.0}}").unwrap();
        assert!(why.contains("1 matching of 3"), "{why}");
        assert_eq!(fits("{gpu: {count: 3, compute_capability: 7.5}}"), None);
        let unknown = host(8, 64, &[("MysteryGPU", 81920)]);
        assert!(mismatch(
            &resources("{gpu: {count: 1, compute_capability: 7.0}}"),
            &unknown
        )
        .is_some());
    }

    #[test]
    fn reservations_share_a_host_without_over_committing() {
        let h = host(2, 8, &[("T4", 15360), ("T4", 15360)]);
        let spec = resources("{cpu: 1.., memory: 2GB.., gpu: 1}");
        let a = reserve(&spec, &h, &[]).unwrap();
        assert_eq!(
            a,
            Reservation {
                cpus: 1,
                memory_mib: 2048,
                gpus: vec![0]
            }
        );
        let b = reserve(&spec, &h, std::slice::from_ref(&a)).unwrap();
        assert_eq!(b.gpus, vec![1]);
        assert_eq!(reserve(&spec, &h, &[a, b]), None);
    }

    #[test]
    fn counts_beyond_the_hosts_types_never_fit() {
        let h = host(2, 8, &[]);
        let mut spec = resources("{cpu: 1}");
        // 2^32 CPUs: truncated to u32 it would be 0 and fit anywhere.
        spec.cpu.count = crate::config::range::Range::at_least(1 << 32);
        assert_eq!(reserve(&spec, &h, &[]), None);
        let memory = resources("{cpu: 1, memory: 1GB..}");
        let huge = Reservation {
            cpus: u32::MAX,
            memory_mib: u64::MAX,
            gpus: vec![],
        };
        assert_eq!(reserve(&memory, &h, &[huge]), None);
    }

    #[test]
    fn blocks_give_each_job_whole_blocks() {
        let h = host(
            8,
            64,
            &[
                ("A100", 81920),
                ("A100", 81920),
                ("A100", 81920),
                ("A100", 81920),
            ],
        );
        let one_gpu = resources("{cpu: 1.., memory: 1GB.., gpu: 1}");
        // 4 blocks of 2 CPUs, 16 GB, 1 GPU: a 1-GPU job takes one block.
        let first = reserve_blocks(&one_gpu, &h, &[], 4, false).unwrap();
        assert_eq!(
            (first.cpus, first.memory_mib, first.gpus.len()),
            (2, 16 * 1024, 1)
        );
        let two_gpus = resources("{gpu: 2}");
        let second = reserve_blocks(&two_gpus, &h, std::slice::from_ref(&first), 4, false).unwrap();
        assert_eq!((second.cpus, second.gpus.len()), (4, 2));
        assert!(!second.gpus.contains(&first.gpus[0]));
        let held = [first, second];
        assert!(
            reserve_blocks(&two_gpus, &h, &held, 4, false).is_none(),
            "one block left"
        );
        // The default, one block: a job holds the whole host.
        let whole = reserve_blocks(&one_gpu, &h, &[], 1, false).unwrap();
        assert_eq!((whole.cpus, whole.gpus.len()), (8, 4));
        assert!(reserve_blocks(&one_gpu, &h, std::slice::from_ref(&whole), 1, false).is_none());
        assert_eq!(reserve_blocks(&one_gpu, &h, &[], 4, true).unwrap().cpus, 8);
    }

    #[test]
    fn block_counts_must_divide_the_host() {
        use crate::config::fleet::Blocks;
        let h = host(8, 64, &[("A100", 81920), ("A100", 81920)]);
        assert_eq!(block_count(Blocks::Auto, &h), Ok(2));
        assert_eq!(block_count(Blocks::Auto, &host(6, 8, &[])), Ok(6));
        assert_eq!(block_count(Blocks::Count(1), &h), Ok(1));
        assert!(block_count(Blocks::Count(4), &h)
            .unwrap_err()
            .contains("cannot split"));
    }
}
