//! `type: gateway` — an ingress for services, in one backend and region.

use serde::Serialize;

use super::de::{int_within, Cx, Decode, Fields, Path};
use super::error::ErrorCode;
use super::limits;
use super::refs::{decode_tags, BackendType, Tags};
use super::yaml::Node;

/// The TLS certificate of a gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type")]
pub enum GatewayCertificate {
    /// Let's Encrypt (the default).
    #[serde(rename = "lets-encrypt")]
    LetsEncrypt,
    /// An AWS Certificate Manager certificate.
    #[serde(rename = "acm")]
    Acm {
        /// The certificate ARN.
        arn: String,
    },
    /// A GCP Certificate Manager certificate.
    #[serde(rename = "gcp-cm")]
    GcpCertificateManager {
        /// The certificate name.
        name: String,
    },
}

impl Decode for GatewayCertificate {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        let mut f = Fields::new(node, cx, path, "certificate")?;
        let kind: Option<String> = f.or(cx, path, "type", || "lets-encrypt".to_string());
        let cert = match kind.as_deref() {
            Some("lets-encrypt") => Some(GatewayCertificate::LetsEncrypt),
            Some("acm") => f
                .req(cx, path, "arn")
                .map(|arn| GatewayCertificate::Acm { arn }),
            Some("gcp-cm") => f
                .req(cx, path, "name")
                .map(|name| GatewayCertificate::GcpCertificateManager { name }),
            Some(other) => {
                let message = super::de::one_of_message(other, &["lets-encrypt", "acm", "gcp-cm"]);
                cx.invalid(node.get("type").unwrap_or(node), &path.key("type"), message);
                None
            }
            None => None,
        };
        f.finish(cx, path);
        cert
    }
}

/// A load balancer in front of the gateway (AWS ALB).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LoadBalancer {
    /// Always `alb`.
    #[serde(rename = "type")]
    pub kind: &'static str,
}

impl Decode for LoadBalancer {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        let mut f = Fields::new(node, cx, path, "load balancer")?;
        let kind = f.req_with(cx, path, "type", |n, cx, p| {
            let s = String::decode(n, cx, p)?;
            if s != "alb" {
                cx.error(
                    n.mark,
                    p,
                    ErrorCode::InvalidValue,
                    format!("invalid value '{s}'; expected alb"),
                );
                return None;
            }
            Some("alb")
        });
        f.finish(cx, path);
        Some(LoadBalancer { kind: kind? })
    }
}

/// `type: gateway`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GatewayConfiguration {
    /// The gateway name (generated when omitted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Make it the project's default gateway.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default: Option<bool>,
    /// The backend.
    pub backend: BackendType,
    /// The region.
    pub region: String,
    /// The instance type (backend default when omitted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    /// Wildcard domain for services (`<run>.<domain>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Give the gateway a public IP.
    pub public_ip: bool,
    /// The TLS certificate; `None` when explicitly `null`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate: Option<GatewayCertificate>,
    /// A load balancer in front.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    /// Number of gateway replicas.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i64>,
    /// Tags for the cloud resources.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<Tags>,
}

impl GatewayConfiguration {
    /// Decodes a gateway from the document's fields.
    pub fn read(f: &mut Fields<'_>, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        let name = f.opt(cx, path, "name");
        let default = f.opt(cx, path, "default");
        let backend = f.req(cx, path, "backend");
        let region = f.req(cx, path, "region");
        let instance_type = f.opt_with(cx, path, "instance_type", |n, cx, p| {
            let s = String::decode(n, cx, p)?;
            if s.is_empty() {
                cx.invalid(n, p, "must not be empty");
                return None;
            }
            Some(s)
        });
        let domain = f.opt(cx, path, "domain");
        let public_ip = f.or(cx, path, "public_ip", || true);
        let certificate = match f.take("certificate") {
            None => Some(GatewayCertificate::LetsEncrypt),
            Some(n) if n.is_null() => None,
            Some(n) => GatewayCertificate::decode(n, cx, &path.key("certificate")),
        };
        let load_balancer = f.opt(cx, path, "load_balancer");
        let replicas = f.opt_with(cx, path, "replicas", |n, cx, p| {
            int_within(n, cx, p, 1, limits::MAX_NODE_COUNT)
        });
        let tags = f.opt_with(cx, path, "tags", decode_tags);
        Some(GatewayConfiguration {
            name,
            default,
            backend: backend?,
            region: region?,
            instance_type,
            domain,
            public_ip: public_ip?,
            certificate,
            load_balancer,
            replicas,
            tags,
        })
    }
}
