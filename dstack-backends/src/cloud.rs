//! What cloud backends share: their offers from the catalog (their provider's items in their
//! regions, limited to the instance families they support, disk sized within what they can
//! configure).

use std::path::Path;
use std::sync::{Arc, OnceLock};

use dstack_core::backend::{Compute, ComputeError, OfferRequest};
use dstack_core::offers::catalog::{offer_disk_gb, to_offer, Catalog};
use dstack_core::offers::Offer;

/// The catalog cloud backends share: `DSTACK_CATALOG_DIR`, or the built-in one (loaded once).
pub fn shared_catalog() -> Result<Arc<Catalog>, ComputeError> {
    static CATALOG: OnceLock<Result<Arc<Catalog>, String>> = OnceLock::new();
    CATALOG
        .get_or_init(|| {
            Catalog::default_catalog()
                .map(Arc::new)
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(ComputeError::Other)
}

/// How one backend reads the catalog.
#[derive(Clone, Debug)]
pub struct CatalogOffers {
    /// The backend type the offers are for (`aws`, `gcp`).
    pub backend: &'static str,
    /// The catalog's provider name.
    pub provider: &'static str,
    /// Configured regions (`None`: all).
    pub regions: Option<Vec<String>>,
    /// Instance-type prefixes the backend supports (`None`: all).
    pub families: Option<Vec<String>>,
    /// The disk sizes it can configure, in GB.
    pub disk_range: (f64, f64),
    /// The region of a catalog location (GCP locations are zones: `us-central1-a`).
    pub region_of: fn(&str) -> String,
}

impl CatalogOffers {
    /// The catalog locations (regions or zones) of its provider within its regions, sorted.
    pub fn locations(&self, catalog: &Catalog) -> Vec<String> {
        let mut all: Vec<String> = catalog
            .query(&[self.provider], &Default::default())
            .into_iter()
            .map(|(_, i)| i.location.clone())
            .filter(|location| {
                self.regions.as_ref().is_none_or(|r| {
                    let region = (self.region_of)(location);
                    r.iter().any(|x| x.eq_ignore_ascii_case(&region))
                })
            })
            .collect();
        all.sort();
        all.dedup();
        all
    }

    /// The offers matching `request`, cheapest first; for zoned providers one offer per
    /// region, with the zones it exists in.
    pub fn offers(&self, catalog: &Catalog, request: &OfferRequest) -> Vec<Offer> {
        let Some(disk) = offer_disk_gb(request.disk.as_ref(), self.disk_range) else {
            return Vec::new();
        };
        let mut offers: Vec<Offer> = Vec::new();
        for (_, item) in catalog.query(&[self.provider], &request.filter) {
            let region = (self.region_of)(&item.location);
            if self
                .regions
                .as_ref()
                .is_some_and(|r| !r.iter().any(|x| x.eq_ignore_ascii_case(&region)))
            {
                continue;
            }
            if self.families.as_ref().is_some_and(|f| {
                !f.iter()
                    .any(|prefix| item.instance_name.starts_with(prefix.as_str()))
            }) {
                continue;
            }
            if region != item.location {
                let same = offers.iter_mut().find(|o| {
                    o.instance_type == item.instance_name
                        && o.region == region
                        && o.spot == item.spot
                        && o.price == item.price
                });
                if let Some(same) = same {
                    same.availability_zones
                        .get_or_insert_with(Vec::new)
                        .push(item.location.clone());
                    continue;
                }
            }
            let mut offer = to_offer(self.backend, item, disk);
            offer.region = region.clone();
            if region != item.location {
                offer.availability_zones = Some(vec![item.location.clone()]);
            }
            offers.push(offer);
        }
        offers
    }
}

/// The cloud backends `$DSTACK_HOME/config.yml` configures, and why any configured one is
/// left out (not built into this binary, no credentials). A malformed file is an error.
#[cfg_attr(not(any(feature = "aws", feature = "gcp")), allow(unused_variables))]
pub async fn configured_backends(
    home: &Path,
    agent_bin: &Path,
) -> Result<(Vec<Arc<dyn Compute>>, Vec<String>), crate::config::ConfigError> {
    use crate::config::BackendConfig;
    let config = crate::config::load(home)?;
    #[cfg_attr(not(any(feature = "aws", feature = "gcp")), allow(unused_mut))]
    let mut backends: Vec<Arc<dyn Compute>> = Vec::new();
    let mut skipped = Vec::new();
    for backend in config.backends {
        match backend {
            #[cfg(feature = "aws")]
            BackendConfig::Aws(aws) => {
                let built =
                    crate::aws::AwsCompute::new(aws, home, &config.project, agent_bin.into()).await;
                match built {
                    Ok(aws) => backends.push(Arc::new(aws)),
                    Err(e) => skipped.push(format!("the aws backend is skipped: {e}")),
                }
            }
            #[cfg(not(feature = "aws"))]
            BackendConfig::Aws(_) => skipped.push(
                "the aws backend is skipped: this build has no AWS support (cargo feature `aws` \
                 of dstack-backends / dstack-cli)"
                    .to_string(),
            ),
            #[cfg(feature = "gcp")]
            BackendConfig::Gcp(gcp) => {
                let built =
                    crate::gcp::GcpCompute::new(gcp, home, &config.project, agent_bin.into()).await;
                match built {
                    Ok(gcp) => backends.push(Arc::new(gcp)),
                    Err(e) => skipped.push(format!("the gcp backend is skipped: {e}")),
                }
            }
            #[cfg(not(feature = "gcp"))]
            BackendConfig::Gcp(_) => skipped.push(
                "the gcp backend is skipped: this build has no GCP support (cargo feature `gcp` \
                 of dstack-backends / dstack-cli)"
                    .to_string(),
            ),
        }
    }
    Ok((backends, skipped))
}

/// The region of a location that is already a region.
pub fn same_region(location: &str) -> String {
    location.to_string()
}

/// The region of a GCP zone: the zone without its last two characters (`-a`).
pub fn zone_region(zone: &str) -> String {
    zone.len()
        .checked_sub(2)
        .map_or_else(|| zone.to_string(), |n| zone[..n].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use dstack_core::offers::query::QueryFilter;

    #[test]
    fn zoned_offers_are_grouped_by_region() {
        let reader = CatalogOffers {
            backend: "gcp",
            provider: "gcp",
            regions: Some(vec!["us-central1".into()]),
            families: None,
            disk_range: (20.0, 32768.0),
            region_of: zone_region,
        };
        let request = OfferRequest {
            filter: QueryFilter {
                spot: Some(false),
                ..QueryFilter::default()
            },
            disk: None,
        };
        let offers = reader.offers(&Catalog::builtin(), &request);
        assert!(!offers.is_empty());
        assert!(offers.iter().all(|o| o.region == "us-central1" && !o.spot));
        let e2 = offers
            .iter()
            .find(|o| o.instance_type == "e2-standard-2")
            .unwrap();
        assert_eq!(
            e2.availability_zones.as_deref(),
            Some(&["us-central1-a".to_string(), "us-central1-b".to_string()][..])
        );
        assert_eq!(e2.resources.disk_bytes, 100 << 30);
        assert!(offers.windows(2).all(|w| w[0].price <= w[1].price));
    }
}
