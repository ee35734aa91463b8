//! Rust mirror of `fuse-blk-kmod/include/uapi/linux/fuse_blk.h`, the one
//! ABI between the module and daemons. Field for field; the sizes are
//! checked in the tests below.

use zerocopy::{Immutable, IntoBytes};

pub const ABI_VERSION: u32 = 7;
/// The misc minor of `/dev/fuse-blk`, by which its first open loads the module.
pub const MINOR: u32 = 246;
pub const NAME_LEN: usize = 32;
pub const MAX_QUEUES: u16 = 64;
pub const MAX_QUEUE_DEPTH: u16 = 1024;

pub const F_FLUSH: u64 = 1 << 0;
pub const F_FUA: u64 = 1 << 1;
pub const F_DISCARD: u64 = 1 << 2;
pub const F_WRITE_ZEROES: u64 = 1 << 3;
pub const F_ROTATIONAL: u64 = 1 << 4;
pub const F_READ_ONLY: u64 = 1 << 5;
pub const F_RECOVERY: u64 = 1 << 6;
pub const F_FAIL_INFLIGHT: u64 = 1 << 7;
pub const F_URING: u64 = 1 << 8;
pub const F_PASSTHROUGH: u64 = 1 << 9;
pub const F_URING_DATA_ADDR: u64 = 1 << 10;
pub const F_URING_DATA_IOVEC: u64 = 1 << 11;
pub const F_RESIZE: u64 = 1 << 12;
/// Output only: the device belongs to the user who created it without
/// CAP_SYS_ADMIN (module parameter `unprivileged`).
pub const F_UNPRIVILEGED: u64 = 1 << 13;

/// The feature flags by the names the header gives them (without
/// `FUSE_BLK_F_`, in lower case), in bit order.
pub const FEATURE_NAMES: [(u64, &str); 14] = [
    (F_FLUSH, "flush"),
    (F_FUA, "fua"),
    (F_DISCARD, "discard"),
    (F_WRITE_ZEROES, "write_zeroes"),
    (F_ROTATIONAL, "rotational"),
    (F_READ_ONLY, "read_only"),
    (F_RECOVERY, "recovery"),
    (F_FAIL_INFLIGHT, "fail_inflight"),
    (F_URING, "uring"),
    (F_PASSTHROUGH, "passthrough"),
    (F_URING_DATA_ADDR, "uring_data_addr"),
    (F_URING_DATA_IOVEC, "uring_data_iovec"),
    (F_RESIZE, "resize"),
    (F_UNPRIVILEGED, "unprivileged"),
];

/// The names of the flags set in `features`; bits this mirror does not
/// know appear as `bitN`.
pub fn feature_names(features: u64) -> Vec<String> {
    (0..64)
        .map(|bit| 1u64 << bit)
        .filter(|flag| features & flag != 0)
        .map(
            |flag| match FEATURE_NAMES.iter().find(|(f, _)| *f == flag) {
                Some((_, name)) => (*name).to_owned(),
                None => format!("bit{}", flag.trailing_zeros()),
            },
        )
        .collect()
}

pub const ATTACH_TAKEOVER: u16 = 1 << 0;

pub const STATE_WAITING: u32 = 0;
pub const STATE_LIVE: u32 = 1;
pub const STATE_PARTIAL: u32 = 2;
pub const STATE_DEAD: u32 = 3;

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Features {
    pub abi_version: u32,
    pub reserved0: u32,
    pub features: u64,
    pub reserved: [u64; 6],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Params {
    pub size: u64,
    pub logical_block_size: u32,
    pub physical_block_size: u32,
    pub max_io_bytes: u32,
    pub nr_queues: u16,
    pub queue_depth: u16,
    pub features: u64,
    pub io_timeout_ms: u32,
    pub dev_id: u32,
    pub name: [u8; NAME_LEN],
    pub recovery_timeout_ms: u32,
    /// With [`F_PASSTHROUGH`]: the file the driver reads and writes itself.
    pub backing_fd: i32,
    pub reserved: [u64; 7],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Info {
    pub dev_id: u32,
    pub state: u32,
    pub nr_channels: u32,
    pub inflight: u32,
    pub params: Params,
    pub waiting: u32,
    pub reserved0: u32,
    pub reserved: [u64; 3],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Attach {
    pub dev_id: u32,
    pub queue: u16,
    pub flags: u16,
    pub reserved: [u64; 3],
}

/// `struct fuse_blk_resize`: the argument of FUSE_BLK_IOC_RESIZE.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Resize {
    pub dev_id: u32,
    pub reserved0: u32,
    pub size: u64,
    pub reserved: [u64; 2],
}

/// The io_uring command area of an SQE (`struct fuse_blk_uring_cmd`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, IntoBytes, Immutable)]
pub struct UringCmd {
    pub entry: u16,
    /// `URING_F_*`.
    pub flags: u16,
    /// With [`URING_F_DATA_IOVEC`]: how many iovecs are at `data_addr`.
    pub data_segs: u32,
    /// With [`URING_F_DATA_ADDR`]: where a commit's READ data is; with
    /// [`URING_F_DATA_IOVEC`]: the iovecs it is gathered from.
    pub data_addr: u64,
}

/// `fuse_blk_uring_cmd.flags`: the READ data of a commit is at `data_addr`.
pub const URING_F_DATA_ADDR: u16 = 1 << 0;
/// `fuse_blk_uring_cmd.flags`: the READ data of a commit is gathered from
/// the `data_segs` iovecs at `data_addr`.
pub const URING_F_DATA_IOVEC: u16 = 1 << 1;

impl UringCmd {
    /// The command as the 16 bytes of a 64-byte SQE's command area.
    pub fn to_bytes(self) -> [u8; 16] {
        zerocopy::transmute!(self)
    }
}

/// Bytes of an io_uring entry's header buffer.
pub const URING_HEADER_SIZE: usize = 128;

const MAGIC: u8 = 0xFB;

/// `sqe->cmd_op` of FUSE_BLK_URING_FETCH: `_IOW(0xFB, 0x20, struct fuse_blk_uring_cmd)`.
pub const URING_FETCH: u32 =
    nix::request_code_write!(MAGIC, 0x20, std::mem::size_of::<UringCmd>()) as u32;
/// `sqe->cmd_op` of FUSE_BLK_URING_COMMIT_AND_FETCH.
pub const URING_COMMIT_AND_FETCH: u32 =
    nix::request_code_write!(MAGIC, 0x21, std::mem::size_of::<UringCmd>()) as u32;

nix::ioctl_read!(get_features, MAGIC, 0, Features);
nix::ioctl_readwrite!(create, MAGIC, 1, Params);
nix::ioctl_write_ptr!(destroy, MAGIC, 2, u32);
nix::ioctl_readwrite!(get_info, MAGIC, 3, Info);
nix::ioctl_write_ptr!(attach, MAGIC, 4, Attach);
nix::ioctl_write_ptr!(resize, MAGIC, 5, Resize);

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::size_of;

    #[test]
    fn structures_match_the_header() {
        assert_eq!(size_of::<Features>(), 64);
        assert_eq!(size_of::<Params>(), 32 + 4 + 4 + NAME_LEN + 64);
        assert_eq!(size_of::<Info>(), 16 + size_of::<Params>() + 32);
        assert_eq!(size_of::<Attach>(), 32);
        assert_eq!(size_of::<Resize>(), 32);
        assert_eq!(size_of::<UringCmd>(), 16);
    }

    /// The value of `#define NAME VALUE` in the uapi header, with `(1ULL
    /// << N)` and `(1 << N)` evaluated.
    fn header_value(header: &str, name: &str) -> u64 {
        let line = header
            .lines()
            .find(|line| line.split_whitespace().take(2).eq(["#define", name]))
            .unwrap_or_else(|| panic!("{name} is not defined in the header"));
        let value = line
            .split_whitespace()
            .skip(2)
            .take_while(|word| !word.starts_with("/*"))
            .collect::<String>();
        let value = value.trim_start_matches('(').trim_end_matches(')');
        match value.split_once("<<") {
            Some((one, shift)) => {
                assert!(one == "1ULL" || one == "1", "{name}: {line}");
                1 << shift.parse::<u32>().expect("shift")
            }
            None => value.parse().unwrap_or_else(|_| panic!("{name}: {line}")),
        }
    }

    #[test]
    fn constants_match_the_header() {
        let header = include_str!("../../../fuse-blk-kmod/include/uapi/linux/fuse_blk.h");
        let value = |name: &str| header_value(header, name);
        assert_eq!(value("FUSE_BLK_ABI_VERSION"), u64::from(ABI_VERSION));
        assert_eq!(value("FUSE_BLK_NAME_LEN"), NAME_LEN as u64);
        assert_eq!(value("FUSE_BLK_MINOR"), u64::from(MINOR));
        assert_eq!(value("FUSE_BLK_MAX_QUEUES"), u64::from(MAX_QUEUES));
        assert_eq!(
            value("FUSE_BLK_MAX_QUEUE_DEPTH"),
            u64::from(MAX_QUEUE_DEPTH)
        );
        let mut all = 0;
        for (flag, name) in FEATURE_NAMES {
            let define = format!("FUSE_BLK_F_{}", name.to_uppercase());
            assert_eq!(value(&define), flag, "{define}");
            all |= flag;
        }
        let count = FEATURE_NAMES.len();
        assert_eq!(all, (1 << count) - 1, "the flags are bits 0..{count}");
        let every_flag = format!("#define FUSE_BLK_F_ALL\t\t((1ULL << {count}) - 1)");
        assert!(header.contains(&every_flag), "a flag the mirror lacks");
        assert_eq!(
            value("FUSE_BLK_ATTACH_TAKEOVER"),
            u64::from(ATTACH_TAKEOVER)
        );
        assert_eq!(value("FUSE_BLK_STATE_WAITING"), u64::from(STATE_WAITING));
        assert_eq!(value("FUSE_BLK_STATE_LIVE"), u64::from(STATE_LIVE));
        assert_eq!(value("FUSE_BLK_STATE_PARTIAL"), u64::from(STATE_PARTIAL));
        assert_eq!(value("FUSE_BLK_STATE_DEAD"), u64::from(STATE_DEAD));
        assert_eq!(
            value("FUSE_BLK_URING_HEADER_SIZE"),
            URING_HEADER_SIZE as u64
        );
        assert_eq!(
            value("FUSE_BLK_URING_F_DATA_ADDR"),
            u64::from(URING_F_DATA_ADDR)
        );
        assert_eq!(
            value("FUSE_BLK_URING_F_DATA_IOVEC"),
            u64::from(URING_F_DATA_IOVEC)
        );
    }

    #[test]
    fn feature_names_name_every_flag_set() {
        assert_eq!(feature_names(F_URING | F_FLUSH), ["flush", "uring"]);
        assert_eq!(feature_names(1 << 40), ["bit40"]);
        assert!(feature_names(0).is_empty());
    }

    #[test]
    fn uring_command_codes_match_the_header() {
        // _IOW(0xFB, 0x20, 16 bytes): direction write (1) << 30, size << 16.
        assert_eq!(URING_FETCH, 0x4010_fb20);
        assert_eq!(URING_COMMIT_AND_FETCH, 0x4010_fb21);
        let cmd = UringCmd {
            entry: 0x0102,
            flags: 0x0304,
            data_segs: 0x0506_0708,
            data_addr: 0x1112_1314_1516_1718,
        };
        let mut fields = Vec::new();
        fields.extend_from_slice(&cmd.entry.to_ne_bytes());
        fields.extend_from_slice(&cmd.flags.to_ne_bytes());
        fields.extend_from_slice(&cmd.data_segs.to_ne_bytes());
        fields.extend_from_slice(&cmd.data_addr.to_ne_bytes());
        assert_eq!(&cmd.to_bytes()[..], &fields[..], "the header's field order");
    }
}
