//! `--upstream`: the service requests go to, and the URI each request takes there.

use std::fmt;

use http::Uri;
use http::uri::{Authority, Scheme};

/// `--upstream`: where requests go.
#[derive(Debug, Clone)]
pub(crate) struct Upstream {
    pub(crate) scheme: Scheme,
    pub(crate) authority: Authority,
    /// The path prefix, without a trailing slash (empty for none).
    pub(crate) base_path: String,
}

impl Upstream {
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        let uri: Uri = s
            .parse()
            .map_err(|e| format!("not a URL ({e}); expected http://HOST:PORT"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(
                    "https upstreams are not supported; point the proxy at the service's plain \
                     http:// address"
                        .into(),
                );
            }
            _ => return Err("expected an http:// URL such as http://127.0.0.1:5000".into()),
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or("the URL has no host; expected http://HOST:PORT")?;
        if authority.host().is_empty() {
            return Err("the URL has no host; expected http://HOST:PORT".into());
        }
        if authority.as_str().contains('@') {
            return Err("user names and passwords in the upstream URL are not supported".into());
        }
        if uri.query().is_some() {
            return Err("the upstream URL must not carry a query".into());
        }
        Ok(Self {
            scheme: Scheme::HTTP,
            authority,
            base_path: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    /// The upstream URI for a request's path and query.
    pub(crate) fn uri_for(&self, uri: &Uri) -> Result<Uri, http::Error> {
        let pq = match (self.base_path.is_empty(), uri.path_and_query()) {
            // The common case shares the request's bytes: no copy.
            (true, Some(pq)) => pq.clone(),
            (_, pq) => {
                let pq = pq.map_or("/", |pq| pq.as_str());
                http::uri::PathAndQuery::try_from(format!("{}{pq}", self.base_path))?
            }
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.base_path)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn upstreams() {
        let u = Upstream::parse("http://127.0.0.1:5000/api/").unwrap();
        assert_eq!(u.base_path, "/api");
        let to = u.uri_for(&"/orders?x=1".parse().unwrap()).unwrap();
        assert_eq!(to.to_string(), "http://127.0.0.1:5000/api/orders?x=1");
        let u = Upstream::parse("http://localhost:5000").unwrap();
        let to = u.uri_for(&"/".parse().unwrap()).unwrap();
        assert_eq!(to.to_string(), "http://localhost:5000/");
        assert!(Upstream::parse("localhost:5000").is_err());
        assert!(Upstream::parse("https://example.com").is_err());
        assert!(Upstream::parse("http://").is_err());
        assert!(Upstream::parse("http://h:1/?q=1").is_err());
        assert!(Upstream::parse("not a url").is_err());
    }
}
