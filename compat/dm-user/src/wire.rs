//! dm-user's message format: a 40-byte header of five little-endian u64
//! fields, `seq, type, flags, sector, len`, followed by `len` bytes of data
//! for a WRITE request (kernel to daemon) and for a successful READ answer
//! (daemon to kernel). No I/O.

/// Size of [`Header`] on the wire.
pub const HEADER_LEN: usize = 40;

/// Request types (`type` of a message the daemon reads).
pub mod kind {
    /// Read `len` bytes at `sector`; the answer carries them.
    pub const READ: u64 = 0;
    /// Write the `len` bytes that follow the header.
    pub const WRITE: u64 = 1;
    /// Write back what is cached (sent with PREFLUSH).
    pub const FLUSH: u64 = 2;
    /// The range's contents are no longer needed.
    pub const DISCARD: u64 = 3;
    /// Erase the range beyond recovery (never sent by the bridge).
    pub const SECURE_ERASE: u64 = 4;
    /// Repeat one block over the range (never sent by the bridge).
    pub const WRITE_SAME: u64 = 5;
    /// Zero the range (NOUNMAP: keep it allocated).
    pub const WRITE_ZEROES: u64 = 6;
    /// Zoned devices' operations, never sent by the bridge: open a zone.
    pub const ZONE_OPEN: u64 = 7;
    /// Close a zone.
    pub const ZONE_CLOSE: u64 = 8;
    /// Finish a zone.
    pub const ZONE_FINISH: u64 = 9;
    /// Append to a zone.
    pub const ZONE_APPEND: u64 = 10;
    /// Reset a zone.
    pub const ZONE_RESET: u64 = 11;
    /// Reset every zone.
    pub const ZONE_RESET_ALL: u64 = 12;
}

/// Answer types (`type` of a message the daemon writes).
pub mod answer {
    /// Done; a READ's data follows.
    pub const SUCCESS: u64 = 0;
    /// Failed: the bio ends with EIO.
    pub const ERROR: u64 = 1;
    /// Not offered: the bio ends with EOPNOTSUPP on the bridge (EIO on dm-user's target).
    pub const UNSUPPORTED: u64 = 2;
}

/// `flags` bits, as dm-user copies them from the bio.
pub mod flags {
    /// The bio's REQ_FAILFAST_DEV.
    pub const FAILFAST_DEV: u64 = 0x1;
    /// The bio's REQ_FAILFAST_TRANSPORT.
    pub const FAILFAST_TRANSPORT: u64 = 0x2;
    /// The bio's REQ_FAILFAST_DRIVER.
    pub const FAILFAST_DRIVER: u64 = 0x4;
    /// The bio's REQ_SYNC.
    pub const SYNC: u64 = 0x8;
    /// The bio's REQ_META.
    pub const META: u64 = 0x10;
    /// The bio's REQ_PRIO.
    pub const PRIO: u64 = 0x20;
    /// The bio's REQ_NOMERGE.
    pub const NOMERGE: u64 = 0x40;
    /// The bio's REQ_IDLE.
    pub const IDLE: u64 = 0x80;
    /// The bio's REQ_INTEGRITY.
    pub const INTEGRITY: u64 = 0x100;
    /// Forced unit access: the write is durable before it is answered.
    pub const FUA: u64 = 0x200;
    /// Write back the cache before this request.
    pub const PREFLUSH: u64 = 0x400;
    /// The bio's REQ_RAHEAD (readahead).
    pub const RAHEAD: u64 = 0x800;
    /// The bio's REQ_BACKGROUND.
    pub const BACKGROUND: u64 = 0x1000;
    /// The bio's REQ_NOWAIT.
    pub const NOWAIT: u64 = 0x2000;
    /// The bio's REQ_CGROUP_PUNT.
    pub const CGROUP_PUNT: u64 = 0x4000;
    /// WRITE_ZEROES: keep the range allocated.
    pub const NOUNMAP: u64 = 0x8000;
    /// The bio's REQ_POLLED (once REQ_HIPRI).
    pub const HIPRI: u64 = 0x10000;
    /// The bio's REQ_DRV.
    pub const DRV: u64 = 0x20000;
    /// The bio's REQ_SWAP.
    pub const SWAP: u64 = 0x40000;
}

/// One message header. `sector` counts 512-byte sectors, `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    /// Names the request; its answer carries the same.
    pub seq: u64,
    /// A [`kind`] in a request, an [`answer`] in an answer.
    pub kind: u64,
    /// [`flags`] bits.
    pub flags: u64,
    /// Where the request starts, in 512-byte sectors.
    pub sector: u64,
    /// How many bytes it covers.
    pub len: u64,
}

impl Header {
    /// The header's bytes on the wire.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0; HEADER_LEN];
        for (i, field) in [self.seq, self.kind, self.flags, self.sector, self.len]
            .into_iter()
            .enumerate()
        {
            out[i * 8..i * 8 + 8].copy_from_slice(&field.to_le_bytes());
        }
        out
    }

    /// The header at the front of `bytes`; None if fewer than
    /// [`HEADER_LEN`] bytes.
    pub fn parse(bytes: &[u8]) -> Option<Header> {
        let bytes = bytes.get(..HEADER_LEN)?;
        let field = |i: usize| {
            let mut le = [0; 8];
            le.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            u64::from_le_bytes(le)
        };
        Some(Header {
            seq: field(0),
            kind: field(1),
            flags: field(2),
            sector: field(3),
            len: field(4),
        })
    }

    /// Whether a message of this type carries `len` bytes of data from the
    /// kernel to the daemon.
    pub fn carries_data_to_daemon(&self) -> bool {
        self.kind == kind::WRITE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_bytes() {
        let header = Header {
            seq: 0x0102_0304_0506_0708,
            kind: kind::WRITE,
            flags: flags::FUA | flags::SYNC,
            sector: 8,
            len: 4096,
        };
        let bytes = header.encode();
        #[rustfmt::skip]
        let fixture: [u8; 40] = [
            0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, // seq
            0x01, 0, 0, 0, 0, 0, 0, 0,                       // type WRITE
            0x08, 0x02, 0, 0, 0, 0, 0, 0,                    // flags FUA|SYNC
            0x08, 0, 0, 0, 0, 0, 0, 0,                       // sector 8
            0x00, 0x10, 0, 0, 0, 0, 0, 0,                    // len 4096
        ];
        assert_eq!(bytes, fixture);
        assert_eq!(Header::parse(&fixture), Some(header));
        assert_eq!(Header::parse(&fixture[..39]), None);
        let mut longer = fixture.to_vec();
        longer.extend_from_slice(&[0xff; 8]);
        assert_eq!(Header::parse(&longer), Some(header));
        assert!(header.carries_data_to_daemon());
        assert!(!Header::default().carries_data_to_daemon());
    }

    #[test]
    fn numbers_as_dm_user_has_them() {
        assert_eq!(
            [
                kind::READ,
                kind::WRITE,
                kind::FLUSH,
                kind::DISCARD,
                kind::SECURE_ERASE
            ],
            [0, 1, 2, 3, 4]
        );
        assert_eq!(
            [kind::WRITE_SAME, kind::WRITE_ZEROES, kind::ZONE_OPEN],
            [5, 6, 7]
        );
        assert_eq!(kind::ZONE_RESET_ALL, 12);
        assert_eq!(
            [answer::SUCCESS, answer::ERROR, answer::UNSUPPORTED],
            [0, 1, 2]
        );
        assert_eq!(
            (flags::FUA, flags::PREFLUSH, flags::NOUNMAP),
            (0x200, 0x400, 0x8000)
        );
        assert_eq!(flags::SWAP, 0x40000);
    }
}
