//! Offer catalogs in gpuhunt's published CSV format: one `<provider>.csv` per provider with the
//! columns `instance_name, location, price, cpu, memory, gpu_count, gpu_name, gpu_memory, spot,
//! disk_size, gpu_vendor, flags, cpu_arch, provider_data` (memory and disk in GB). Loaded from a
//! directory (`DSTACK_CATALOG_DIR`) or, offline, from the small AWS and GCP catalogs built into
//! this crate; queried with a [`QueryFilter`] and merged across providers by price.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::agent::{GpuInfo, HostInfo};
use crate::config::range::Memory;
use crate::config::range::Range;

use super::query::QueryFilter;
use super::{Availability, Offer};

/// The environment variable naming a directory of `<provider>.csv` catalogs.
pub const CATALOG_DIR_ENV: &str = "DSTACK_CATALOG_DIR";

/// The built-in catalogs: `(provider, CSV)`.
const BUILTIN: [(&str, &str); 2] = [
    ("aws", include_str!("../../catalog/aws.csv")),
    ("gcp", include_str!("../../catalog/gcp.csv")),
];

/// One row of a catalog: an instance type in a location at a price.
#[derive(Clone, Debug, PartialEq)]
pub struct CatalogItem {
    /// The instance type (`g5.xlarge`, `a2-highgpu-1g`, …).
    pub instance_name: String,
    /// Region or zone.
    pub location: String,
    /// $/hour.
    pub price: f64,
    /// vCPUs.
    pub cpu: u32,
    /// RAM in GB.
    pub memory: f64,
    /// Number of GPUs.
    pub gpu_count: u32,
    /// GPU model.
    pub gpu_name: Option<String>,
    /// Memory per GPU in GB.
    pub gpu_memory: Option<f64>,
    /// Spot capacity.
    pub spot: bool,
    /// Disk in GB, when the instance type fixes it.
    pub disk_size: Option<f64>,
    /// Accelerator vendor (lower case).
    pub gpu_vendor: Option<String>,
    /// Flags hiding the item from versions that do not ask for them.
    pub flags: Vec<String>,
    /// `x86` or `arm`.
    pub cpu_arch: String,
    /// Provider-specific properties (JSON text; empty = `{}`).
    pub provider_data: String,
}

/// A catalog that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The file or directory could not be read.
    #[error("{path}: {source}")]
    Io {
        /// What was read.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The header lacks a required column, or the CSV is broken.
    #[error("{path}: {message}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// The items of every provider, each provider's file order kept.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    providers: BTreeMap<String, Arc<Vec<CatalogItem>>>,
    /// Rows skipped as malformed: `file:line: why`.
    pub skipped: Vec<String>,
}

const REQUIRED: [&str; 10] = [
    "instance_name",
    "location",
    "price",
    "cpu",
    "memory",
    "gpu_count",
    "gpu_name",
    "gpu_memory",
    "spot",
    "disk_size",
];

impl Catalog {
    /// The catalogs of `DSTACK_CATALOG_DIR` when set, else the built-in ones.
    pub fn default_catalog() -> Result<Catalog, CatalogError> {
        match std::env::var_os(CATALOG_DIR_ENV) {
            Some(dir) => Catalog::load_dir(Path::new(&dir)),
            None => Ok(Catalog::builtin()),
        }
    }

    /// The small AWS and GCP catalogs shipped in this crate.
    pub fn builtin() -> Catalog {
        let mut catalog = Catalog::default();
        for (provider, text) in BUILTIN {
            catalog
                .add_csv(provider, &format!("<built-in {provider}.csv>"), text)
                .expect("the built-in catalogs are well-formed");
        }
        catalog
    }

    /// Every `<provider>.csv` of `dir`.
    pub fn load_dir(dir: &Path) -> Result<Catalog, CatalogError> {
        let io = |source| CatalogError::Io {
            path: dir.to_path_buf(),
            source,
        };
        let mut catalog = Catalog::default();
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            let (Some(stem), Some("csv")) = (
                path.file_stem().and_then(|s| s.to_str()),
                path.extension().and_then(|s| s.to_str()),
            ) else {
                continue;
            };
            let text = std::fs::read_to_string(&path).map_err(|source| CatalogError::Io {
                path: path.clone(),
                source,
            })?;
            catalog.add_csv(&stem.to_lowercase(), &path.display().to_string(), &text)?;
        }
        Ok(catalog)
    }

    /// Adds (replaces) the catalog of `provider` from CSV text read from `source`. Malformed
    /// rows are skipped and listed in [`Catalog::skipped`], as gpuhunt skips them.
    pub fn add_csv(
        &mut self,
        provider: &str,
        source: &str,
        text: &str,
    ) -> Result<(), CatalogError> {
        let format = |message: String| CatalogError::Format {
            path: source.to_string(),
            message,
        };
        let mut reader = csv::ReaderBuilder::new().from_reader(text.as_bytes());
        let header = reader.headers().map_err(|e| format(e.to_string()))?.clone();
        let column = |name: &str| header.iter().position(|h| h.trim() == name);
        for name in REQUIRED {
            if column(name).is_none() {
                return Err(format(format!(
                    "the header has no `{name}` column; expected gpuhunt's catalog columns ({})",
                    REQUIRED.join(", ")
                )));
            }
        }
        let columns = Columns {
            required: REQUIRED.map(|n| column(n).unwrap_or_default()),
            gpu_vendor: column("gpu_vendor"),
            flags: column("flags"),
            cpu_arch: column("cpu_arch"),
            provider_data: column("provider_data"),
        };
        let mut items = Vec::new();
        let mut record = csv::StringRecord::new();
        loop {
            match reader.read_record(&mut record) {
                Ok(false) => break,
                Ok(true) => match columns.item(&record) {
                    Ok(item) => items.push(item),
                    Err(why) => {
                        let line = record.position().map_or(0, |p| p.line());
                        self.skipped.push(format!("{source}:{line}: {why}"));
                    }
                },
                Err(e) => return Err(format(e.to_string())),
            }
        }
        self.providers.insert(provider.to_string(), Arc::new(items));
        Ok(())
    }

    /// The providers that have a catalog.
    pub fn providers(&self) -> impl Iterator<Item = &str> {
        self.providers.keys().map(String::as_str)
    }

    /// How many items the catalog holds.
    pub fn len(&self) -> usize {
        self.providers.values().map(|p| p.len()).sum()
    }

    /// Whether the catalog holds no item.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The items of `providers` (all when empty) matching `filter`, merged by price: at each
    /// step the cheapest head among the providers, each provider's own order kept (as
    /// gpuhunt merges, so the result is sorted when every file is).
    pub fn query<'a>(
        &'a self,
        providers: &[&str],
        filter: &QueryFilter,
    ) -> Vec<(&'a str, &'a CatalogItem)> {
        let mut lists: Vec<(&str, Vec<&CatalogItem>)> = self
            .providers
            .iter()
            .filter(|(name, _)| {
                providers.is_empty() || providers.iter().any(|p| p.eq_ignore_ascii_case(name))
            })
            .map(|(name, items)| {
                let matching = items.iter().filter(|i| filter.matches(i)).collect();
                (name.as_str(), matching)
            })
            .collect();
        if lists.len() == 1 {
            let (name, items) = lists.pop().unwrap_or_default();
            return items.into_iter().map(|i| (name, i)).collect();
        }
        let mut heads = vec![0usize; lists.len()];
        let total = lists.iter().map(|(_, l)| l.len()).sum();
        let mut merged = Vec::with_capacity(total);
        while merged.len() < total {
            let mut best: Option<usize> = None;
            for (k, (_, list)) in lists.iter().enumerate() {
                if let Some(item) = list.get(heads[k]) {
                    if best.is_none_or(|b| item.price < lists[b].1[heads[b]].price) {
                        best = Some(k);
                    }
                }
            }
            let Some(k) = best else { break };
            merged.push((lists[k].0, lists[k].1[heads[k]]));
            heads[k] += 1;
        }
        merged
    }
}

/// Where each field is in a file's rows.
struct Columns {
    required: [usize; 10],
    gpu_vendor: Option<usize>,
    flags: Option<usize>,
    cpu_arch: Option<usize>,
    provider_data: Option<usize>,
}

impl Columns {
    fn item(&self, row: &csv::StringRecord) -> Result<CatalogItem, String> {
        let field = |k: usize| row.get(self.required[k]).unwrap_or("").trim();
        let optional = |c: Option<usize>| {
            c.and_then(|c| row.get(c))
                .map(str::trim)
                .filter(|s| !s.is_empty())
        };
        let required = |k: usize| {
            let value = field(k);
            if value.is_empty() {
                Err(format!("required field `{}` is empty", REQUIRED[k]))
            } else {
                Ok(value)
            }
        };
        let number = |k: usize| {
            required(k)?
                .parse::<f64>()
                .map_err(|_| format!("`{}` is not a number: {:?}", REQUIRED[k], field(k)))
        };
        let integer = |k: usize| {
            required(k)?
                .parse::<u32>()
                .map_err(|_| format!("`{}` is not a whole number: {:?}", REQUIRED[k], field(k)))
        };
        let optional_number = |k: usize| match field(k) {
            "" => Ok(None),
            v => v
                .parse::<f64>()
                .map(Some)
                .map_err(|_| format!("`{}` is not a number: {v:?}", REQUIRED[k])),
        };
        let spot = match required(8)?.to_ascii_lowercase().as_str() {
            "true" | "1" => true,
            "false" | "0" => false,
            other => return Err(format!("`spot` is not a boolean: {other:?}")),
        };
        let gpu_count = integer(5)?;
        let mut gpu_name = Some(field(6)).filter(|s| !s.is_empty()).map(str::to_string);
        let mut gpu_vendor = optional(self.gpu_vendor).map(str::to_lowercase);
        // Catalogs older than the `gpu_vendor` column prefix TPU names and imply NVIDIA.
        if let Some(tpu) = gpu_name.as_deref().and_then(|n| n.strip_prefix("tpu-")) {
            gpu_name = Some(tpu.to_string());
            gpu_vendor.get_or_insert_with(|| "google".to_string());
        } else if gpu_vendor.is_none() && gpu_count > 0 {
            gpu_vendor = Some("nvidia".to_string());
        }
        let cpu_arch = match optional(self.cpu_arch).map(str::to_lowercase) {
            None => "x86".to_string(),
            Some(a) if a == "x86" || a == "arm" => a,
            Some(a) => return Err(format!("`cpu_arch` is not x86 or arm: {a:?}")),
        };
        Ok(CatalogItem {
            instance_name: required(0)?.to_string(),
            location: required(1)?.to_string(),
            price: number(2)?,
            cpu: integer(3)?,
            memory: number(4)?,
            gpu_count,
            gpu_name,
            gpu_memory: optional_number(7)?,
            spot,
            disk_size: optional_number(9)?,
            gpu_vendor,
            flags: optional(self.flags)
                .map(|f| f.split_whitespace().map(str::to_string).collect())
                .unwrap_or_default(),
            cpu_arch,
            provider_data: optional(self.provider_data).unwrap_or("").to_string(),
        })
    }
}

/// The disk an offer gets when its instance type does not fix one: the smallest size within
/// both the requested range (default `100GB..`) and what the backend can configure, or `None`
/// when they do not meet.
pub fn offer_disk_gb(requested: Option<&Range<Memory>>, configurable: (f64, f64)) -> Option<f64> {
    let (lo, hi) = configurable;
    let min = requested.and_then(|r| r.min).map_or(100.0, |m| m.0);
    let max = requested.and_then(|r| r.max).map_or(f64::INFINITY, |m| m.0);
    let size = min.max(lo);
    (size <= max.min(hi)).then_some(size)
}

/// The offer a catalog item makes on `backend`, with `disk_gb` of disk (see
/// [`offer_disk_gb`]) unless the item fixes its own.
pub fn to_offer(backend: &str, item: &CatalogItem, disk_gb: f64) -> Offer {
    const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
    let gpu_mib = item.gpu_memory.map_or(0, |m| (m * 1024.0).round() as u64);
    let gpus = (0..item.gpu_count)
        .map(|index| GpuInfo {
            index,
            name: item.gpu_name.clone().unwrap_or_default(),
            memory_mib: gpu_mib,
            vendor: item
                .gpu_vendor
                .clone()
                .unwrap_or_else(|| "nvidia".to_string()),
            uuid: None,
        })
        .collect();
    Offer {
        backend: backend.to_string(),
        instance_type: item.instance_name.clone(),
        region: item.location.clone(),
        price: item.price,
        spot: item.spot,
        resources: HostInfo {
            cpus: item.cpu,
            memory_bytes: ((item.memory * 1024.0).round() as u64) << 20,
            disk_bytes: (item.disk_size.unwrap_or(disk_gb) * GIB) as u64,
            cpu_arch: item.cpu_arch.clone(),
            gpus,
        },
        availability: Availability::Available,
        availability_zones: None,
        backend_data: serde_json::from_str(&item.provider_data).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CSV: &str = "instance_name,location,price,cpu,memory,gpu_count,gpu_name,gpu_memory,spot,disk_size,gpu_vendor,flags,cpu_arch,provider_data\n\
        g5.xlarge,us-east-1,1.006,4,16.0,1,A10G,24.0,False,,nvidia,,x86,\"{\"\"k\"\": 1}\"\n\
        m5.large,us-east-1,0.096,2,8.0,0,,,False,,,,x86,{}\n\
        broken,us-east-1,cheap,2,8.0,0,,,False,,,,x86,{}\n\
        v5litepod-8,us-west4,9.6,224,384,8,tpu-v5litepod,,False,,,,,\n";

    fn catalog() -> Catalog {
        let mut c = Catalog::default();
        c.add_csv("aws", "aws.csv", CSV).unwrap();
        c
    }

    #[test]
    fn loads_gpuhunt_rows_and_skips_malformed_ones_by_line() {
        let c = catalog();
        assert_eq!(c.len(), 3);
        assert_eq!(c.skipped, ["aws.csv:4: `price` is not a number: \"cheap\""]);
        let all = c.query(&[], &QueryFilter::default());
        let tpu = all
            .iter()
            .find(|(_, i)| i.instance_name == "v5litepod-8")
            .unwrap()
            .1;
        assert_eq!(tpu.gpu_name.as_deref(), Some("v5litepod"));
        assert_eq!(tpu.gpu_vendor.as_deref(), Some("google"));
        let g5 = to_offer("aws", all[0].1, 100.0);
        assert_eq!(g5.resources.gpus.len(), 1);
        assert_eq!(g5.resources.gpus[0].memory_mib, 24576);
        assert_eq!(g5.resources.memory_bytes, 16 << 30);
        assert_eq!(g5.backend_data["k"], 1);
    }

    #[test]
    fn missing_columns_are_named() {
        let err = Catalog::default()
            .add_csv("aws", "aws.csv", "instance_name,price\nx,1\n")
            .unwrap_err();
        assert!(err
            .to_string()
            .starts_with("aws.csv: the header has no `location` column"));
    }

    #[test]
    fn providers_merge_by_price() {
        let mut c = catalog();
        c.add_csv(
            "gcp",
            "gcp.csv",
            "instance_name,location,price,cpu,memory,gpu_count,gpu_name,gpu_memory,spot,disk_size\n\
             e2-standard-2,us-central1,0.067,2,8,0,,,False,\n\
             g2-standard-4,us-central1,0.7,4,16,1,L4,24,False,\n",
        )
        .unwrap();
        let prices: Vec<f64> = c
            .query(&[], &QueryFilter::default())
            .iter()
            .map(|(_, i)| i.price)
            .collect();
        // The aws rows are not sorted (1.006 before 0.096): their order is kept, as gpuhunt's.
        assert_eq!(prices, [0.067, 0.7, 1.006, 0.096, 9.6]);
        assert_eq!(c.query(&["GCP"], &QueryFilter::default()).len(), 2);
    }

    #[test]
    fn disk_is_the_smallest_size_both_allow() {
        let r = |min: Option<f64>, max: Option<f64>| Range {
            min: min.map(Memory),
            max: max.map(Memory),
        };
        assert_eq!(offer_disk_gb(None, (100.0, 16384.0)), Some(100.0));
        assert_eq!(
            offer_disk_gb(Some(&r(Some(50.0), None)), (20.0, 32768.0)),
            Some(50.0)
        );
        assert_eq!(
            offer_disk_gb(Some(&r(Some(10.0), None)), (100.0, 16384.0)),
            Some(100.0)
        );
        assert_eq!(
            offer_disk_gb(Some(&r(None, Some(50.0))), (100.0, 16384.0)),
            None
        );
    }

    #[test]
    fn the_builtin_catalogs_load() {
        let c = Catalog::builtin();
        assert!(c.skipped.is_empty(), "{:?}", c.skipped);
        assert_eq!(c.providers().collect::<Vec<_>>(), ["aws", "gcp"]);
        assert!(c.len() >= 40);
    }
}
