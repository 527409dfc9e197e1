//! Known accelerators: vendor, memory and (NVIDIA) compute capability by name, the facts
//! gpuhunt's tables publish. Used to check `compute_capability` and to infer a GPU spec's
//! vendor from its names.

/// An accelerator model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KnownGpu {
    /// The name catalogs use (`A100`, `MI300X`, `v5litepod`, …).
    pub name: &'static str,
    /// `nvidia`, `amd`, `google`, `intel` or `tenstorrent`.
    pub vendor: &'static str,
    /// Memory per device in GB (0 for TPUs).
    pub memory_gb: u32,
    /// CUDA compute capability (NVIDIA only).
    pub compute_capability: Option<(u32, u32)>,
}

const fn nvidia(name: &'static str, memory_gb: u32, cc: (u32, u32)) -> KnownGpu {
    KnownGpu {
        name,
        vendor: "nvidia",
        memory_gb,
        compute_capability: Some(cc),
    }
}

const fn other(vendor: &'static str, name: &'static str, memory_gb: u32) -> KnownGpu {
    KnownGpu {
        name,
        vendor,
        memory_gb,
        compute_capability: None,
    }
}

/// Every known accelerator (a name may appear with several memory sizes).
pub const KNOWN_GPUS: &[KnownGpu] = &[
    nvidia("A10", 24, (8, 6)),
    nvidia("A16", 16, (8, 6)),
    nvidia("A40", 48, (8, 6)),
    nvidia("A100", 40, (8, 0)),
    nvidia("A100", 80, (8, 0)),
    nvidia("A10G", 24, (8, 6)),
    nvidia("A4000", 16, (8, 6)),
    nvidia("A4500", 20, (8, 6)),
    nvidia("A5000", 24, (8, 6)),
    nvidia("A6000", 48, (8, 6)),
    nvidia("H100", 80, (9, 0)),
    nvidia("H100NVL", 94, (9, 0)),
    nvidia("H200", 141, (9, 0)),
    nvidia("H200NVL", 141, (9, 0)),
    nvidia("B200", 180, (10, 0)),
    nvidia("GB200", 186, (10, 0)),
    nvidia("B300", 270, (10, 0)),
    nvidia("GB300", 270, (10, 0)),
    nvidia("L4", 24, (8, 9)),
    nvidia("L40", 48, (8, 9)),
    nvidia("L40S", 48, (8, 9)),
    nvidia("P100", 16, (6, 0)),
    nvidia("RTX2060", 6, (7, 5)),
    nvidia("RTX2060", 12, (7, 5)),
    nvidia("RTX2060SUPER", 8, (7, 5)),
    nvidia("RTX2070", 8, (7, 5)),
    nvidia("RTX2070SUPER", 8, (7, 5)),
    nvidia("RTX2080", 8, (7, 5)),
    nvidia("RTX2080SUPER", 8, (7, 5)),
    nvidia("RTX2080Ti", 11, (7, 5)),
    nvidia("RTX3050", 6, (8, 6)),
    nvidia("RTX3050", 8, (8, 6)),
    nvidia("RTX3060", 8, (8, 6)),
    nvidia("RTX3060", 12, (8, 6)),
    nvidia("RTX3060Ti", 8, (8, 6)),
    nvidia("RTX3070", 8, (8, 6)),
    nvidia("RTX3070Ti", 8, (8, 6)),
    nvidia("RTX3080", 10, (8, 6)),
    nvidia("RTX3080Ti", 12, (8, 6)),
    nvidia("RTX3090", 24, (8, 6)),
    nvidia("RTX3090Ti", 24, (8, 6)),
    nvidia("RTX4060", 8, (8, 9)),
    nvidia("RTX4060Ti", 8, (8, 9)),
    nvidia("RTX4060Ti", 16, (8, 9)),
    nvidia("RTX4070", 12, (8, 9)),
    nvidia("RTX4070SUPER", 12, (8, 9)),
    nvidia("RTX4070Ti", 12, (8, 9)),
    nvidia("RTX4070TiSUPER", 16, (8, 9)),
    nvidia("RTX4080", 16, (8, 9)),
    nvidia("RTX4080SUPER", 16, (8, 9)),
    nvidia("RTX4090", 24, (8, 9)),
    nvidia("RTX5060", 8, (12, 0)),
    nvidia("RTX5060Ti", 8, (12, 0)),
    nvidia("RTX5060Ti", 16, (12, 0)),
    nvidia("RTX5070", 12, (12, 0)),
    nvidia("RTX5070Ti", 16, (12, 0)),
    nvidia("RTX5080", 16, (12, 0)),
    nvidia("RTX5090", 32, (12, 0)),
    nvidia("RTX6000", 24, (7, 5)),
    nvidia("RTX2000Ada", 16, (8, 9)),
    nvidia("RTX4000Ada", 20, (8, 9)),
    nvidia("RTX6000Ada", 48, (8, 9)),
    nvidia("RTXPRO4500", 32, (12, 0)),
    nvidia("RTXPRO6000", 96, (12, 0)),
    nvidia("T4", 16, (7, 5)),
    nvidia("V100", 16, (7, 0)),
    nvidia("V100", 32, (7, 0)),
    nvidia("GH200", 96, (9, 0)),
    other("amd", "MI100", 32),
    other("amd", "MI210", 64),
    other("amd", "MI250", 128),
    other("amd", "MI250X", 128),
    other("amd", "MI300A", 128),
    other("amd", "MI300X", 192),
    other("amd", "MI308X", 128),
    other("amd", "MI325X", 288),
    other("amd", "MI350X", 288),
    other("amd", "MI355X", 288),
    other("google", "v2", 0),
    other("google", "v3", 0),
    other("google", "v4", 0),
    other("google", "v5p", 0),
    other("google", "v5litepod", 0),
    other("google", "v6e", 0),
    other("intel", "Gaudi", 32),
    other("intel", "Gaudi2", 96),
    other("intel", "Gaudi3", 128),
    other("tenstorrent", "n150", 12),
    other("tenstorrent", "n300", 24),
    other("tenstorrent", "tt-galaxy-wh", 12),
    other("tenstorrent", "p100a", 28),
    other("tenstorrent", "p150", 32),
    other("tenstorrent", "p300", 32),
    other("tenstorrent", "p300", 64),
    other("tenstorrent", "tt-galaxy-bh", 32),
];

/// The first known accelerator called `name` (case-insensitive).
pub fn find(name: &str) -> Option<&'static KnownGpu> {
    KNOWN_GPUS
        .iter()
        .find(|g| g.name.eq_ignore_ascii_case(name))
}

/// The compute capability of an NVIDIA GPU called `name`, if known.
pub fn compute_capability(name: &str) -> Option<(u32, u32)> {
    KNOWN_GPUS
        .iter()
        .find(|g| g.vendor == "nvidia" && g.name.eq_ignore_ascii_case(name))
        .and_then(|g| g.compute_capability)
}

/// The vendor of an accelerator name: a known name, or a TPU `<version>-<cores>`.
pub fn vendor_of(name: &str) -> Option<&'static str> {
    if let Some(known) = find(name) {
        return Some(known.vendor);
    }
    let (version, cores) = name.split_once('-')?;
    let tpu = find(version).filter(|g| g.vendor == "google")?;
    cores.parse::<u32>().ok().map(|_| tpu.vendor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knows_capabilities_and_vendors() {
        assert_eq!(compute_capability("a100"), Some((8, 0)));
        assert_eq!(compute_capability("MI300X"), None);
        assert_eq!(vendor_of("MI300X"), Some("amd"));
        assert_eq!(vendor_of("v5litepod-8"), Some("google"));
        assert_eq!(vendor_of("v5e-8"), None);
        assert_eq!(vendor_of("H100"), Some("nvidia"));
    }
}
