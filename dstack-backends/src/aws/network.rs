//! Where AWS instances go, as dstack places them: the VPC of a region (`vpc_ids[region]`,
//! else the one whose `Name` tag is `vpc_name`, else the default VPC unless `default_vpcs` is
//! false), one subnet per availability zone of it (with public IPs: subnets routed to an
//! internet gateway; without: subnets whose `0.0.0.0/0` route goes through a NAT or transit
//! gateway or a peering connection — a subnet without a table of its own follows the VPC's
//! main table), and the project's security group in that VPC (SSH in from
//! `ssh_ingress_cidrs`, everything between its members).

use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{
    Filter, IpPermission, IpRange, Ipv6Range, ResourceType, RouteTable, TagSpecification,
    UserIdGroupPair,
};
use dstack_core::backend::ComputeError;

use super::{classify, tag, Aws};
use crate::config::SshIngress;

/// A region's VPC and the subnets instances may go in, one per availability zone, by zone.
#[derive(Clone, Debug)]
pub(super) struct Network {
    /// The VPC.
    pub vpc_id: String,
    /// Subnet ids.
    pub subnets: Vec<String>,
}

impl Aws {
    /// Whether instances get public IPs (`public_ips`, default true).
    pub(super) fn public_ips(&self) -> bool {
        self.config.public_ips.unwrap_or(true)
    }

    /// The VPC and subnets of `region` (within `zones` when the offer names some). A region
    /// where none can be used is an error naming the setting that rules it out.
    pub(super) async fn network(
        &self,
        client: &aws_sdk_ec2::Client,
        region: &str,
        zones: Option<&[String]>,
    ) -> Result<Network, ComputeError> {
        let vpc_id = self.vpc(client, region).await?;
        let mut subnets_call = client
            .describe_subnets()
            .filters(Filter::builder().name("vpc-id").values(&vpc_id).build());
        if let Some(zones) = zones.filter(|z| !z.is_empty()) {
            subnets_call = subnets_call.filters(
                Filter::builder()
                    .name("availability-zone")
                    .set_values(Some(zones.to_vec()))
                    .build(),
            );
        }
        let subnets = subnets_call
            .send()
            .await
            .map_err(|e| classify(e, "DescribeSubnets"))?;
        let tables = client
            .describe_route_tables()
            .filters(Filter::builder().name("vpc-id").values(&vpc_id).build())
            .send()
            .await
            .map_err(|e| classify(e, "DescribeRouteTables"))?;
        let tables = tables.route_tables();
        let public = self.public_ips();
        let mut usable: Vec<(String, String)> = subnets
            .subnets()
            .iter()
            .filter_map(|s| Some((s.availability_zone()?.to_string(), s.subnet_id()?)))
            .filter(|(_, id)| table_of(tables, id).is_some_and(|t| routes_out(t, public)))
            .map(|(zone, id)| (zone, id.to_string()))
            .collect();
        usable.sort();
        usable.dedup_by(|a, b| a.0 == b.0);
        if usable.is_empty() {
            let kind = if public {
                "public subnets (routed to an internet gateway)"
            } else {
                "private subnets with outbound access (public_ips is false: a route to a NAT \
                 or transit gateway or a peering connection)"
            };
            return Err(ComputeError::Other(format!(
                "VPC {vpc_id} in {region} has no {kind}"
            )));
        }
        Ok(Network {
            vpc_id,
            subnets: usable.into_iter().map(|(_, id)| id).collect(),
        })
    }

    /// The VPC instances of `region` go in.
    async fn vpc(
        &self,
        client: &aws_sdk_ec2::Client,
        region: &str,
    ) -> Result<String, ComputeError> {
        let configured = self.config.vpc_ids.as_ref().and_then(|ids| ids.get(region));
        let (filter, what) = if let Some(id) = configured {
            (
                Filter::builder().name("vpc-id").values(id).build(),
                format!("VPC {id} (vpc_ids)"),
            )
        } else if let Some(name) = &self.config.vpc_name {
            (
                Filter::builder().name("tag:Name").values(name).build(),
                format!("VPC named {name} (vpc_name)"),
            )
        } else if self.config.default_vpcs == Some(false) {
            return Err(ComputeError::Other(format!(
                "no VPC is configured for {region} in vpc_ids, and default_vpcs is false"
            )));
        } else {
            (
                Filter::builder().name("is-default").values("true").build(),
                "default VPC".to_string(),
            )
        };
        let found = client
            .describe_vpcs()
            .filters(filter)
            .send()
            .await
            .map_err(|e| classify(e, "DescribeVpcs"))?;
        found
            .vpcs()
            .iter()
            .find_map(|v| v.vpc_id())
            .map(str::to_string)
            .ok_or_else(|| ComputeError::Other(format!("no {what} in {region}")))
    }

    /// The project's security group in `vpc_id` (created when missing): SSH in from
    /// `ssh_ingress_cidrs`, everything between its members, everything out. dstack's group
    /// (`dstack_security_group_<project>`) for the default sources; one of its own, named
    /// with the list's hash, for others.
    pub(super) async fn security_group(
        &self,
        client: &aws_sdk_ec2::Client,
        vpc_id: &str,
    ) -> Result<String, ComputeError> {
        let ingress = SshIngress::of(self.config.ssh_ingress_cidrs.as_deref());
        let mut name = format!("dstack_security_group_{}", self.project_name);
        if let Some(suffix) = &ingress.suffix {
            name = format!("{name}_ssh_{suffix}");
        }
        let existing = client
            .describe_security_groups()
            .filters(Filter::builder().name("group-name").values(&name).build())
            .filters(Filter::builder().name("vpc-id").values(vpc_id).build())
            .send()
            .await
            .map_err(|e| classify(e, "DescribeSecurityGroups"))?;
        if let Some(id) = existing
            .security_groups()
            .first()
            .and_then(|g| g.group_id())
        {
            return Ok(id.to_string());
        }
        let created = match client
            .create_security_group()
            .group_name(&name)
            .vpc_id(vpc_id)
            .description("dstack-rs instances: SSH in, all traffic between members")
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::SecurityGroup)
                    .tags(tag("owner", "dstack"))
                    .tags(tag("dstack_project", &self.project_name))
                    .tags(tag("dstack_owner", &self.project.owner_id))
                    .build(),
            )
            .send()
            .await
        {
            Ok(created) => created,
            // Another process created it meanwhile.
            Err(e) if e.code() == Some("InvalidGroup.Duplicate") => {
                return Box::pin(self.security_group(client, vpc_id)).await;
            }
            Err(e) => return Err(classify(e, "CreateSecurityGroup")),
        };
        let id = created
            .group_id()
            .ok_or_else(|| ComputeError::Other("CreateSecurityGroup returned no id".into()))?
            .to_string();
        let mut ssh = IpPermission::builder()
            .ip_protocol("tcp")
            .from_port(22)
            .to_port(22);
        for cidr in &ingress.cidrs {
            ssh = if cidr.contains(':') {
                ssh.ipv6_ranges(Ipv6Range::builder().cidr_ipv6(cidr).build())
            } else {
                ssh.ip_ranges(IpRange::builder().cidr_ip(cidr).build())
            };
        }
        let authorized = client
            .authorize_security_group_ingress()
            .group_id(&id)
            .ip_permissions(ssh.build())
            .ip_permissions(
                IpPermission::builder()
                    .ip_protocol("-1")
                    .user_id_group_pairs(UserIdGroupPair::builder().group_id(&id).build())
                    .build(),
            )
            .send()
            .await;
        match authorized {
            Ok(_) => Ok(id),
            Err(e) if e.code() == Some("InvalidPermission.Duplicate") => Ok(id),
            Err(e) => Err(classify(e, "AuthorizeSecurityGroupIngress")),
        }
    }
}

/// The route table of a subnet: its own, else the VPC's main table.
fn table_of<'a>(tables: &'a [RouteTable], subnet_id: &str) -> Option<&'a RouteTable> {
    let associated = |t: &&RouteTable, own: bool| {
        t.associations().iter().any(|a| {
            if own {
                a.subnet_id() == Some(subnet_id)
            } else {
                a.main() == Some(true)
            }
        })
    };
    tables
        .iter()
        .find(|t| associated(t, true))
        .or_else(|| tables.iter().find(|t| associated(t, false)))
}

/// Whether a table routes the internet the way instances need: to an internet gateway
/// (`public`), or through a NAT or transit gateway or a peering connection.
fn routes_out(table: &RouteTable, public: bool) -> bool {
    table.routes().iter().any(|r| {
        if public {
            r.gateway_id().is_some_and(|g| g.starts_with("igw-"))
        } else {
            r.destination_cidr_block() == Some("0.0.0.0/0")
                && (r.nat_gateway_id().is_some()
                    || r.transit_gateway_id().is_some()
                    || r.vpc_peering_connection_id().is_some())
        }
    })
}
