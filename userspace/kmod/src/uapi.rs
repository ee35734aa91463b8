//! Rust mirror of `fuse-blk-kmod/include/uapi/linux/fuse_blk.h`, the one
//! ABI between the module and daemons. Field for field; the sizes are
//! checked in the tests below.

use zerocopy::{Immutable, IntoBytes};

/// FUSE_BLK_ABI_VERSION: the ABI this mirror speaks, as GET_FEATURES reports
/// it.
pub const ABI_VERSION: u32 = 7;
/// The misc minor of `/dev/fuse-blk`, by which its first open loads the module.
pub const MINOR: u32 = 246;
/// Size of `Params.name`, its NUL terminator included.
pub const NAME_LEN: usize = 32;
/// Most hardware queues a device may have (`Params.nr_queues`).
pub const MAX_QUEUES: u16 = 64;
/// Most requests in flight per queue (`Params.queue_depth`).
pub const MAX_QUEUE_DEPTH: u16 = 1024;

/// The device has a volatile write cache: REQ_OP_FLUSH reaches the daemon as
/// FUSE_FSYNC.
pub const F_FLUSH: u64 = 1 << 0;
/// Force-unit-access writes: a REQ_FUA write carries `O_DSYNC` in
/// `fuse_write_in.flags`.
pub const F_FUA: u64 = 1 << 1;
/// REQ_OP_DISCARD reaches the daemon as a FUSE_FALLOCATE punching a hole.
pub const F_DISCARD: u64 = 1 << 2;
/// REQ_OP_WRITE_ZEROES reaches the daemon as a FUSE_FALLOCATE zeroing the
/// range.
pub const F_WRITE_ZEROES: u64 = 1 << 3;
/// The device reports itself rotational (a hint for I/O schedulers).
pub const F_ROTATIONAL: u64 = 1 << 4;
/// The device is read-only.
pub const F_READ_ONLY: u64 = 1 << 5;
/// When every channel of a queue is gone, requests wait `recovery_timeout_ms`
/// for a new daemon instead of one I/O timeout.
pub const F_RECOVERY: u64 = 1 << 6;
/// Requests a closing channel had read but not answered fail with EIO instead
/// of being reissued (for handlers that cannot take a write twice).
pub const F_FAIL_INFLIGHT: u64 = 1 << 7;
/// Channels take io_uring commands ([`URING_FETCH`],
/// [`URING_COMMIT_AND_FETCH`]); asks nothing of the device.
pub const F_URING: u64 = 1 << 8;
/// The driver serves READ and WRITE from `Params.backing_fd` itself.
pub const F_PASSTHROUGH: u64 = 1 << 9;
/// COMMIT_AND_FETCH takes [`URING_F_DATA_ADDR`]; asks nothing of the device.
pub const F_URING_DATA_ADDR: u64 = 1 << 10;
/// COMMIT_AND_FETCH takes [`URING_F_DATA_IOVEC`]; asks nothing of the device.
pub const F_URING_DATA_IOVEC: u64 = 1 << 11;
/// The module has FUSE_BLK_IOC_RESIZE ([`resize`]); asks nothing of the device.
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

/// `Attach.flags`: the queue may have a channel already; the new one takes over
/// once it has answered FUSE_INIT.
pub const ATTACH_TAKEOVER: u16 = 1 << 0;

/// `Info.state`: no queue has a channel, yet or any more.
pub const STATE_WAITING: u32 = 0;
/// `Info.state`: every queue has a channel that answered FUSE_INIT, and the
/// capacity is set.
pub const STATE_LIVE: u32 = 1;
/// `Info.state`: some queues are served, not all.
pub const STATE_PARTIAL: u32 = 2;
/// `Info.state`: the device is being destroyed.
pub const STATE_DEAD: u32 = 3;

/// `struct fuse_blk_features`, filled in by FUSE_BLK_IOC_GET_FEATURES
/// ([`get_features`]).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Features {
    /// The module's ABI version ([`ABI_VERSION`] for this one).
    pub abi_version: u32,
    /// Reserved.
    pub reserved0: u32,
    /// Every `F_*` flag the module knows.
    pub features: u64,
    /// Reserved.
    pub reserved: [u64; 6],
}

/// `struct fuse_blk_params`, the argument of FUSE_BLK_IOC_CREATE ([`create`]):
/// what the device is, filled back with what the driver granted.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Params {
    /// Capacity in bytes, a multiple of `logical_block_size`.
    pub size: u64,
    /// Smallest addressable unit in bytes: a power of two from 512 to the page
    /// size.
    pub logical_block_size: u32,
    /// Physical block size in bytes, the alignment I/O should keep to; 0:
    /// `logical_block_size`.
    pub physical_block_size: u32,
    /// Largest request in bytes; 0: 1 MiB.
    pub max_io_bytes: u32,
    /// Hardware queues, 1 to [`MAX_QUEUES`], each served by one channel.
    pub nr_queues: u16,
    /// Requests in flight per queue, 1 to [`MAX_QUEUE_DEPTH`].
    pub queue_depth: u16,
    /// In: the `F_*` flags wanted; out: those granted.
    pub features: u64,
    /// Per-request timeout in milliseconds (then FUSE_INTERRUPT, then EIO);
    /// 0: 30 s.
    pub io_timeout_ms: u32,
    /// Out: N of `/dev/fuseblkN`.
    pub dev_id: u32,
    /// NUL-terminated name shown in sysfs.
    pub name: [u8; NAME_LEN],
    /// With [`F_RECOVERY`]: how long requests wait for a new daemon, in
    /// milliseconds (0: fail at once).
    pub recovery_timeout_ms: u32,
    /// With [`F_PASSTHROUGH`]: the file the driver reads and writes itself.
    pub backing_fd: i32,
    /// Must be zero.
    pub reserved: [u64; 7],
}

/// `struct fuse_blk_info`, the argument of FUSE_BLK_IOC_GET_INFO
/// ([`get_info`]): a device's state.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Info {
    /// In: the device, N of `/dev/fuseblkN`.
    pub dev_id: u32,
    /// Out: one of the `STATE_*`.
    pub state: u32,
    /// Out: queues that have a channel.
    pub nr_channels: u32,
    /// Out: requests not yet completed.
    pub inflight: u32,
    /// Out: the device's parameters as created (`backing_fd` 0).
    pub params: Params,
    /// Out: requests no daemon has read.
    pub waiting: u32,
    /// Reserved.
    pub reserved0: u32,
    /// Reserved.
    pub reserved: [u64; 3],
}

/// `struct fuse_blk_attach`, the argument of FUSE_BLK_IOC_ATTACH ([`attach`]):
/// turns an fd of `/dev/fuse-blk` into a queue's channel.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Attach {
    /// The device, N of `/dev/fuseblkN`.
    pub dev_id: u32,
    /// The queue the channel serves, below `Params.nr_queues`.
    pub queue: u16,
    /// [`ATTACH_TAKEOVER`] or 0.
    pub flags: u16,
    /// Must be zero.
    pub reserved: [u64; 3],
}

/// `struct fuse_blk_resize`: the argument of FUSE_BLK_IOC_RESIZE.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Resize {
    /// The device, N of `/dev/fuseblkN`.
    pub dev_id: u32,
    /// Must be zero.
    pub reserved0: u32,
    /// New capacity in bytes, a non-zero multiple of the logical block size
    /// (else EINVAL).
    pub size: u64,
    /// Must be zero.
    pub reserved: [u64; 2],
}

/// The io_uring command area of an SQE (`struct fuse_blk_uring_cmd`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, IntoBytes, Immutable)]
pub struct UringCmd {
    /// The ring entry, 0 to `queue_depth - 1`.
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

nix::ioctl_read!(
    /// FUSE_BLK_IOC_GET_FEATURES on `/dev/fuse-blk`: the module's ABI
    /// version and feature flags.
    get_features,
    MAGIC,
    0,
    Features
);
nix::ioctl_readwrite!(
    /// FUSE_BLK_IOC_CREATE: creates `/dev/fuseblkN` from [`Params`], which
    /// it fills back with the granted features and `dev_id`.
    create,
    MAGIC,
    1,
    Params
);
nix::ioctl_write_ptr!(
    /// FUSE_BLK_IOC_DESTROY of the device with this id: its channels read
    /// FUSE_DESTROY.
    destroy,
    MAGIC,
    2,
    u32
);
nix::ioctl_readwrite!(
    /// FUSE_BLK_IOC_GET_INFO: the state of the device `Info.dev_id` names.
    get_info,
    MAGIC,
    3,
    Info
);
nix::ioctl_write_ptr!(
    /// FUSE_BLK_IOC_ATTACH: makes this fd of `/dev/fuse-blk` the channel of
    /// one queue of a device.
    attach,
    MAGIC,
    4,
    Attach
);
nix::ioctl_write_ptr!(
    /// FUSE_BLK_IOC_RESIZE: sets a device's capacity while it serves.
    resize,
    MAGIC,
    5,
    Resize
);

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
