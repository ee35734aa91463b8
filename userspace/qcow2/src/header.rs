//! The qcow2 header: parsing, validation against what this crate supports,
//! and the few fields it ever writes back.
//!
//! Layout (big-endian), from qemu's docs/interop/qcow2.txt:
//!
//! ```text
//!  0 magic "QFI\xfb"          4 version (2 or 3)
//!  8 backing_file_offset     16 backing_file_size
//! 20 cluster_bits            24 size (virtual, bytes)
//! 32 crypt_method            36 l1_size (entries)
//! 40 l1_table_offset         48 refcount_table_offset
//! 56 refcount_table_clusters 60 nb_snapshots
//! 64 snapshots_offset        -- version 3 only: --
//! 72 incompatible_features   80 compatible_features
//! 88 autoclear_features      96 refcount_order
//! 100 header_length          104 compression_type (if header_length > 104)
//! ```
//!
//! Header extensions (type u32, length u32, data padded to 8 bytes) follow
//! at `header_length` (72 for version 2), up to a type-0 end marker.

use std::fmt;

/// The first four bytes of every qcow2 image.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";
/// Bytes of the fixed header of a version 2 image.
pub const V2_HEADER_LENGTH: u32 = 72;
/// Bytes of the fixed header of a version 3 image without compression type.
pub const V3_HEADER_LENGTH: u32 = 104;

/// Incompatible feature bits.
pub mod incompatible {
    /// Refcounts may be stale (lazy refcounts were in use).
    pub const DIRTY: u64 = 1 << 0;
    /// qemu found the metadata inconsistent and stopped writing.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data lives in a separate file.
    pub const EXTERNAL_DATA: u64 = 1 << 2;
    /// The compression_type field is meaningful.
    pub const COMPRESSION_TYPE: u64 = 1 << 3;
    /// L2 entries are 128 bits with subcluster bitmaps.
    pub const EXTENDED_L2: u64 = 1 << 4;
    /// The bits this crate knows how to handle (or to refuse by name).
    pub const KNOWN: u64 = DIRTY | CORRUPT | EXTERNAL_DATA | COMPRESSION_TYPE | EXTENDED_L2;
}

/// Compatible feature bits.
pub mod compatible {
    /// Refcount updates may be deferred (with the dirty bit set meanwhile).
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Header extension types.
mod extension {
    pub const END: u32 = 0;
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    pub const FULL_DISK_ENCRYPTION: u32 = 0x0537_be77;
    pub const EXTERNAL_DATA_FILE: u32 = 0x4441_5441;
}

/// How compressed clusters are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate (no zlib header), window of 4 KiB (-12 bits).
    Deflate,
    /// Zstandard frames (compression type 1).
    Zstd,
}

/// The parts of a qcow2 header this crate uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// The backing file's name as stored, relative to the image's
    /// directory unless absolute; `None` without one.
    pub backing_file: Option<String>,
    /// From the backing format extension: `raw`, `qcow2`, ...
    pub backing_format: Option<String>,
    /// log2 of the cluster size in bytes, 9 to 21.
    pub cluster_bits: u32,
    /// Guest (virtual) size in bytes, as the header says it.
    pub size: u64,
    /// Entries (8 bytes each) of the L1 table.
    pub l1_size: u32,
    /// File offset of the L1 table, cluster-aligned.
    pub l1_table_offset: u64,
    /// File offset of the refcount table, cluster-aligned.
    pub refcount_table_offset: u64,
    /// Clusters the refcount table occupies.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// File offset of the snapshot table.
    pub snapshots_offset: u64,
    /// [`incompatible`] bits: one this crate does not know refuses the
    /// image.
    pub incompatible_features: u64,
    /// [`compatible`] bits: safe to ignore.
    pub compatible_features: u64,
    /// Bits a writer that does not know them must clear.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits (4 = 16-bit, version 2's only).
    pub refcount_order: u32,
    /// Bytes of the fixed header; the extensions follow.
    pub header_length: u32,
    /// How compressed clusters are compressed.
    pub compression: Compression,
}

/// Why a file is not a qcow2 image this crate can serve. `Display` is one
/// line, shown after the image's path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// No qcow2 magic.
    NotQcow2,
    /// The file ends inside the header.
    Truncated {
        /// The file's length in bytes.
        len: u64,
    },
    /// A version other than 2 or 3.
    UnsupportedVersion(u32),
    /// Clusters outside 512 bytes to 2 MiB.
    BadClusterBits(u32),
    /// The image is encrypted.
    Encrypted,
    /// qemu marked the image corrupt.
    Corrupt,
    /// Guest data lives in an external data file.
    ExternalDataFile,
    /// Extended L2 entries (subclusters).
    ExtendedL2,
    /// Incompatible feature bits this crate does not know.
    UnknownIncompatible(u64),
    /// A refcount width outside 1 to 64 bits.
    BadRefcountOrder(u32),
    /// A header length that is too short, not a multiple of 8, larger
    /// than a cluster, or without room for the compression type it
    /// announces.
    BadHeaderLength(u32),
    /// A compression type other than deflate (0) or zstd (1).
    UnknownCompression(u8),
    /// A table that does not start on a cluster boundary.
    Misaligned {
        /// Which table.
        what: &'static str,
        /// Its file offset.
        offset: u64,
    },
    /// A table at offset 0 or past the end of the file.
    OutsideFile {
        /// Which table.
        what: &'static str,
        /// Its file offset.
        offset: u64,
        /// The file's length in bytes.
        len: u64,
    },
    /// An L1 table too small to map the guest size.
    L1TooSmall {
        /// Entries the header gives it.
        entries: u32,
        /// Entries the guest size needs.
        needed: u64,
    },
    /// A backing file name that is empty, longer than 1023 bytes, not
    /// UTF-8, or outside the first cluster.
    BadBackingName,
    /// A header extension that runs past the first cluster, or whose data
    /// does not parse.
    BadExtension {
        /// File offset of the extension.
        offset: u64,
    },
    /// A guest size beyond 2^62 bytes.
    TooLarge(u64),
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::NotQcow2 => write!(f, "not a qcow2 image (no QFI\\xfb magic)"),
            HeaderError::Truncated { len } => {
                write!(f, "truncated qcow2 header ({len} bytes of file)")
            }
            HeaderError::UnsupportedVersion(v) => {
                write!(f, "qcow2 version {v} is not supported (only 2 and 3)")
            }
            HeaderError::BadClusterBits(b) => write!(
                f,
                "cluster_bits {b} is outside 9..=21 (512 bytes to 2 MiB clusters)"
            ),
            HeaderError::Encrypted => write!(f, "encrypted qcow2 images are not supported"),
            HeaderError::Corrupt => write!(
                f,
                "image is marked corrupt; repair it with `qemu-img check -r all` first"
            ),
            HeaderError::ExternalDataFile => {
                write!(
                    f,
                    "qcow2 images with an external data file are not supported"
                )
            }
            HeaderError::ExtendedL2 => {
                write!(
                    f,
                    "qcow2 images with extended L2 entries (subclusters) are not supported"
                )
            }
            HeaderError::UnknownIncompatible(bits) => {
                write!(f, "unknown incompatible qcow2 feature bits {bits:#x}")
            }
            HeaderError::BadRefcountOrder(o) => {
                write!(f, "refcount_order {o} is outside 0..=6")
            }
            HeaderError::BadHeaderLength(l) => write!(f, "invalid qcow2 header_length {l}"),
            HeaderError::UnknownCompression(t) => {
                write!(f, "unknown qcow2 compression type {t}")
            }
            HeaderError::Misaligned { what, offset } => {
                write!(f, "{what} at {offset:#x} is not cluster-aligned")
            }
            HeaderError::OutsideFile { what, offset, len } => write!(
                f,
                "{what} at {offset:#x} lies outside the file ({len} bytes)"
            ),
            HeaderError::L1TooSmall { entries, needed } => write!(
                f,
                "L1 table has {entries} entries, the image size needs {needed}"
            ),
            HeaderError::BadBackingName => write!(f, "invalid backing file name in the header"),
            HeaderError::BadExtension { offset } => {
                write!(f, "malformed header extension at {offset:#x}")
            }
            HeaderError::TooLarge(size) => write!(f, "virtual size {size} is too large"),
        }
    }
}

impl std::error::Error for HeaderError {}

fn be32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(buf: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

impl Header {
    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Parses and validates the header of an image of `file_len` bytes
    /// whose first cluster (or all of it, if shorter) is `first`. Extensions
    /// beyond `first` are not read: qemu keeps them in the first cluster.
    pub fn parse(first: &[u8], file_len: u64) -> Result<Header, HeaderError> {
        if first.len() < 4 || first[..4] != MAGIC {
            return Err(HeaderError::NotQcow2);
        }
        if first.len() < V2_HEADER_LENGTH as usize {
            return Err(HeaderError::Truncated { len: file_len });
        }
        let version = be32(first, 4);
        if version != 2 && version != 3 {
            return Err(HeaderError::UnsupportedVersion(version));
        }
        let cluster_bits = be32(first, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(HeaderError::BadClusterBits(cluster_bits));
        }
        let cluster_size = 1u64 << cluster_bits;
        // Everything of the header lies in its first cluster.
        let first = &first[..first.len().min(cluster_size as usize)];
        let mut header = Header {
            version,
            backing_file: None,
            backing_format: None,
            cluster_bits,
            size: be64(first, 24),
            l1_size: be32(first, 36),
            l1_table_offset: be64(first, 40),
            refcount_table_offset: be64(first, 48),
            refcount_table_clusters: be32(first, 56),
            nb_snapshots: be32(first, 60),
            snapshots_offset: be64(first, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LENGTH,
            compression: Compression::Deflate,
        };
        if be32(first, 32) != 0 {
            return Err(HeaderError::Encrypted);
        }
        if version == 3 {
            if first.len() < V3_HEADER_LENGTH as usize {
                return Err(HeaderError::Truncated { len: file_len });
            }
            header.incompatible_features = be64(first, 72);
            header.compatible_features = be64(first, 80);
            header.autoclear_features = be64(first, 88);
            header.refcount_order = be32(first, 96);
            header.header_length = be32(first, 100);
            if header.header_length < V3_HEADER_LENGTH
                || header.header_length % 8 != 0
                || u64::from(header.header_length) > cluster_size
            {
                return Err(HeaderError::BadHeaderLength(header.header_length));
            }
            if first.len() < header.header_length as usize {
                return Err(HeaderError::Truncated { len: file_len });
            }
        }
        let incompatible = header.incompatible_features;
        if incompatible & !incompatible::KNOWN != 0 {
            return Err(HeaderError::UnknownIncompatible(
                incompatible & !incompatible::KNOWN,
            ));
        }
        if incompatible & incompatible::CORRUPT != 0 {
            return Err(HeaderError::Corrupt);
        }
        if incompatible & incompatible::EXTERNAL_DATA != 0 {
            return Err(HeaderError::ExternalDataFile);
        }
        if incompatible & incompatible::EXTENDED_L2 != 0 {
            return Err(HeaderError::ExtendedL2);
        }
        if incompatible & incompatible::COMPRESSION_TYPE != 0 {
            if header.header_length <= V3_HEADER_LENGTH {
                return Err(HeaderError::BadHeaderLength(header.header_length));
            }
            header.compression = match first[104] {
                0 => Compression::Deflate,
                1 => Compression::Zstd,
                other => return Err(HeaderError::UnknownCompression(other)),
            };
        }
        if header.refcount_order > 6 {
            return Err(HeaderError::BadRefcountOrder(header.refcount_order));
        }
        // Virtual sizes past 2^62 overflow the offset arithmetic qemu
        // itself limits (QCOW_MAX_L1_SIZE etc.).
        if header.size > 1 << 62 {
            return Err(HeaderError::TooLarge(header.size));
        }

        let check_table = |what: &'static str, offset: u64, bytes: u64| {
            if offset % cluster_size != 0 {
                return Err(HeaderError::Misaligned { what, offset });
            }
            if offset == 0 || offset.checked_add(bytes).is_none_or(|end| end > file_len) {
                return Err(HeaderError::OutsideFile {
                    what,
                    offset,
                    len: file_len,
                });
            }
            Ok(())
        };
        let l2_entries = cluster_size / 8;
        let needed = header.size.div_ceil(l2_entries * cluster_size);
        if u64::from(header.l1_size) < needed {
            return Err(HeaderError::L1TooSmall {
                entries: header.l1_size,
                needed,
            });
        }
        if header.l1_size > 0 {
            check_table(
                "L1 table",
                header.l1_table_offset,
                u64::from(header.l1_size) * 8,
            )?;
        }
        check_table(
            "refcount table",
            header.refcount_table_offset,
            u64::from(header.refcount_table_clusters) * cluster_size,
        )?;

        let backing_offset = be64(first, 8);
        let backing_len = be32(first, 16) as usize;
        if backing_offset != 0 {
            let name = usize::try_from(backing_offset)
                .ok()
                .and_then(|start| Some(start..start.checked_add(backing_len)?))
                .and_then(|range| first.get(range))
                .ok_or(HeaderError::BadBackingName)?;
            let name = std::str::from_utf8(name).map_err(|_| HeaderError::BadBackingName)?;
            if name.is_empty() || name.contains('\0') || backing_len > 1023 {
                return Err(HeaderError::BadBackingName);
            }
            header.backing_file = Some(name.to_owned());
        }

        header.parse_extensions(first)?;
        Ok(header)
    }

    fn parse_extensions(&mut self, first: &[u8]) -> Result<(), HeaderError> {
        let mut at = self.header_length as usize;
        loop {
            let bad = HeaderError::BadExtension { offset: at as u64 };
            if at + 8 > first.len() {
                // qemu always ends the list with an END marker; a header
                // cluster cut short before one is not worth refusing.
                return Ok(());
            }
            let kind = be32(first, at);
            let len = be32(first, at + 4) as usize;
            let data = first.get(at + 8..at + 8 + len).ok_or(bad.clone())?;
            match kind {
                extension::END => return Ok(()),
                extension::BACKING_FORMAT => {
                    let format = std::str::from_utf8(data).map_err(|_| bad.clone())?;
                    self.backing_format = Some(format.trim_end_matches('\0').to_owned());
                }
                extension::FULL_DISK_ENCRYPTION => return Err(HeaderError::Encrypted),
                extension::EXTERNAL_DATA_FILE => return Err(HeaderError::ExternalDataFile),
                // Feature names, bitmaps and anything newer: not needed
                // to read or write guest data.
                _ => {}
            }
            at += 8 + len.next_multiple_of(8);
        }
    }

    /// Whether the refcounts may be stale (lazy refcounts, not closed
    /// cleanly): they are rebuilt before the image is written.
    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & incompatible::DIRTY != 0
    }
}

/// Byte offset of `autoclear_features` (version 3), which a writer that
/// does not know a bit must clear.
pub const AUTOCLEAR_OFFSET: u64 = 88;
/// Byte offset of `refcount_table_offset` (u64), followed by
/// `refcount_table_clusters` (u32): one write moves the table.
pub const REFCOUNT_TABLE_FIELDS: u64 = 48;
/// Byte offset of `incompatible_features` (version 3).
pub const INCOMPATIBLE_FEATURES: u64 = 72;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal valid version 3 header of a 64 KiB-cluster image whose
    /// L1 table is at 0x30000 and refcount table at 0x10000.
    pub fn v3_header(size: u64) -> Vec<u8> {
        let mut h = vec![0u8; 65536];
        h[..4].copy_from_slice(&MAGIC);
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[24..32].copy_from_slice(&size.to_be_bytes());
        h[36..40].copy_from_slice(&1u32.to_be_bytes());
        h[40..48].copy_from_slice(&0x30000u64.to_be_bytes());
        h[48..56].copy_from_slice(&0x10000u64.to_be_bytes());
        h[56..60].copy_from_slice(&1u32.to_be_bytes());
        h[96..100].copy_from_slice(&4u32.to_be_bytes());
        h[100..104].copy_from_slice(&112u32.to_be_bytes());
        h
    }

    fn parse(h: &[u8]) -> Result<Header, String> {
        Header::parse(h, 0x50000).map_err(|e| e.to_string())
    }

    #[test]
    fn parses_a_minimal_v3_header() {
        let header = parse(&v3_header(1 << 20)).unwrap();
        assert_eq!(header.version, 3);
        assert_eq!(header.cluster_size(), 65536);
        assert_eq!(header.size, 1 << 20);
        assert_eq!(header.refcount_order, 4);
        assert_eq!(header.compression, Compression::Deflate);
        assert_eq!(header.backing_file, None);
    }

    #[test]
    fn refuses_bad_headers_in_one_line() {
        let set_u32 = |at: usize, v: u32| {
            let mut h = v3_header(1 << 20);
            h[at..at + 4].copy_from_slice(&v.to_be_bytes());
            parse(&h).unwrap_err()
        };
        let set_u64 = |at: usize, v: u64| {
            let mut h = v3_header(1 << 20);
            h[at..at + 8].copy_from_slice(&v.to_be_bytes());
            parse(&h).unwrap_err()
        };
        assert_eq!(
            parse(b"hello world").unwrap_err(),
            "not a qcow2 image (no QFI\\xfb magic)"
        );
        assert_eq!(
            parse(&v3_header(1 << 20)[..50]).unwrap_err(),
            "truncated qcow2 header (327680 bytes of file)"
        );
        assert_eq!(
            set_u32(4, 4),
            "qcow2 version 4 is not supported (only 2 and 3)"
        );
        assert_eq!(
            set_u32(20, 22),
            "cluster_bits 22 is outside 9..=21 (512 bytes to 2 MiB clusters)"
        );
        assert_eq!(set_u32(32, 2), "encrypted qcow2 images are not supported");
        assert_eq!(
            set_u64(72, 1 << 40),
            "unknown incompatible qcow2 feature bits 0x10000000000"
        );
        assert_eq!(
            set_u64(72, 2),
            "image is marked corrupt; repair it with `qemu-img check -r all` first"
        );
        assert_eq!(
            set_u64(72, 4),
            "qcow2 images with an external data file are not supported"
        );
        assert_eq!(set_u32(96, 7), "refcount_order 7 is outside 0..=6");
        assert_eq!(
            set_u64(40, 0x80000),
            "L1 table at 0x80000 lies outside the file (327680 bytes)"
        );
        assert_eq!(
            set_u64(40, 0x30200),
            "L1 table at 0x30200 is not cluster-aligned"
        );
        assert_eq!(
            set_u32(36, 0),
            "L1 table has 0 entries, the image size needs 1"
        );
        assert_eq!(set_u32(100, 100), "invalid qcow2 header_length 100");
        // Backing name pointing outside the first cluster.
        let mut h = v3_header(1 << 20);
        h[8..16].copy_from_slice(&70000u64.to_be_bytes());
        h[16..20].copy_from_slice(&4u32.to_be_bytes());
        assert_eq!(
            parse(&h).unwrap_err(),
            "invalid backing file name in the header"
        );
    }

    #[test]
    fn reads_the_backing_name_and_format() {
        let mut h = v3_header(1 << 20);
        h[8..16].copy_from_slice(&512u64.to_be_bytes());
        h[16..20].copy_from_slice(&8u32.to_be_bytes());
        h[512..520].copy_from_slice(b"base.img");
        // Backing format extension right after the 112-byte header.
        h[112..116].copy_from_slice(&0xe279_2acau32.to_be_bytes());
        h[116..120].copy_from_slice(&3u32.to_be_bytes());
        h[120..123].copy_from_slice(b"raw");
        let header = parse(&h).unwrap();
        assert_eq!(header.backing_file.as_deref(), Some("base.img"));
        assert_eq!(header.backing_format.as_deref(), Some("raw"));
    }
}
