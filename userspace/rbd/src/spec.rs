//! `rbd:POOL/IMAGE` and `rbd:POOL/NAMESPACE/IMAGE`: which image a device
//! serves.

use std::fmt;

/// The prefix that makes a backend spec an RBD image.
pub const PREFIX: &str = "rbd:";

/// A checked `rbd:` spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// The RADOS pool holding the image.
    pub pool: String,
    /// The RADOS namespace within the pool; empty for the default one.
    pub namespace: String,
    /// The image's name within the pool (and namespace).
    pub image: String,
}

/// Whether `text` is meant as an RBD image (and so is checked as one).
pub fn is_rbd_spec(text: &str) -> bool {
    text.starts_with(PREFIX)
}

impl Spec {
    /// Parses `rbd:POOL/IMAGE` or `rbd:POOL/NAMESPACE/IMAGE`. The error
    /// is one line naming what is wrong.
    pub fn parse(text: &str) -> Result<Spec, String> {
        let usage =
            || format!("{text}: an RBD image is rbd:POOL/IMAGE or rbd:POOL/NAMESPACE/IMAGE");
        let rest = text.strip_prefix(PREFIX).ok_or_else(usage)?;
        let parts: Vec<&str> = rest.split('/').collect();
        let (pool, namespace, image) = match parts.as_slice() {
            [pool, image] => (*pool, "", *image),
            [pool, namespace, image] => (*pool, *namespace, *image),
            _ => return Err(usage()),
        };
        if pool.is_empty() {
            return Err(format!("{text}: the pool name is missing"));
        }
        if image.is_empty() {
            return Err(format!("{text}: the image name is missing"));
        }
        if parts.len() == 3 && namespace.is_empty() {
            return Err(format!("{text}: the namespace name is missing"));
        }
        if let Some(bad) = [pool, namespace, image]
            .iter()
            .find(|name| name.contains(['@', '\0']) || name.chars().any(char::is_control))
        {
            return Err(format!(
                "{text}: {bad:?} is not a name (snapshots, @SNAP, are not served)"
            ));
        }
        Ok(Spec {
            pool: pool.to_owned(),
            namespace: namespace.to_owned(),
            image: image.to_owned(),
        })
    }
}

/// `rbd:POOL/IMAGE`, as typed.
impl fmt::Display for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{PREFIX}{}/{}", self.pool, self.image)
        } else {
            write!(f, "{PREFIX}{}/{}/{}", self.pool, self.namespace, self.image)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        let spec = Spec::parse("rbd:rbd/disk1").unwrap();
        assert_eq!(
            (
                spec.pool.as_str(),
                spec.namespace.as_str(),
                spec.image.as_str()
            ),
            ("rbd", "", "disk1")
        );
        assert_eq!(spec.to_string(), "rbd:rbd/disk1");
        let spec = Spec::parse("rbd:pool/ns/img").unwrap();
        assert_eq!(spec.namespace, "ns");
        assert_eq!(spec.to_string(), "rbd:pool/ns/img");
        assert!(is_rbd_spec("rbd:x"));
        assert!(!is_rbd_spec("file:/x"));
    }

    #[test]
    fn malformed_specs_name_the_cause() {
        let error = |text| Spec::parse(text).unwrap_err();
        assert_eq!(
            error("rbd:image"),
            "rbd:image: an RBD image is rbd:POOL/IMAGE or rbd:POOL/NAMESPACE/IMAGE"
        );
        assert_eq!(
            error("rbd:a/b/c/d"),
            "rbd:a/b/c/d: an RBD image is rbd:POOL/IMAGE or rbd:POOL/NAMESPACE/IMAGE"
        );
        assert_eq!(error("rbd:/img"), "rbd:/img: the pool name is missing");
        assert_eq!(error("rbd:pool/"), "rbd:pool/: the image name is missing");
        assert_eq!(
            error("rbd:pool//img"),
            "rbd:pool//img: the namespace name is missing"
        );
        assert_eq!(
            error("rbd:pool/img@snap"),
            "rbd:pool/img@snap: \"img@snap\" is not a name (snapshots, @SNAP, are not served)"
        );
    }
}
