//! `dstack offer --group-by gpu[,backend,region,count]`: offers folded into one row per GPU
//! model (and backend, region or count), as dstack's `gpus/list` answers: the count and
//! per-GPU price ranges, the spot kinds, backends and regions seen, and availability.

use std::collections::BTreeSet;

use dstack_core::offers::{Availability, Offer};
use serde::Serialize;

/// What rows are keyed by besides the GPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupBy {
    /// One row per backend.
    pub backend: bool,
    /// One row per region (needs `backend`).
    pub region: bool,
    /// One row per GPU count.
    pub count: bool,
}

impl GroupBy {
    /// Reads `--group-by` values as dstack does: repeatable or comma-separated, `gpu` among
    /// them, `region` only with `backend`.
    pub fn parse(values: &[String]) -> Result<GroupBy, String> {
        let mut by = GroupBy::default();
        let mut gpu = false;
        let mut seen = Vec::new();
        for value in values.iter().flat_map(|v| v.split(',')) {
            let value = value.trim();
            match value {
                "" => continue,
                "gpu" => gpu = true,
                "backend" => by.backend = true,
                "region" => by.region = true,
                "count" => by.count = true,
                other => {
                    return Err(format!(
                        "Invalid group-by value: '{other}'. Valid choices are: backend, count, \
                         gpu, region"
                    ))
                }
            }
            seen.push(value);
        }
        if !gpu {
            return Err(format!(
                "Cannot group by '{}' without also grouping by 'gpu'",
                seen.join(", ")
            ));
        }
        if by.region && !by.backend {
            return Err("Cannot group by 'region' without also grouping by 'backend'".into());
        }
        Ok(by)
    }

    /// The names, in dstack's order (`gpu` first).
    pub fn names(&self) -> Vec<&'static str> {
        let mut names = vec!["gpu"];
        for (on, name) in [
            (self.backend, "backend"),
            (self.region, "region"),
            (self.count, "count"),
        ] {
            if on {
                names.push(name);
            }
        }
        names
    }
}

/// A closed range.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Range<T> {
    /// The smallest value.
    pub min: T,
    /// The largest value.
    pub max: T,
}

impl<T: PartialOrd + Copy> Range<T> {
    fn widen(&mut self, value: T) {
        if value < self.min {
            self.min = value;
        }
        if value > self.max {
            self.max = value;
        }
    }
}

/// One row: a GPU model with what the offers of it have in common, as dstack's `GpuGroup`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GpuGroup {
    /// The GPU model.
    pub name: String,
    /// Its memory.
    pub memory_mib: u64,
    /// The vendor.
    pub vendor: String,
    /// How many GPUs the offers have.
    pub count: Range<usize>,
    /// The price per GPU and hour, in dollars.
    pub price: Range<f64>,
    /// `spot`, `on-demand`, or both.
    pub spot: BTreeSet<&'static str>,
    /// The backend, when grouped by backend.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// The backends seen, when not grouped by backend.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<String>,
    /// The region, when grouped by region.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// The regions seen, when grouped by backend but not region.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<String>,
    /// The availabilities seen.
    pub availability: BTreeSet<&'static str>,
}

/// The key a row is found by.
fn key(offer: &Offer, by: GroupBy) -> (String, u64, Option<String>, Option<String>, Option<usize>) {
    let gpu = &offer.resources.gpus[0];
    (
        gpu.name.clone(),
        gpu.memory_mib,
        by.backend.then(|| offer.backend.clone()),
        by.region.then(|| offer.region.clone()),
        by.count.then_some(offer.resources.gpus.len()),
    )
}

/// dstack's name of an availability.
fn availability(a: Availability) -> &'static str {
    match a {
        Availability::Idle => "idle",
        Availability::Busy => "busy",
        Availability::Available => "available",
        Availability::NotAvailable => "not_available",
    }
}

/// The offers with GPUs folded into rows (offers without GPUs have no row), cheapest per-GPU
/// price first.
pub fn group(offers: &[Offer], by: GroupBy) -> Vec<GpuGroup> {
    let mut groups: Vec<(_, GpuGroup)> = Vec::new();
    for offer in offers.iter().filter(|o| !o.resources.gpus.is_empty()) {
        let count = offer.resources.gpus.len();
        let per_gpu = offer.price / count as f64;
        let spot = if offer.spot { "spot" } else { "on-demand" };
        let k = key(offer, by);
        let group = match groups.iter_mut().find(|(existing, _)| *existing == k) {
            Some((_, group)) => {
                group.count.widen(count);
                group.price.widen(per_gpu);
                group
            }
            None => {
                let gpu = &offer.resources.gpus[0];
                groups.push((
                    k.clone(),
                    GpuGroup {
                        name: gpu.name.clone(),
                        memory_mib: gpu.memory_mib,
                        vendor: gpu.vendor.clone(),
                        count: Range {
                            min: count,
                            max: count,
                        },
                        price: Range {
                            min: per_gpu,
                            max: per_gpu,
                        },
                        spot: BTreeSet::new(),
                        backend: k.2.clone(),
                        backends: Vec::new(),
                        region: k.3.clone(),
                        regions: Vec::new(),
                        availability: BTreeSet::new(),
                    },
                ));
                &mut groups.last_mut().expect("just pushed").1
            }
        };
        group.spot.insert(spot);
        group.availability.insert(availability(offer.availability));
        if !by.backend && !group.backends.contains(&offer.backend) {
            group.backends.push(offer.backend.clone());
        }
        if by.backend && !by.region && !group.regions.contains(&offer.region) {
            group.regions.push(offer.region.clone());
        }
    }
    let mut rows: Vec<GpuGroup> = groups.into_iter().map(|(_, g)| g).collect();
    rows.sort_by(|a, b| {
        a.price
            .min
            .total_cmp(&b.price.min)
            .then_with(|| a.name.cmp(&b.name))
    });
    rows
}

/// A price as dstack prints it (up to four decimals, no trailing zeros).
fn price_text(price: f64) -> String {
    let text = format!("{price:.4}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// The rows as dstack's table: `#`, `GPU` (`NAME:MEMORY:COUNT`), `SPOT`, `$/GPU`, the
/// backends (with regions when not grouped by backend), the regions when grouped by
/// backend, and the availability when none of the offers is available.
pub fn table(rows: &[GpuGroup], by: GroupBy) -> crate::table::Table {
    let mut header = vec!["#", "GPU", "SPOT", "$/GPU"];
    header.push(if by.backend { "BACKEND" } else { "BACKENDS" });
    if by.backend {
        header.push(if by.region { "REGION" } else { "REGIONS" });
    }
    header.push("");
    let mut table = crate::table::Table::new(&header);
    for (i, g) in rows.iter().enumerate() {
        let count = if g.count.min == g.count.max {
            g.count.min.to_string()
        } else {
            format!("{}..{}", g.count.min, g.count.max)
        };
        let price = if g.price.min == g.price.max {
            price_text(g.price.min)
        } else {
            format!("{}..{}", price_text(g.price.min), price_text(g.price.max))
        };
        let spot: Vec<&str> = ["spot", "on-demand"]
            .into_iter()
            .filter(|s| g.spot.contains(s))
            .collect();
        let regions = if g.regions.len() <= 3 {
            g.regions.join(", ")
        } else {
            format!("{} regions", g.regions.len())
        };
        let mut row = vec![
            (i + 1).to_string(),
            format!("{}:{}GB:{count}", g.name, g.memory_mib / 1024),
            spot.join(", "),
            price,
            g.backend.clone().unwrap_or_else(|| g.backends.join(", ")),
        ];
        if by.backend {
            row.push(g.region.clone().unwrap_or(regions));
        }
        let available = g.availability.contains("available") || g.availability.contains("idle");
        row.push(if available {
            String::new()
        } else {
            g.availability
                .iter()
                .copied()
                .collect::<Vec<_>>()
                .join(", ")
        });
        table.row(row);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use dstack_core::agent::{GpuInfo, HostInfo};

    fn offer(backend: &str, region: &str, gpus: usize, price: f64, spot: bool) -> Offer {
        let gpu = |index| GpuInfo {
            index,
            name: "A100".into(),
            memory_mib: 80 * 1024,
            vendor: "nvidia".into(),
            uuid: None,
        };
        Offer {
            backend: backend.into(),
            instance_type: format!("{backend}-{gpus}"),
            region: region.into(),
            price,
            spot,
            resources: HostInfo {
                cpus: 8,
                gpus: (0..gpus as u32).map(gpu).collect(),
                ..HostInfo::default()
            },
            availability: Availability::Available,
            availability_zones: None,
            backend_data: serde_json::Value::Null,
        }
    }

    #[test]
    fn group_by_needs_gpu_and_region_needs_backend() {
        assert!(GroupBy::parse(&["backend".into()]).is_err());
        assert!(GroupBy::parse(&["gpu,region".into()]).is_err());
        assert!(GroupBy::parse(&["gpu,nope".into()]).is_err());
        let by = GroupBy::parse(&["gpu,backend".into(), "region".into()]).unwrap();
        assert_eq!(by.names(), vec!["gpu", "backend", "region"]);
    }

    #[test]
    fn offers_fold_into_one_row_per_gpu_with_ranges() {
        let offers = vec![
            offer("aws", "us-east-1", 1, 4.0, false),
            offer("aws", "us-west-2", 8, 16.0, true),
            offer("gcp", "us-central1", 2, 6.0, false),
            Offer {
                resources: HostInfo::default(),
                ..offer("aws", "us-east-1", 0, 1.0, false)
            },
        ];
        let rows = group(&offers, GroupBy::default());
        assert_eq!(rows.len(), 1, "offers without GPUs have no row");
        let row = &rows[0];
        assert_eq!((row.count.min, row.count.max), (1, 8));
        assert_eq!((row.price.min, row.price.max), (2.0, 4.0));
        assert_eq!(row.backends, vec!["aws", "gcp"]);
        assert_eq!(row.spot.len(), 2);
        let by_backend = group(
            &offers,
            GroupBy {
                backend: true,
                ..GroupBy::default()
            },
        );
        assert_eq!(by_backend.len(), 2);
        let aws = by_backend
            .iter()
            .find(|g| g.backend.as_deref() == Some("aws"));
        assert_eq!(aws.unwrap().regions, vec!["us-east-1", "us-west-2"]);
        let by_count = group(
            &offers,
            GroupBy {
                count: true,
                ..GroupBy::default()
            },
        );
        assert_eq!(by_count.len(), 3);
        let text = table(&rows, GroupBy::default()).render();
        assert!(text.contains("A100:80GB:1..8"), "{text}");
        assert!(text.contains("2..4"), "{text}");
    }
}
