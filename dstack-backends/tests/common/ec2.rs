//! Looking at moto directly: the SDK pointed at a [`Moto`] server, moto with its default VPCs
//! routed to the internet (as in a real account), and the image the fake instances "boot".
//! Reached through `dstack_backends::aws`'s re-exports, so that any test crate built with the
//! `aws` feature can use it.

use dstack_backends::aws::{aws_config, aws_sdk_ec2};
use dstack_backends::config::{OsImage, OsImages};

use aws_sdk_ec2::types::{Filter, InstanceStateName};

use super::moto::Moto;

/// A moto image the fake instances "boot", logged into as root (the namespace hosts' user).
pub fn image() -> OsImages {
    OsImages {
        cpu: Some(OsImage {
            name: "ubuntu/images/hvm-ssd/ubuntu-xenial-16.04-amd64-server-*".into(),
            owner: "099720109477".into(),
            user: "root".into(),
        }),
        nvidia: None,
    }
}

/// The SDK pointed at moto directly, to look at what the backend did.
pub async fn ec2(moto: &Moto, region: &str) -> aws_sdk_ec2::Client {
    ec2_at(&moto.url, region).await
}

/// The SDK pointed at `endpoint` (moto, or a proxy in front of it).
pub async fn ec2_at(endpoint: &str, region: &str) -> aws_sdk_ec2::Client {
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(region.to_string()))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_ec2::config::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .load()
        .await;
    aws_sdk_ec2::Client::new(&config)
}

/// moto, its default VPCs routed to an internet gateway as in a real account (moto's have
/// only the local route, so no subnet of theirs would count as public).
pub async fn start_moto() -> Moto {
    let moto = Moto::start();
    for region in ["us-east-1", "eu-west-1"] {
        let ec2 = ec2(&moto, region).await;
        let vpcs = ec2
            .describe_vpcs()
            .filters(Filter::builder().name("is-default").values("true").build())
            .send()
            .await
            .unwrap();
        let vpc = vpcs.vpcs()[0].vpc_id().unwrap().to_string();
        route_to_internet(&ec2, &vpc, None).await;
    }
    moto
}

/// Routes `0.0.0.0/0` of `subnet`'s own new route table (`None`: the VPC's main table) to a
/// new internet gateway of `vpc`.
pub async fn route_to_internet(ec2: &aws_sdk_ec2::Client, vpc: &str, subnet: Option<&str>) {
    let igw = ec2.create_internet_gateway().send().await.unwrap();
    let igw = igw
        .internet_gateway()
        .unwrap()
        .internet_gateway_id()
        .unwrap();
    ec2.attach_internet_gateway()
        .internet_gateway_id(igw)
        .vpc_id(vpc)
        .send()
        .await
        .unwrap();
    let table = route_table(ec2, vpc, subnet).await;
    ec2.create_route()
        .route_table_id(&table)
        .destination_cidr_block("0.0.0.0/0")
        .gateway_id(igw)
        .send()
        .await
        .unwrap();
}

/// A new route table of `subnet` in `vpc`, or the VPC's main table (`None`).
pub async fn route_table(ec2: &aws_sdk_ec2::Client, vpc: &str, subnet: Option<&str>) -> String {
    let Some(subnet) = subnet else {
        let main = ec2
            .describe_route_tables()
            .filters(Filter::builder().name("vpc-id").values(vpc).build())
            .filters(
                Filter::builder()
                    .name("association.main")
                    .values("true")
                    .build(),
            )
            .send()
            .await
            .unwrap();
        return main.route_tables()[0].route_table_id().unwrap().to_string();
    };
    let created = ec2.create_route_table().vpc_id(vpc).send().await.unwrap();
    let table = created
        .route_table()
        .unwrap()
        .route_table_id()
        .unwrap()
        .to_string();
    ec2.associate_route_table()
        .route_table_id(&table)
        .subnet_id(subnet)
        .send()
        .await
        .unwrap();
    table
}

/// Every instance moto holds in `region`.
pub async fn cloud_instances(moto: &Moto, region: &str) -> Vec<aws_sdk_ec2::types::Instance> {
    ec2(moto, region)
        .await
        .describe_instances()
        .send()
        .await
        .unwrap()
        .reservations()
        .iter()
        .flat_map(|r| r.instances().iter().cloned())
        .collect()
}

/// An instance's state.
pub fn state(i: &aws_sdk_ec2::types::Instance) -> InstanceStateName {
    i.state().and_then(|s| s.name()).cloned().unwrap()
}
