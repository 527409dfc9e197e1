//! What a job asks of a catalog: the [`QueryFilter`] built from its requirements, and
//! gpuhunt's matching rules (inclusive bounds; GPU filters skipped for CPU-only items when GPUs
//! are optional; disk checked only when the item knows its disk; flagged items hidden unless
//! their flags are allowed).

use crate::config::profile::SpotPolicy;
use crate::config::resources::{CpuArch, ResourcesSpec};
use crate::config::run::RunCommon;

use super::catalog::CatalogItem;
use super::gpus;

/// The flags this version asks for: items carrying any other flag stay hidden, as dstack's.
pub const ALLOWED_FLAGS: &[&str] = &[
    "oci-spot",
    "lambda-arm",
    "gcp-a4",
    "gcp-g4",
    "gcp-dws-calendar-mode",
    "runpod-cpu",
    "runpod-cluster",
];

/// Constraints on catalog items; `None` leaves a field unconstrained. Sizes are in GB.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QueryFilter {
    /// `x86` or `arm`.
    pub cpu_arch: Option<String>,
    /// CPU count bounds.
    pub min_cpu: Option<f64>,
    /// See `min_cpu`.
    pub max_cpu: Option<f64>,
    /// RAM bounds.
    pub min_memory: Option<f64>,
    /// See `min_memory`.
    pub max_memory: Option<f64>,
    /// GPU count bounds.
    pub min_gpu_count: Option<f64>,
    /// See `min_gpu_count`.
    pub max_gpu_count: Option<f64>,
    /// Accelerator vendor (lower case).
    pub gpu_vendor: Option<String>,
    /// Acceptable GPU names (compared case-insensitively).
    pub gpu_name: Option<Vec<String>>,
    /// Memory per GPU bounds.
    pub min_gpu_memory: Option<f64>,
    /// See `min_gpu_memory`.
    pub max_gpu_memory: Option<f64>,
    /// Memory over all GPUs bounds.
    pub min_total_gpu_memory: Option<f64>,
    /// See `min_total_gpu_memory`.
    pub max_total_gpu_memory: Option<f64>,
    /// Disk bounds (only for items that state their disk).
    pub min_disk_size: Option<f64>,
    /// See `min_disk_size`.
    pub max_disk_size: Option<f64>,
    /// Price bounds, $/hour.
    pub min_price: Option<f64>,
    /// See `min_price`.
    pub max_price: Option<f64>,
    /// Minimum NVIDIA compute capability.
    pub min_compute_capability: Option<(u32, u32)>,
    /// Spot (`true`), on-demand (`false`) or both (`None`).
    pub spot: Option<bool>,
    /// Items with other flags are excluded; `None` allows every flag.
    pub allowed_flags: Option<Vec<String>>,
}

fn between(value: f64, min: Option<f64>, max: Option<f64>) -> bool {
    !(min.is_some_and(|m| value < m) || max.is_some_and(|m| value > m))
}

impl QueryFilter {
    /// The filter for a job's resources, spot choice and price limit, as dstack builds it.
    pub fn from_requirements(
        resources: &ResourcesSpec,
        spot: Option<bool>,
        max_price: Option<f64>,
    ) -> QueryFilter {
        let mut q = QueryFilter {
            cpu_arch: resources.cpu.arch.map(|a| match a {
                CpuArch::X86 => "x86".to_string(),
                CpuArch::Arm => "arm".to_string(),
            }),
            min_cpu: resources.cpu.count.min.map(|c| c as f64),
            max_cpu: resources.cpu.count.max.map(|c| c as f64),
            min_memory: resources.memory.min.map(|m| m.0),
            max_memory: resources.memory.max.map(|m| m.0),
            min_gpu_count: Some(0.0),
            spot,
            max_price,
            allowed_flags: Some(ALLOWED_FLAGS.iter().map(|f| f.to_string()).collect()),
            ..QueryFilter::default()
        };
        if let Some(disk) = &resources.disk {
            q.min_disk_size = disk.size.min.map(|m| m.0);
            q.max_disk_size = disk.size.max.map(|m| m.0);
        }
        if let Some(gpu) = &resources.gpu {
            q.gpu_vendor = gpu.vendor.map(|v| v.as_str().to_string());
            q.gpu_name = gpu.name.clone();
            q.min_gpu_count = Some(gpu.count.min.unwrap_or(0) as f64);
            q.max_gpu_count = gpu.count.max.map(|c| c as f64);
            if let Some(m) = &gpu.memory {
                q.min_gpu_memory = m.min.map(|v| v.0);
                q.max_gpu_memory = m.max.map(|v| v.0);
            }
            if let Some(m) = &gpu.total_memory {
                q.min_total_gpu_memory = m.min.map(|v| v.0);
                q.max_total_gpu_memory = m.max.map(|v| v.0);
            }
            q.min_compute_capability = gpu.compute_capability.map(|c| (c.0, c.1));
        }
        q
    }

    /// The filter for a run: its resources with dstack's default GPU vendor (NVIDIA when no
    /// names are given and the default image is used; else the one vendor its names imply),
    /// its spot policy (default on-demand) and `max_price`.
    pub fn for_run(common: &RunCommon) -> QueryFilter {
        let spot = match common.profile.spot_policy.unwrap_or(SpotPolicy::OnDemand) {
            SpotPolicy::Spot => Some(true),
            SpotPolicy::OnDemand => Some(false),
            SpotPolicy::Auto => None,
        };
        let mut q = Self::from_requirements(&common.resources, spot, common.profile.max_price);
        let wants_gpus = common
            .resources
            .gpu
            .as_ref()
            .is_none_or(|g| g.count.max != Some(0));
        if q.gpu_vendor.is_none() && wants_gpus {
            let default_image = common.image.is_none() && common.docker != Some(true);
            q.gpu_vendor = match &q.gpu_name {
                None if default_image => Some("nvidia".to_string()),
                None => None,
                Some(names) => {
                    let mut vendors: Vec<&str> =
                        names.iter().filter_map(|n| gpus::vendor_of(n)).collect();
                    vendors.dedup();
                    (vendors.len() == 1).then(|| vendors[0].to_string())
                }
            };
        }
        q
    }

    /// Whether `item` satisfies the filter (gpuhunt's rules).
    pub fn matches(&self, item: &CatalogItem) -> bool {
        if !between(item.price, self.min_price, self.max_price) {
            return false;
        }
        if self.spot.is_some_and(|s| s != item.spot) {
            return false;
        }
        if self.cpu_arch.as_deref().is_some_and(|a| a != item.cpu_arch) {
            return false;
        }
        if !between(f64::from(item.cpu), self.min_cpu, self.max_cpu)
            || !between(item.memory, self.min_memory, self.max_memory)
        {
            return false;
        }
        // GPU filters do not apply to CPU-only items when GPUs are optional.
        let gpus_optional = self.min_gpu_count == Some(0.0) && item.gpu_count == 0;
        if !gpus_optional && !self.gpus_match(item) {
            return false;
        }
        if let Some(disk) = item.disk_size {
            if !between(disk, self.min_disk_size, self.max_disk_size) {
                return false;
            }
        }
        if let Some(allowed) = &self.allowed_flags {
            if item.flags.iter().any(|f| !allowed.contains(f)) {
                return false;
            }
        }
        true
    }

    fn gpus_match(&self, item: &CatalogItem) -> bool {
        if self
            .gpu_vendor
            .as_deref()
            .is_some_and(|v| Some(v) != item.gpu_vendor.as_deref())
        {
            return false;
        }
        if !between(
            f64::from(item.gpu_count),
            self.min_gpu_count,
            self.max_gpu_count,
        ) {
            return false;
        }
        if let Some(names) = &self.gpu_name {
            let Some(name) = &item.gpu_name else {
                return false;
            };
            if !names.iter().any(|n| n.eq_ignore_ascii_case(name)) {
                return false;
            }
        }
        if let Some(min) = self.min_compute_capability {
            if item.gpu_vendor.as_deref() != Some("nvidia") {
                return false;
            }
            let cc = item.gpu_name.as_deref().and_then(gpus::compute_capability);
            if cc.is_none_or(|cc| cc < min) {
                return false;
            }
        }
        let per_gpu = match item.gpu_memory {
            Some(m) if item.gpu_count > 0 => m,
            _ => 0.0,
        };
        between(per_gpu, self.min_gpu_memory, self.max_gpu_memory)
            && between(
                per_gpu * f64::from(item.gpu_count),
                self.min_total_gpu_memory,
                self.max_total_gpu_memory,
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse, Configuration};

    fn item(
        cpu: u32,
        memory: f64,
        gpus: u32,
        gpu: &str,
        gpu_memory: f64,
        spot: bool,
    ) -> CatalogItem {
        CatalogItem {
            instance_name: "x".into(),
            location: "us-east-1".into(),
            price: 1.0,
            cpu,
            memory,
            gpu_count: gpus,
            gpu_name: (gpus > 0).then(|| gpu.to_string()),
            gpu_memory: (gpus > 0).then_some(gpu_memory),
            spot,
            disk_size: None,
            gpu_vendor: (gpus > 0).then(|| "nvidia".to_string()),
            flags: Vec::new(),
            cpu_arch: "x86".into(),
            provider_data: String::new(),
        }
    }

    fn run(yaml: &str) -> QueryFilter {
        let text = format!("type: task\ncommands: [x]\n{yaml}");
        let Configuration::Task(t) = parse(&text, "t").unwrap() else {
            unreachable!()
        };
        QueryFilter::for_run(&t.common)
    }

    #[test]
    fn cpu_only_items_satisfy_optional_gpus() {
        let q = run("");
        assert_eq!(q.gpu_vendor.as_deref(), Some("nvidia"));
        assert!(q.matches(&item(2, 8.0, 0, "", 0.0, false)));
        assert!(q.matches(&item(8, 32.0, 1, "T4", 16.0, false)));
        assert!(!q.matches(&item(1, 8.0, 0, "", 0.0, false)), "cpu: 2..");
        assert!(
            !q.matches(&item(2, 4.0, 0, "", 0.0, false)),
            "memory: 8GB.."
        );
        assert!(
            !q.matches(&item(2, 8.0, 0, "", 0.0, true)),
            "on-demand by default"
        );
    }

    #[test]
    fn gpu_constraints_are_inclusive() {
        let q = run("resources: {gpu: A100:80GB:2}\n");
        assert!(q.matches(&item(16, 64.0, 2, "a100", 80.0, false)));
        assert!(!q.matches(&item(16, 64.0, 2, "A100", 40.0, false)));
        assert!(!q.matches(&item(16, 64.0, 4, "A100", 80.0, false)));
        assert!(!q.matches(&item(16, 64.0, 0, "", 0.0, false)));
        let cc = run("resources: {gpu: {compute_capability: 8.0}}\nspot_policy: auto\n");
        assert!(cc.matches(&item(8, 32.0, 1, "A10G", 24.0, true)));
        assert!(!cc.matches(&item(8, 32.0, 1, "T4", 16.0, false)));
        let total = run("resources: {gpu: {total_memory: 100GB..}}\n");
        assert!(total.matches(&item(8, 32.0, 2, "A100", 80.0, false)));
        assert!(!total.matches(&item(8, 32.0, 1, "A100", 80.0, false)));
    }

    #[test]
    fn vendors_follow_names_and_flags_hide_items() {
        assert_eq!(
            run("image: rocm\nresources: {gpu: MI300X}\n")
                .gpu_vendor
                .as_deref(),
            Some("amd")
        );
        assert_eq!(run("image: x\n").gpu_vendor, None);
        let mut flagged = item(2, 8.0, 0, "", 0.0, false);
        flagged.flags = vec!["some-new-flag".into()];
        assert!(!run("").matches(&flagged));
        flagged.flags = vec!["gcp-a4".into()];
        assert!(run("").matches(&flagged));
        let mut disk = item(2, 8.0, 0, "", 0.0, false);
        disk.disk_size = Some(50.0);
        assert!(!run("").matches(&disk), "disk: 100GB.. by default");
        assert!(run("resources: {disk: 50GB}\n").matches(&disk));
    }
}
