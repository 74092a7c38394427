//! Fetching from hosts the network chose: a PDS endpoint in a DID document, a `did:web`
//! host, a handle's well-known file. Anyone can publish those, so without a guard tap could
//! be made to fetch from its own loopback, a private network or a cloud metadata address
//! (SSRF). Hosts the operator configured (relay, PLC, handle resolver, webhook) are trusted
//! and do not go through here.
//!
//! The guard acts where the connection is made: the resolver hands reqwest only public
//! addresses, so a name that resolves to a private one (DNS rebinding included) has nothing
//! to connect to; a URL whose host is an IP literal (which reqwest connects to without
//! resolving) is checked before the request; redirects are followed only to public hosts
//! and never from https to http. `--allow-private-network` turns the address checks off
//! (tests, local development).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::{Host, Url};

/// Most redirects followed by a guarded client.
pub const MAX_REDIRECTS: usize = 5;

/// The flag that allows private addresses, named in refusals.
pub const FLAG: &str = "--allow-private-network";

/// Whether tap may connect to `ip` for a host learned from the network.
#[must_use]
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_documentation()
        || ip.is_multicast()
        || a == 0
        // 100.64.0.0/10, shared address space (carrier-grade NAT).
        || (a == 100 && (64..128).contains(&b))
        // 192.0.0.0/24, protocol assignments; 198.18.0.0/15, benchmarking.
        || (a == 192 && b == 0 && c == 0)
        || (a == 198 && (18..20).contains(&b))
        // 240.0.0.0/4, reserved.
        || a >= 240)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        // fc00::/7 unique local, fe80::/10 link-local, 2001:db8::/32 documentation.
        || (first & 0xfe00) == 0xfc00
        || (first & 0xffc0) == 0xfe80
        || (first == 0x2001 && ip.segments()[1] == 0x0db8))
}

/// Why a guarded fetch was refused.
#[must_use]
pub fn refusal(host: &str) -> String {
    format!("refusing to fetch from {host}: not a public address (start tap with {FLAG} to allow)")
}

/// Checks a URL learned from the network before it is fetched: http or https, and, unless
/// `allow_private`, no IP-literal host outside the public address space.
///
/// # Errors
/// What is wrong, naming the flag when it would allow the URL.
pub fn check_url(url: &Url, allow_private: bool) -> Result<(), String> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("refusing to fetch {url}: not http or https"));
    }
    let ip = match url.host() {
        Some(Host::Ipv4(v4)) => IpAddr::V4(v4),
        Some(Host::Ipv6(v6)) => IpAddr::V6(v6),
        Some(Host::Domain(_)) => return Ok(()),
        None => return Err(format!("refusing to fetch {url}: no host")),
    };
    if allow_private || is_public(ip) {
        Ok(())
    } else {
        Err(refusal(&ip.to_string()))
    }
}

/// A resolver that returns only public addresses (all of them when `allow_private`).
#[derive(Debug, Clone, Copy)]
pub struct PublicOnly {
    allow_private: bool,
}

impl Resolve for PublicOnly {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| allow_private || is_public(a.ip()))
                .collect();
            if found.is_empty() {
                return Err(refusal(&host).into());
            }
            let addrs: Addrs = Box::new(found.into_iter());
            Ok(addrs)
        })
    }
}

/// Applies the guard to a client builder: the public-only resolver and a redirect policy that
/// follows at most [`MAX_REDIRECTS`] hops, never from https to http and never to a refused
/// IP literal.
pub fn guard(builder: reqwest::ClientBuilder, allow_private: bool) -> reqwest::ClientBuilder {
    builder
        .dns_resolver(Arc::new(PublicOnly { allow_private }))
        .redirect(reqwest::redirect::Policy::custom(move |attempt| {
            let downgrade = attempt
                .previous()
                .last()
                .is_some_and(|prev| prev.scheme() == "https" && attempt.url().scheme() != "https");
            if attempt.previous().len() >= MAX_REDIRECTS {
                attempt.error("too many redirects")
            } else if downgrade {
                attempt.error("refusing a redirect from https to http")
            } else if let Err(why) = check_url(attempt.url(), allow_private) {
                attempt.error(why)
            } else {
                attempt.follow()
            }
        }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_loopback_link_local_and_reserved_addresses_are_not_public() {
        for text in [
            "127.0.0.1",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "::1",
            "fc00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.1.2.3",
        ] {
            assert!(!is_public(text.parse().unwrap()), "{text}");
        }
        for text in [
            "1.1.1.1",
            "93.184.216.34",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public(text.parse().unwrap()), "{text}");
        }
    }

    #[test]
    fn ip_literal_urls_are_checked_and_the_refusal_names_the_flag() {
        let url = |s: &str| Url::parse(s).unwrap();
        let err = check_url(&url("http://169.254.169.254/latest"), false).unwrap_err();
        assert!(err.contains(FLAG), "{err}");
        assert!(check_url(&url("http://[::1]:2583/"), false).is_err());
        assert!(check_url(&url("http://127.0.0.1:2583/"), true).is_ok());
        assert!(check_url(&url("https://pds.example.com/"), false).is_ok());
        assert!(check_url(&url("ftp://pds.example.com/"), true).is_err());
    }
}
