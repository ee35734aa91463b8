//! Ready-made fuse-blk block devices, and the parser for the CLI's BACKEND
//! argument that picks one.
//!
//! - [`MemDevice`]: a sparse RAM disk, for tests and scratch space.
//! - [`FileDevice`]: an image file or a host block device.
//! - [`NullDevice`]: stores nothing, for benchmarking the transports.
//!
//! ```
//! use fuse_blk_backends::BackendSpec;
//!
//! let spec: BackendSpec = "mem:64M".parse().unwrap();
//! assert_eq!(spec, BackendSpec::Mem { size: 64 << 20 });
//! let device = spec.open(false, 4096).unwrap();
//! assert_eq!(device.geometry().size, 64 << 20);
//! ```

#![deny(missing_docs)]

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use fuse_blk::{BlockDevice, Geometry};

mod bufs;
mod file;
mod mem;
mod null;
/// Drives a device through the session engine without a kernel, for
/// tests (also of devices in other crates, with the `testutil` feature).
#[cfg(any(test, feature = "testutil"))]
#[doc(hidden)]
pub mod testutil;

pub use file::FileDevice;
pub use mem::{MemDevice, CHUNK_SIZE};
pub use null::NullDevice;

/// Which backend to serve, as named on the command line: `mem:SIZE`,
/// `file:PATH` or `null:SIZE`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BackendSpec {
    /// `mem:SIZE`: a [`MemDevice`].
    Mem {
        /// Capacity in bytes.
        size: u64,
    },
    /// `file:PATH`: a [`FileDevice`].
    File {
        /// The image file or host block device.
        path: PathBuf,
    },
    /// `null:SIZE`: a [`NullDevice`].
    Null {
        /// Capacity in bytes.
        size: u64,
    },
}

const EXPECTED: &str = "expected mem:SIZE, file:PATH or null:SIZE";

/// Why a BACKEND argument was refused. Its `Display` is one line meant to
/// be shown to the user as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendSpecError {
    /// The argument was empty.
    Empty,
    /// The part before the colon is not a backend this crate has.
    UnknownBackend {
        /// The part before the colon.
        name: String,
    },
    /// `mem` or `null` without a size.
    MissingSize {
        /// `mem` or `null`.
        backend: &'static str,
    },
    /// `file` without a path.
    MissingPath,
    /// The size after `mem:` or `null:` does not parse.
    InvalidSize {
        /// The whole argument.
        spec: String,
        /// Why the size was refused.
        error: SizeError,
    },
}

impl fmt::Display for BackendSpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendSpecError::Empty => write!(f, "no backend given: {EXPECTED}"),
            BackendSpecError::UnknownBackend { name } => {
                write!(f, "unknown backend \"{name}\": {EXPECTED}")
            }
            BackendSpecError::MissingSize { backend } => write!(f, "{backend}: needs a size"),
            BackendSpecError::MissingPath => write!(f, "file: needs a path"),
            BackendSpecError::InvalidSize { spec, error } => {
                write!(f, "invalid size \"{}\" in \"{spec}\"", error.text)?;
                match error.reason {
                    SizeErrorReason::Malformed => Ok(()),
                    SizeErrorReason::TooLarge => write!(f, ": too large"),
                }
            }
        }
    }
}

impl std::error::Error for BackendSpecError {}

/// Why [`parse_size`] refused a size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeErrorReason {
    /// Not digits followed by an optional K, M, G or T suffix.
    Malformed,
    /// More than `u64::MAX` bytes.
    TooLarge,
}

/// A size that [`parse_size`] refused, with the text it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SizeError {
    /// The size as given.
    pub text: String,
    /// What is wrong with it.
    pub reason: SizeErrorReason,
}

impl fmt::Display for SizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid size \"{}\"", self.text)?;
        match self.reason {
            SizeErrorReason::Malformed => {
                write!(f, ": expected bytes, or a number with K, M, G or T")
            }
            SizeErrorReason::TooLarge => write!(f, ": too large"),
        }
    }
}

impl std::error::Error for SizeError {}

/// Binary units, largest first (the order [`format_size`] tries them in).
const UNITS: [(&str, u32); 4] = [("T", 40), ("G", 30), ("M", 20), ("K", 10)];

/// Parses a size in bytes: digits, optionally followed by a binary suffix
/// K, M, G or T (also KiB, MiB, GiB, TiB), in any case: `1048576`, `64M`,
/// `1g`, `2TiB`. Decimal units (KB, MB) are refused rather than guessed at.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let error = |reason| SizeError {
        text: text.to_owned(),
        reason,
    };
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    if digits.is_empty() {
        return Err(error(SizeErrorReason::Malformed));
    }
    let shift = if suffix.is_empty() {
        0
    } else {
        let suffix = suffix.to_ascii_lowercase();
        let unit = suffix.strip_suffix("ib").unwrap_or(&suffix);
        UNITS
            .iter()
            .find(|(name, _)| unit.eq_ignore_ascii_case(name))
            .map(|&(_, shift)| shift)
            .ok_or_else(|| error(SizeErrorReason::Malformed))?
    };
    // Only digits are left, so failing to parse means overflow.
    let value: u64 = digits
        .parse()
        .map_err(|_| error(SizeErrorReason::TooLarge))?;
    value
        .checked_mul(1 << shift)
        .ok_or_else(|| error(SizeErrorReason::TooLarge))
}

/// Formats a size the way [`parse_size`] reads it, with the largest binary
/// suffix that divides it exactly: `64M`, `1G`, `1536K`, `1000`.
pub fn format_size(size: u64) -> String {
    if size != 0 {
        for (name, shift) in UNITS {
            if size % (1 << shift) == 0 {
                return format!("{}{name}", size >> shift);
            }
        }
    }
    size.to_string()
}

impl FromStr for BackendSpec {
    type Err = BackendSpecError;

    fn from_str(spec: &str) -> Result<BackendSpec, BackendSpecError> {
        if spec.is_empty() {
            return Err(BackendSpecError::Empty);
        }
        let (name, value) = spec.split_once(':').unwrap_or((spec, ""));
        let size = |backend: &'static str| {
            if value.is_empty() {
                return Err(BackendSpecError::MissingSize { backend });
            }
            parse_size(value).map_err(|error| BackendSpecError::InvalidSize {
                spec: spec.to_owned(),
                error,
            })
        };
        // Only the backend's name is case-insensitive: a path is not.
        match name.to_ascii_lowercase().as_str() {
            "mem" => Ok(BackendSpec::Mem { size: size("mem")? }),
            "null" => Ok(BackendSpec::Null {
                size: size("null")?,
            }),
            "file" if value.is_empty() => Err(BackendSpecError::MissingPath),
            "file" => Ok(BackendSpec::File { path: value.into() }),
            _ => Err(BackendSpecError::UnknownBackend {
                name: name.to_owned(),
            }),
        }
    }
}

/// The canonical text, which parses back to the same spec: `mem:64M`,
/// `file:/var/lib/disk.img`, `null:1T`.
impl fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendSpec::Mem { size } => write!(f, "mem:{}", format_size(*size)),
            BackendSpec::File { path } => write!(f, "file:{}", path.display()),
            BackendSpec::Null { size } => write!(f, "null:{}", format_size(*size)),
        }
    }
}

impl BackendSpec {
    /// The backend's name: `mem`, `file` or `null`.
    pub fn kind(&self) -> &'static str {
        match self {
            BackendSpec::Mem { .. } => "mem",
            BackendSpec::File { .. } => "file",
            BackendSpec::Null { .. } => "null",
        }
    }

    /// Builds the device, checking its size against the block size so that
    /// a bad argument is reported here, in words that name the backend,
    /// rather than later by the session as a bare geometry error.
    pub fn open(
        &self,
        read_only: bool,
        logical_block_size: u32,
    ) -> io::Result<Arc<dyn BlockDevice>> {
        let check = |size: u64| {
            Geometry::new(size, logical_block_size)
                .validate()
                .map_err(|e| {
                    io::Error::new(io::ErrorKind::InvalidInput, format!("{}: {e}", self.kind()))
                })
        };
        Ok(match self {
            BackendSpec::Mem { size } => {
                check(*size)?;
                Arc::new(MemDevice::new(*size, logical_block_size)?.with_read_only(read_only))
            }
            BackendSpec::Null { size } => {
                check(*size)?;
                Arc::new(NullDevice::new(*size, logical_block_size).with_read_only(read_only))
            }
            BackendSpec::File { path } => {
                Arc::new(FileDevice::open(path, read_only, logical_block_size)?)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(spec: &str) -> Result<BackendSpec, String> {
        spec.parse::<BackendSpec>().map_err(|e| e.to_string())
    }

    #[test]
    fn sizes() {
        let good: &[(&str, u64)] = &[
            ("0", 0),
            ("1048576", 1 << 20),
            ("512", 512),
            ("4K", 4096),
            ("4k", 4096),
            ("4KiB", 4096),
            ("4kib", 4096),
            ("4KIB", 4096),
            ("64M", 64 << 20),
            ("64MiB", 64 << 20),
            ("1G", 1 << 30),
            ("1g", 1 << 30),
            ("1GiB", 1 << 30),
            ("2T", 2 << 40),
            ("2tib", 2 << 40),
            ("16777215T", 16_777_215 << 40),
            ("18446744073709551615", u64::MAX),
        ];
        for &(text, size) in good {
            assert_eq!(parse_size(text), Ok(size), "{text}");
        }
        let malformed = [
            "", "K", "12X", "1.5G", "-1", "+1", " 1", "1 ", "1KB", "1MB", "1B", "1Ki", "1GiBs",
            "0x10", "1e6", "1iB",
        ];
        for text in malformed {
            assert_eq!(
                parse_size(text),
                Err(SizeError {
                    text: text.into(),
                    reason: SizeErrorReason::Malformed
                }),
                "{text}"
            );
        }
        for text in [
            "16777216T",
            "18446744073709551616",
            "99999999999999999999999G",
        ] {
            assert_eq!(
                parse_size(text).unwrap_err().reason,
                SizeErrorReason::TooLarge,
                "{text}"
            );
        }
        assert_eq!(
            parse_size("12X").unwrap_err().to_string(),
            "invalid size \"12X\": expected bytes, or a number with K, M, G or T"
        );
        assert_eq!(parse_size("99999T").unwrap(), 99999 << 40);
        assert_eq!(
            parse_size("16777216T").unwrap_err().to_string(),
            "invalid size \"16777216T\": too large"
        );
    }

    #[test]
    fn format_sizes() {
        assert_eq!(format_size(0), "0");
        assert_eq!(format_size(1000), "1000");
        assert_eq!(format_size(4096), "4K");
        assert_eq!(format_size(1536 << 10), "1536K");
        assert_eq!(format_size(64 << 20), "64M");
        assert_eq!(format_size(1 << 30), "1G");
        assert_eq!(format_size(3 << 40), "3T");
        assert_eq!(format_size(u64::MAX), u64::MAX.to_string());
        for size in [
            0,
            1,
            512,
            4096,
            1536 << 10,
            64 << 20,
            5 << 40,
            u64::MAX,
            (1 << 63) + 4096,
        ] {
            assert_eq!(parse_size(&format_size(size)), Ok(size));
        }
    }

    #[test]
    fn good_specs() {
        let cases: &[(&str, BackendSpec, &str)] = &[
            ("mem:64M", BackendSpec::Mem { size: 64 << 20 }, "mem:64M"),
            ("mem:1048576", BackendSpec::Mem { size: 1 << 20 }, "mem:1M"),
            ("MEM:1GiB", BackendSpec::Mem { size: 1 << 30 }, "mem:1G"),
            ("null:1T", BackendSpec::Null { size: 1 << 40 }, "null:1T"),
            ("null:1000", BackendSpec::Null { size: 1000 }, "null:1000"),
            (
                "file:/tmp/x.img",
                BackendSpec::File {
                    path: "/tmp/x.img".into(),
                },
                "file:/tmp/x.img",
            ),
            (
                "file:disk.img",
                BackendSpec::File {
                    path: "disk.img".into(),
                },
                "file:disk.img",
            ),
            // Everything after the first colon is the path.
            (
                "file:/a:b/C.IMG",
                BackendSpec::File {
                    path: "/a:b/C.IMG".into(),
                },
                "file:/a:b/C.IMG",
            ),
            (
                "File:/dev/sdb",
                BackendSpec::File {
                    path: "/dev/sdb".into(),
                },
                "file:/dev/sdb",
            ),
        ];
        for (text, spec, canonical) in cases {
            assert_eq!(&parse(text).unwrap(), spec, "{text}");
            assert_eq!(spec.to_string(), *canonical, "{text}");
            assert_eq!(&parse(canonical).unwrap(), spec, "{canonical}");
        }
        assert_eq!(BackendSpec::Mem { size: 1 }.kind(), "mem");
        assert_eq!(BackendSpec::File { path: "x".into() }.kind(), "file");
        assert_eq!(BackendSpec::Null { size: 1 }.kind(), "null");
    }

    #[test]
    fn bad_specs_have_exact_messages() {
        let cases = [
            (
                "foo",
                "unknown backend \"foo\": expected mem:SIZE, file:PATH or null:SIZE",
            ),
            (
                "foo:1M",
                "unknown backend \"foo\": expected mem:SIZE, file:PATH or null:SIZE",
            ),
            (
                "/tmp/x.img",
                "unknown backend \"/tmp/x.img\": expected mem:SIZE, file:PATH or null:SIZE",
            ),
            (
                ":64M",
                "unknown backend \"\": expected mem:SIZE, file:PATH or null:SIZE",
            ),
            (
                "",
                "no backend given: expected mem:SIZE, file:PATH or null:SIZE",
            ),
            ("mem:12X", "invalid size \"12X\" in \"mem:12X\""),
            ("null:1.5G", "invalid size \"1.5G\" in \"null:1.5G\""),
            ("mem:64MB", "invalid size \"64MB\" in \"mem:64MB\""),
            (
                "mem:16777216T",
                "invalid size \"16777216T\" in \"mem:16777216T\": too large",
            ),
            ("mem:", "mem: needs a size"),
            ("mem", "mem: needs a size"),
            ("null:", "null: needs a size"),
            ("file:", "file: needs a path"),
            ("file", "file: needs a path"),
        ];
        for (text, message) in cases {
            assert_eq!(parse(text).unwrap_err(), message, "{text}");
        }
        assert_eq!(
            "mem:12X".parse::<BackendSpec>().unwrap_err(),
            BackendSpecError::InvalidSize {
                spec: "mem:12X".into(),
                error: SizeError {
                    text: "12X".into(),
                    reason: SizeErrorReason::Malformed
                },
            }
        );
    }

    #[test]
    fn open_checks_the_size() {
        let open_err = |spec: &str, block| match parse(spec).unwrap().open(false, block) {
            Ok(_) => panic!("{spec} opened"),
            Err(e) => {
                assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
                e.to_string()
            }
        };
        assert_eq!(
            open_err("mem:1000", 512),
            "mem: size 1000 is not a multiple of the block size 512"
        );
        assert_eq!(
            open_err("null:6K", 4096),
            "null: size 6144 is not a multiple of the block size 4096"
        );
        assert_eq!(open_err("mem:0", 512), "mem: size is zero");
        assert_eq!(
            open_err("mem:1M", 1000),
            "mem: block size 1000 is not a power of two between 512 and 4096"
        );
    }

    #[test]
    fn open_builds_the_device() {
        let device = parse("mem:1T").unwrap().open(true, 512).unwrap();
        let g = device.geometry();
        assert_eq!(
            (g.size, g.logical_block_size, g.read_only),
            (1 << 40, 512, true)
        );
        assert!(g.features.discard);

        let device = parse("null:6K").unwrap().open(false, 512).unwrap();
        let g = device.geometry();
        assert_eq!((g.size, g.read_only), (6144, false));
        assert!(g.features.flush);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let spec = BackendSpec::File { path: path.clone() };
        let g = spec.open(false, 4096).unwrap().geometry();
        assert_eq!(
            (g.size, g.logical_block_size, g.read_only),
            (1 << 20, 4096, false)
        );
        assert!(g.features.fua);

        std::fs::File::create(&path).unwrap().set_len(1000).unwrap();
        match spec.open(false, 512) {
            Ok(_) => panic!("opened"),
            Err(e) => assert_eq!(
                e.to_string(),
                format!(
                    "{}: size 1000 is not a multiple of the block size 512",
                    path.display()
                )
            ),
        }
    }
}
