//! The store's URL: one Redis server (`redis://`, `rediss://`) or the seed nodes of a Redis
//! Cluster (`redis+cluster://`, `rediss+cluster://`).

use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo};

use super::error::config_error;
use crate::store::StoreError;

/// Where the URL points.
pub(super) enum Target {
    Single(Box<ConnectionInfo>),
    Cluster(Vec<ConnectionInfo>),
}

impl Target {
    /// Reads `url`. A cluster URL names several `host:port` pairs that share the user, password
    /// and everything after the authority; each becomes a URL of its own, which redis-rs reads.
    pub(super) fn parse(url: &str) -> Result<Self, StoreError> {
        let cluster_scheme = [
            ("redis+cluster://", "redis"),
            ("rediss+cluster://", "rediss"),
        ]
        .into_iter()
        .find(|(prefix, _)| {
            url.get(..prefix.len())
                .is_some_and(|s| s.eq_ignore_ascii_case(prefix))
        });
        let Some((prefix, scheme)) = cluster_scheme else {
            let info = url.into_connection_info().map_err(|e| {
                config_error(format!(
                    "{e}; expected redis://, rediss:// or redis+cluster://"
                ))
            })?;
            return Ok(Target::Single(Box::new(info)));
        };
        let rest = &url[prefix.len()..];
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let (userinfo, hosts) = match authority.rfind('@') {
            Some(at) => (&authority[..=at], &authority[at + 1..]),
            None => ("", authority),
        };
        let nodes = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|host| {
                format!("{scheme}://{userinfo}{host}{tail}")
                    .into_connection_info()
                    .map_err(|e| config_error(format!("cluster node {host:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if nodes.is_empty() {
            return Err(config_error("a cluster URL needs at least one host:port"));
        }
        Ok(Target::Cluster(nodes))
    }

    pub(super) fn is_cluster(&self) -> bool {
        matches!(self, Target::Cluster(_))
    }

    pub(super) fn uses_tls(&self) -> bool {
        let tls = |info: &ConnectionInfo| matches!(info.addr(), ConnectionAddr::TcpTls { .. });
        match self {
            Target::Single(info) => tls(info),
            Target::Cluster(nodes) => nodes.iter().any(tls),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_urls_name_every_node() {
        let Ok(Target::Cluster(nodes)) =
            Target::parse("redis+cluster://u:p@127.0.0.1:7000,127.0.0.1:7001/?protocol=resp3")
        else {
            panic!("not a cluster")
        };
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[1].addr().to_string(), "127.0.0.1:7001");
        assert_eq!(nodes[1].redis_settings().password(), Some("p"));
        assert!(matches!(
            Target::parse("redis://127.0.0.1:6379/2"),
            Ok(Target::Single(_))
        ));
        assert!(matches!(
            Target::parse("rediss+cluster://h:1"),
            Ok(Target::Cluster(ref n)) if matches!(n[0].addr(), ConnectionAddr::TcpTls { .. })
        ));
        assert!(Target::parse("redis+cluster://").is_err());
        assert!(Target::parse("http://example.com").is_err());
    }
}
