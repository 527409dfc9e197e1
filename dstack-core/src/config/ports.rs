//! Port mappings: `8080`, `"8080"`, `"80:8080"`, `"*:8080"`, `{local_port, container_port}`.

use serde::Serialize;

use super::de::{int_between, Cx, Fields, Path};
use super::error::ErrorCode;
use super::yaml::{Node, NodeKind};

/// A container port published on a local port (any free one when `local_port` is `None`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PortMapping {
    /// The port on the client side; `None` picks a free port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_port: Option<u16>,
    /// The port inside the job.
    pub container_port: u16,
}

fn port_number(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<u16> {
    int_between(node, cx, path, 1, 65535).map(|p| p as u16)
}

fn port_text(text: &str, node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<u16> {
    match text.parse::<i64>() {
        Ok(p) if (1..=65535).contains(&p) => Some(p as u16),
        Ok(p) => {
            let message = format!("port must be between 1 and 65535, got {p}");
            cx.error(node.mark, path, ErrorCode::OutOfRange, message);
            None
        }
        Err(_) => {
            cx.invalid(node, path, format!("invalid port '{text}'"));
            None
        }
    }
}

/// Decodes an entry of `ports:`. `allow_any_local` permits `*:N`; `default_local` is the local
/// port of a bare number (`None`: the same as the container port).
pub fn decode_port(
    node: &Node,
    cx: &mut Cx,
    path: &Path<'_>,
    allow_any_local: bool,
    default_local: Option<u16>,
) -> Option<PortMapping> {
    match &node.kind {
        NodeKind::Int(_) | NodeKind::Float(_) => {
            let port = port_number(node, cx, path)?;
            Some(PortMapping {
                local_port: Some(default_local.unwrap_or(port)),
                container_port: port,
            })
        }
        NodeKind::Str(s) => {
            let text = s.trim();
            let hint = if allow_any_local {
                "PORT, LOCAL:PORT or *:PORT"
            } else {
                "PORT or LOCAL:PORT"
            };
            let valid = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
            match text.split_once(':') {
                None if valid(text) => {
                    let port = port_text(text, node, cx, path)?;
                    Some(PortMapping {
                        local_port: Some(default_local.unwrap_or(port)),
                        container_port: port,
                    })
                }
                Some((local, container))
                    if valid(container) && (valid(local) || (allow_any_local && local == "*")) =>
                {
                    let container_port = port_text(container, node, cx, path)?;
                    let local_port = if local == "*" {
                        None
                    } else {
                        Some(port_text(local, node, cx, path)?)
                    };
                    Some(PortMapping {
                        local_port,
                        container_port,
                    })
                }
                _ => {
                    cx.invalid(
                        node,
                        path,
                        format!("invalid port mapping '{s}'; expected {hint}"),
                    );
                    None
                }
            }
        }
        NodeKind::Map(_) => {
            let mut f = Fields::new(node, cx, path, "port mapping")?;
            let container_port = f.req_with(cx, path, "container_port", port_number);
            let local_port = f.opt_with(cx, path, "local_port", port_number);
            f.finish(cx, path);
            Some(PortMapping {
                local_port,
                container_port: container_port?,
            })
        }
        _ => {
            cx.expected(node, path, "a port (8080, \"80:8080\") or a port mapping");
            None
        }
    }
}

/// Decodes a `ports:` list (`*:N` allowed).
pub fn decode_ports(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Vec<PortMapping>> {
    let NodeKind::Seq(items) = &node.kind else {
        cx.expected(node, path, "a list of ports");
        return None;
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        out.push(decode_port(item, cx, &path.index(i), true, None));
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::yaml::load;

    fn ports(text: &str) -> Result<String, String> {
        let doc = load(&format!("v: {text}")).unwrap();
        let mut cx = Cx::default();
        match decode_ports(doc.get("v").unwrap(), &mut cx, &Path::ROOT) {
            Some(p) if !cx.has_errors() => Ok(serde_json::to_string(&p).unwrap()),
            _ => Err(cx.into_errors()[0].to_string()),
        }
    }

    #[test]
    fn port_vectors() {
        let same = r#"[{"local_port":8080,"container_port":8080}]"#;
        assert_eq!(ports("[8080]").unwrap(), same);
        assert_eq!(ports("['8080']").unwrap(), same);
        assert_eq!(
            ports("['80:8080']").unwrap(),
            r#"[{"local_port":80,"container_port":8080}]"#
        );
        assert_eq!(ports("['*:8080']").unwrap(), r#"[{"container_port":8080}]"#);
        assert_eq!(
            ports("[{container_port: 22}]").unwrap(),
            r#"[{"container_port":22}]"#
        );
        assert_eq!(
            ports("[abc]").unwrap_err(),
            "1:5: [0]: invalid port mapping 'abc'; expected PORT, LOCAL:PORT or *:PORT [invalid_value]"
        );
        assert_eq!(
            ports("[70000]").unwrap_err(),
            "1:5: [0]: must be between 1 and 65535, got 70000 [out_of_range]"
        );
        assert_eq!(
            ports("['0']").unwrap_err(),
            "1:5: [0]: port must be between 1 and 65535, got 0 [out_of_range]"
        );
    }
}
