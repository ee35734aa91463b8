//! Recognising NBD URIs (the NBD URI standard, doc/uri.md in the NBD
//! protocol's repository) and refusing plainly malformed ones before
//! libnbd, whose parser then reads the rest.

use std::fmt;

/// Schemes of the standard, as libnbd accepts them.
const SCHEMES: [&str; 6] = [
    "nbd",
    "nbds",
    "nbd+unix",
    "nbds+unix",
    "nbd+vsock",
    "nbds+vsock",
];

/// Why a BACKEND that looks like an NBD URI cannot be one. Its `Display`
/// is one line for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UriError {
    /// The BACKEND as given.
    pub uri: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl fmt::Display for UriError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.uri, self.reason)
    }
}

impl std::error::Error for UriError {}

/// The URI's scheme when it is one of the NBD schemes (in any case).
fn scheme(text: &str) -> Option<&str> {
    let (scheme, _) = text.split_once("://")?;
    SCHEMES
        .iter()
        .any(|known| known.eq_ignore_ascii_case(scheme))
        .then_some(scheme)
}

/// Whether `text` is meant as an NBD URI: it starts with an NBD scheme and
/// `://`. Anything else is some other backend.
pub fn is_nbd_uri(text: &str) -> bool {
    scheme(text).is_some()
}

/// Whether an NBD URI asks for TLS: its scheme is one of the `nbds`
/// ones (libnbd makes TLS required for those and disables it for the
/// others).
pub fn asks_for_tls(uri: &str) -> bool {
    scheme(uri).is_some_and(|scheme| scheme.len() >= 4 && scheme[..4].eq_ignore_ascii_case("nbds"))
}

/// Checks what libnbd's parser would report less clearly: a TCP URI
/// without a host, a unix URI without its socket, a host or export name
/// with bytes a URI cannot hold. libnbd reads everything else.
pub fn check(uri: &str) -> Result<(), UriError> {
    let error = |reason| {
        Err(UriError {
            uri: uri.to_owned(),
            reason,
        })
    };
    let Some(scheme) = scheme(uri) else {
        return error(
            "not an NBD URI: expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH",
        );
    };
    if uri.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return error("contains spaces or control characters (percent-encode them)");
    }
    let rest = &uri[scheme.len() + 3..];
    let (authority, path_and_query) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let query = path_and_query
        .split_once('?')
        .map(|(_, query)| query)
        .unwrap_or("");
    let has_param = |name: &str| {
        query
            .split('&')
            .any(|pair| pair.split_once('=').map(|(key, _)| key) == Some(name))
    };
    let transport = scheme.split_once('+').map(|(_, t)| t.to_ascii_lowercase());
    match transport.as_deref() {
        None => {
            // TCP: a host is needed, a port is optional and numeric.
            let host = authority
                .rsplit_once('@')
                .map_or(authority, |(_, host)| host);
            let (name, port) = match host.strip_prefix('[') {
                // [IPv6]:port
                Some(v6) => match v6.split_once(']') {
                    Some((name, after)) => (name, after.strip_prefix(':')),
                    None => return error("unterminated [IPv6 address]"),
                },
                None => match host.rsplit_once(':') {
                    Some((name, port)) => (name, Some(port)),
                    None => (host, None),
                },
            };
            if name.is_empty() {
                return error("no host: expected nbd://HOST[:PORT]/EXPORT");
            }
            if let Some(port) = port {
                if port.parse::<u16>().is_err() {
                    return error("the port is not a number from 0 to 65535");
                }
            }
        }
        Some("unix") => {
            // Only a user name (the TLS user) may come before the path.
            let host = authority
                .rsplit_once('@')
                .map_or(authority, |(_, host)| host);
            if !host.is_empty() {
                return error(
                    "a unix socket URI has no host: expected nbd+unix:///EXPORT?socket=PATH",
                );
            }
            if !has_param("socket") {
                return error("no socket: expected nbd+unix:///EXPORT?socket=PATH");
            }
        }
        // vsock: libnbd checks the CID and port.
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_nbd_schemes_only() {
        for uri in [
            "nbd://host/export",
            "NBD://host",
            "nbds://host:10809/",
            "nbd+unix:///?socket=/tmp/s",
            "nbds+unix:///e?socket=/tmp/s",
            "nbd+vsock://2",
        ] {
            assert!(is_nbd_uri(uri), "{uri}");
        }
        for text in [
            "nbd:host",
            "mem:64M",
            "file:/tmp/nbd://x",
            "http://host/",
            "nbd+tcp://host",
            "",
            "nbd",
        ] {
            assert!(!is_nbd_uri(text), "{text}");
        }
    }

    #[test]
    fn tls_is_asked_for_by_the_nbds_schemes() {
        for uri in [
            "nbds://host/",
            "NBDS://host",
            "nbds+unix:///?socket=/s",
            "nbds+vsock://2",
        ] {
            assert!(asks_for_tls(uri), "{uri}");
        }
        for uri in [
            "nbd://host/",
            "nbd+unix:///?socket=/s",
            "nbd+vsock://2",
            "mem:1G",
            "nbds",
        ] {
            assert!(!asks_for_tls(uri), "{uri}");
        }
    }

    #[test]
    fn accepts_well_formed_uris() {
        for uri in [
            "nbd://localhost",
            "nbd://localhost/",
            "nbd://localhost:10809/disk",
            "nbd://user@host:1/disk",
            "nbd://[::1]:10809/disk",
            "nbd://[::1]/disk",
            "nbds://host/disk?tls-psk-file=/etc/keys.psk",
            "nbd+unix:///disk?socket=/run/nbd.sock",
            "nbd+unix:///?socket=/run/nbd.sock",
            "nbd+unix://?socket=/run/nbd.sock",
            "nbds+unix://alice@/disk?socket=/run/nbd.sock&tls-psk-file=/k",
        ] {
            assert_eq!(check(uri), Ok(()), "{uri}");
        }
    }

    #[test]
    fn refuses_malformed_uris_with_a_reason() {
        let cases = [
            ("nbd:///disk", "no host: expected nbd://HOST[:PORT]/EXPORT"),
            ("nbd://:10809/disk", "no host: expected nbd://HOST[:PORT]/EXPORT"),
            ("nbd://host:port/disk", "the port is not a number from 0 to 65535"),
            ("nbd://host:70000/disk", "the port is not a number from 0 to 65535"),
            ("nbd://[::1/disk", "unterminated [IPv6 address]"),
            ("nbd://host/my disk", "contains spaces or control characters (percent-encode them)"),
            ("nbd+unix:///disk", "no socket: expected nbd+unix:///EXPORT?socket=PATH"),
            ("nbd+unix:///disk?sock=/x", "no socket: expected nbd+unix:///EXPORT?socket=PATH"),
            (
                "nbd+unix://host/disk?socket=/x",
                "a unix socket URI has no host: expected nbd+unix:///EXPORT?socket=PATH",
            ),
            (
                "mem:1G",
                "not an NBD URI: expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH",
            ),
        ];
        for (uri, reason) in cases {
            assert_eq!(
                check(uri).unwrap_err().to_string(),
                format!("{uri}: {reason}"),
                "{uri}"
            );
        }
    }
}
