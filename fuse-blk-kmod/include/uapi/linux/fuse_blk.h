/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * fuse-blk: block devices served from userspace over the FUSE protocol.
 *
 * This header is the one ABI between the fuse_blk module and its daemons.
 *
 * Changelog
 *  ABI 7 (2026-12)
 *   - Online resize: FUSE_BLK_IOC_RESIZE with struct fuse_blk_resize sets
 *     a device's size (params.size, and the disk's capacity once it is
 *     live) while it serves; the kernel sends a change uevent with
 *     RESIZE=1. GET_FEATURES reports FUSE_BLK_F_RESIZE; CREATE echoes it
 *     and it asks nothing of the device. The daemon serves the new size
 *     before it tells the kernel, growing or shrinking: the driver never
 *     asks it about either.
 *   - /dev/fuse-blk is the misc minor FUSE_BLK_MINOR of the range reserved
 *     for local use (was dynamic), so that its first open loads the module
 *     (a "devname:" alias, as /dev/fuse and /dev/loop-control have). A
 *     module whose minor is taken falls back to a dynamic one.
 *   - Unprivileged devices: with the module parameter unprivileged=1, a
 *     user who can open /dev/fuse-blk may CREATE without CAP_SYS_ADMIN.
 *     The device gets FUSE_BLK_F_UNPRIVILEGED (set by the driver only; a
 *     requested bit is ignored) and belongs to its creator: ATTACH,
 *     RESIZE, GET_INFO and DESTROY of it fail with EPERM for anyone but
 *     the owner and admins. Passthrough is refused with EPERM,
 *     io_timeout_ms and recovery_timeout_ms are capped at 30 s, and CREATE
 *     fails with EDQUOT beyond max_devices_per_user devices of one user.
 *     sysfs fuse_blk/owner gives the owner's uid (empty otherwise), for
 *     udev's OWNER=.
 *  ABI 6 (2026-12)
 *   - No new fields; three rules made exact. Of overlapping takeovers of a
 *     queue, the channel attached last wins: a FUSE_INIT reply retires
 *     only channels attached before its own, and the INIT reply of a
 *     channel already retired fails with ESTALE. GET_INFO and sysfs report
 *     FUSE_BLK_STATE_LIVE only once the disk's capacity is set (it could
 *     be seen LIVE with capacity 0). Channel reads honour RWF_NOWAIT /
 *     IOCB_NOWAIT (EAGAIN with nothing to read; it was refused with
 *     EOPNOTSUPP), so io_uring reads of a channel poll instead of blocking
 *     a worker.
 *  ABI 5 (2026-12)
 *   - READ data gathered from the daemon's memory: with
 *     FUSE_BLK_F_URING_DATA_IOVEC (reported, echoed and asking nothing of
 *     the device, as FUSE_BLK_F_URING_DATA_ADDR), a COMMIT_AND_FETCH with
 *     FUSE_BLK_URING_F_DATA_IOVEC takes its READ reply's data from the
 *     fuse_blk_uring_cmd.data_segs (was reserved0) iovecs at data_addr, in
 *     order. A daemon whose data for one request lies in several places (a
 *     RAM disk's written blocks between holes it answers from a zero
 *     buffer) replies without assembling it first. Without the flag
 *     data_segs must be zero, as reserved0 had to be.
 *  ABI 4 (2026-12)
 *   - READ data from the daemon's own memory: with FUSE_BLK_F_URING_DATA_ADDR
 *     (GET_FEATURES reports it; CREATE echoes it and it asks nothing of the
 *     device), a COMMIT_AND_FETCH with FUSE_BLK_URING_F_DATA_ADDR in
 *     fuse_blk_uring_cmd.flags takes its READ reply's data from
 *     fuse_blk_uring_cmd.data_addr (was reserved1) instead of the entry's
 *     payload buffer. A daemon that holds the data already (a RAM disk, a
 *     cache) replies without copying it first. Without the flag data_addr
 *     must be zero, as reserved1 had to be.
 *  ABI 3 (2026-11)
 *   - Passthrough: FUSE_BLK_F_PASSTHROUGH with params.backing_fd (was
 *     reserved0) names a file the driver reads and writes itself, so
 *     REQ_OP_READ and REQ_OP_WRITE never reach the daemon. Flushes,
 *     discards and write-zeroes still do. Without the flag backing_fd
 *     must be zero, as reserved0 had to be.
 *  ABI 2 (2026-11)
 *   - A FUSE_READ reply without data (fuse_out_header.len is the header's
 *     size, error 0) means the range reads as zeros: sparse backends
 *     answer without copying anything. Either kind of channel.
 *   - io_uring channels: FUSE_BLK_F_URING; FUSE_BLK_URING_FETCH and
 *     FUSE_BLK_URING_COMMIT_AND_FETCH (IORING_OP_URING_CMD on a channel)
 *     with struct fuse_blk_uring_cmd. The read/write channel is unchanged.
 *  ABI 1 (2026-11)
 *   - Control ioctls on /dev/fuse-blk: GET_FEATURES, CREATE, DESTROY,
 *     GET_INFO, ATTACH.
 *   - A channel (an fd of /dev/fuse-blk after ATTACH) speaks FUSE 7.31
 *     messages: FUSE_INIT first, then FUSE_READ, FUSE_WRITE, FUSE_FSYNC,
 *     FUSE_FALLOCATE and FUSE_INTERRUPT; FUSE_DESTROY at teardown.
 *   - The capacity is 0 until every queue's channel has answered
 *     FUSE_INIT; then it is published and partitions are read on the
 *     next open.
 *   - Handoff and crash recovery: FUSE_BLK_ATTACH_TAKEOVER attaches a
 *     channel to a queue that has one; once it answers FUSE_INIT it takes
 *     every new request and the older channels read FUSE_DESTROY. Requests
 *     a closing channel read but did not answer are requeued (unless
 *     FUSE_BLK_F_FAIL_INFLIGHT). FUSE_BLK_F_RECOVERY with
 *     params.recovery_timeout_ms keeps requests waiting for a new daemon
 *     when every channel of a queue is gone. fuse_blk_info.waiting counts
 *     requests no daemon has read.
 *
 * Objects
 *  A device (/dev/fuseblkN) is created from struct fuse_blk_params and
 *  lives until FUSE_BLK_IOC_DESTROY, whether or not a daemon serves it.
 *  Each of its queues is served by at most one channel. A daemon opens
 *  /dev/fuse-blk once per queue and turns each fd into that queue's channel
 *  with FUSE_BLK_IOC_ATTACH; read(2) then returns one whole FUSE request,
 *  write(2) takes one whole reply, poll(2) reports a readable request.
 *
 * Mapping of block requests to FUSE messages (fuse_in_header.nodeid is
 * FUSE_BLK_NODE_ID, every fh is 0):
 *  REQ_OP_READ          FUSE_READ       fuse_read_in.offset/size
 *  REQ_OP_WRITE         FUSE_WRITE      fuse_write_in + data; REQ_FUA sets
 *                                       O_DSYNC in fuse_write_in.flags
 *  REQ_OP_FLUSH         FUSE_FSYNC      fsync_flags = FUSE_FSYNC_FDATASYNC
 *  REQ_OP_DISCARD       FUSE_FALLOCATE  FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE
 *  REQ_OP_WRITE_ZEROES  FUSE_FALLOCATE  FALLOC_FL_ZERO_RANGE|FALLOC_FL_KEEP_SIZE
 *  request timed out    FUSE_INTERRUPT  once; the request fails with EIO if
 *                                       still unanswered one timeout later
 *  device destroyed     FUSE_DESTROY    then read(2) fails with ENODEV
 *
 * Passthrough (FUSE_BLK_F_PASSTHROUGH)
 *  CREATE takes params.backing_fd, an fd of the creating process: a regular
 *  file or a block device, open for reading, and for writing unless the
 *  device is FUSE_BLK_F_READ_ONLY. The driver holds that file until the
 *  device is destroyed and serves REQ_OP_READ and REQ_OP_WRITE on it from a
 *  workqueue of its own, through the file's page cache (or direct I/O if
 *  the fd was opened with O_DIRECT). Reads past the file's end read zeros;
 *  REQ_FUA writes are RWF_DSYNC writes. Those requests need no daemon: they
 *  go on while none is attached and are never timed out. The other
 *  requests go to the daemon as above; its FUSE_FSYNC of the same file
 *  flushes what the driver wrote. CREATE fails with EBADF for an fd that
 *  is not open or not open as needed, EINVAL for another kind of file and
 *  ELOOP for a file on, or of, a fuse-blk device. The echoed
 *  params.backing_fd and GET_INFO's are 0.
 *
 * io_uring channels (FUSE_BLK_F_URING)
 *  After FUSE_INIT has been answered over read(2)/write(2), a daemon may
 *  serve the channel's requests through an io_uring instead, with
 *  IORING_OP_URING_CMD commands on the channel fd (64-byte SQEs suffice):
 *  sqe->cmd_op is one of the FUSE_BLK_URING_* below and the command area
 *  holds struct fuse_blk_uring_cmd. The daemon sets up ring entries
 *  0..queue_depth-1, each with two buffers of its own memory:
 *   header   FUSE_BLK_URING_HEADER_SIZE bytes. A request arrives here as
 *            struct fuse_in_header followed by the opcode's argument; the
 *            reply goes here as struct fuse_out_header, followed for
 *            FUSE_WRITE by struct fuse_write_out.
 *   payload  at least params.max_io_bytes. FUSE_WRITE data arrives here,
 *            FUSE_READ data is replied here. fuse_in_header.len and
 *            fuse_out_header.len count these bytes too.
 *  FUSE_BLK_URING_FETCH   registers an entry: sqe->addr points to a struct
 *                         iovec[2] (header, payload); sqe->len must be 0.
 *  FUSE_BLK_URING_COMMIT_AND_FETCH
 *                         takes the reply in the entry's buffers and waits
 *                         for the next request in the same entry. With
 *                         FUSE_BLK_URING_F_DATA_ADDR the data of a READ
 *                         reply is taken from data_addr instead: any
 *                         memory of the ring's task, read while the
 *                         command is issued, before the request completes.
 *                         Only READ data is read there, but the address
 *                         must lie in user memory whatever the reply
 *                         (else EFAULT). With FUSE_BLK_URING_F_DATA_IOVEC
 *                         instead, data_addr points to data_segs (1 to
 *                         UIO_MAXIOV) struct iovec, read as the command is
 *                         issued, and the data is gathered from them in
 *                         order: as with data_addr, only the bytes the
 *                         reply carries are read, and iovecs holding fewer
 *                         than that refuse a READ reply with EINVAL. FETCH
 *                         takes no flags.
 *  Either completes (CQE res) when a request is in the entry: 0. A commit
 *  whose request is gone (timed out, or taken back) fetches as if it had
 *  been answered. Other results end the command and leave the entry
 *  unregistered, except a refused reply (EINVAL, EFAULT, ENOMEM for an
 *  iovec array the driver could not copy), after which the
 *  entry still holds its request and may be committed again:
 *   -ENODEV     the device is destroyed or a newer channel took over (where
 *               read(2) returns FUSE_DESTROY); committing what the entry
 *               holds is still possible
 *   -ECANCELED  the ring is going away
 *   -EBUSY      FETCH of an entry that is registered
 *   -EPROTO     FETCH before FUSE_INIT was answered
 *   -EINVAL     a malformed command or reply
 *  FUSE_INTERRUPT and FUSE_DESTROY are still read with read(2), and
 *  read(2) may still take requests, so a daemon can mix the two.
 *
 * Replies are checked: a reply whose length disagrees with its header or
 * with what the request needs, whose unique is unknown or already answered,
 * or whose error is not 0 or a negated errno in 1..511, is refused with
 * EINVAL or ENOENT to the writer and the request stays outstanding.
 */
#ifndef _UAPI_LINUX_FUSE_BLK_H
#define _UAPI_LINUX_FUSE_BLK_H

#include <linux/types.h>
#include <linux/ioctl.h>

#define FUSE_BLK_ABI_VERSION	7

/* fuse_in_header.nodeid of every request on a channel */
#define FUSE_BLK_NODE_ID	2

/* The misc minor of /dev/fuse-blk (char 10, "reserved for local use") */
#define FUSE_BLK_MINOR		246

#define FUSE_BLK_NAME_LEN	32
#define FUSE_BLK_MAX_QUEUES	64
#define FUSE_BLK_MAX_QUEUE_DEPTH	1024

/*
 * Feature flags: what a device may do. CREATE masks the requested set with
 * what the driver supports and echoes the result back in params.features.
 */
#define FUSE_BLK_F_FLUSH	(1ULL << 0)	/* volatile write cache */
#define FUSE_BLK_F_FUA		(1ULL << 1)	/* force unit access writes */
#define FUSE_BLK_F_DISCARD	(1ULL << 2)
#define FUSE_BLK_F_WRITE_ZEROES	(1ULL << 3)
#define FUSE_BLK_F_ROTATIONAL	(1ULL << 4)
#define FUSE_BLK_F_READ_ONLY	(1ULL << 5)
/* When every channel of a queue is gone, requests wait recovery_timeout_ms
 * for a new daemon (0: fail at once) instead of one I/O timeout. */
#define FUSE_BLK_F_RECOVERY	(1ULL << 6)
/* Requests a closing channel had read but not answered fail with EIO
 * instead of being reissued: for handlers that cannot take a write twice. */
#define FUSE_BLK_F_FAIL_INFLIGHT	(1ULL << 7)

/* Channels take io_uring commands (GET_FEATURES reports it; CREATE echoes
 * it and it asks nothing of the device). */
#define FUSE_BLK_F_URING	(1ULL << 8)
/* READ and WRITE are served from params.backing_fd by the driver. */
#define FUSE_BLK_F_PASSTHROUGH	(1ULL << 9)
/* COMMIT_AND_FETCH takes FUSE_BLK_URING_F_DATA_ADDR (as FUSE_BLK_F_URING). */
#define FUSE_BLK_F_URING_DATA_ADDR	(1ULL << 10)
/* COMMIT_AND_FETCH takes FUSE_BLK_URING_F_DATA_IOVEC (as FUSE_BLK_F_URING). */
#define FUSE_BLK_F_URING_DATA_IOVEC	(1ULL << 11)
/* FUSE_BLK_IOC_RESIZE (GET_FEATURES reports it; CREATE echoes it and it
 * asks nothing of the device). */
#define FUSE_BLK_F_RESIZE	(1ULL << 12)
/* Output only: the device was created without CAP_SYS_ADMIN and belongs
 * to its creator (module parameter unprivileged). */
#define FUSE_BLK_F_UNPRIVILEGED	(1ULL << 13)

#define FUSE_BLK_F_ALL		((1ULL << 14) - 1)

struct fuse_blk_features {
	__u32	abi_version;		/* out: FUSE_BLK_ABI_VERSION */
	__u32	reserved0;
	__u64	features;		/* out: FUSE_BLK_F_* the driver knows */
	__u64	reserved[6];
};

struct fuse_blk_params {
	__u64	size;			/* bytes; multiple of logical_block_size */
	__u32	logical_block_size;	/* 512..PAGE_SIZE, power of two */
	__u32	physical_block_size;	/* 0: logical_block_size */
	__u32	max_io_bytes;		/* largest request; 0: 1 MiB */
	__u16	nr_queues;		/* 1..FUSE_BLK_MAX_QUEUES */
	__u16	queue_depth;		/* 1..FUSE_BLK_MAX_QUEUE_DEPTH */
	__u64	features;		/* in: wanted; out: granted FUSE_BLK_F_* */
	__u32	io_timeout_ms;		/* per-request timeout; 0: 30 s */
	__u32	dev_id;			/* out: N of /dev/fuseblkN */
	char	name[FUSE_BLK_NAME_LEN];	/* NUL-terminated, for sysfs */
	__u32	recovery_timeout_ms;	/* with FUSE_BLK_F_RECOVERY */
	__s32	backing_fd;		/* with FUSE_BLK_F_PASSTHROUGH, else 0 */
	__u64	reserved[7];		/* must be zero */
};

/* States in fuse_blk_info.state and /sys/block/fuseblkN/fuse_blk/state */
#define FUSE_BLK_STATE_WAITING	0	/* no queue has a channel yet/any more */
#define FUSE_BLK_STATE_LIVE	1	/* every queue has an initialised channel */
#define FUSE_BLK_STATE_PARTIAL	2	/* some queues are served */
#define FUSE_BLK_STATE_DEAD	3	/* being destroyed */

struct fuse_blk_info {
	__u32	dev_id;			/* in */
	__u32	state;			/* out: FUSE_BLK_STATE_* */
	__u32	nr_channels;		/* out: queues with a channel */
	__u32	inflight;		/* out: requests not yet completed */
	struct fuse_blk_params params;	/* out */
	__u32	waiting;		/* out: requests no daemon has read */
	__u32	reserved0;
	__u64	reserved[3];
};

/* fuse_blk_attach.flags */
#define FUSE_BLK_ATTACH_TAKEOVER	(1 << 0)	/* the queue may have a channel */

struct fuse_blk_attach {
	__u32	dev_id;
	__u16	queue;
	__u16	flags;			/* FUSE_BLK_ATTACH_* */
	__u64	reserved[3];		/* must be zero */
};

/*
 * FUSE_BLK_IOC_RESIZE: size in bytes, a non-zero multiple of the device's
 * logical block size (EINVAL otherwise). A device that is not live yet
 * goes live with the new size. ENODEV for a device that does not exist or
 * is being destroyed. The driver does not check a shrink against what is
 * mounted: the caller does.
 */
struct fuse_blk_resize {
	__u32	dev_id;
	__u32	reserved0;		/* must be zero */
	__u64	size;
	__u64	reserved[2];		/* must be zero */
};

#define FUSE_BLK_IOC_MAGIC	0xFB

#define FUSE_BLK_IOC_GET_FEATURES	_IOR(FUSE_BLK_IOC_MAGIC, 0, struct fuse_blk_features)
#define FUSE_BLK_IOC_CREATE		_IOWR(FUSE_BLK_IOC_MAGIC, 1, struct fuse_blk_params)
#define FUSE_BLK_IOC_DESTROY		_IOW(FUSE_BLK_IOC_MAGIC, 2, __u32)
#define FUSE_BLK_IOC_GET_INFO		_IOWR(FUSE_BLK_IOC_MAGIC, 3, struct fuse_blk_info)
#define FUSE_BLK_IOC_ATTACH		_IOW(FUSE_BLK_IOC_MAGIC, 4, struct fuse_blk_attach)
#define FUSE_BLK_IOC_RESIZE		_IOW(FUSE_BLK_IOC_MAGIC, 5, struct fuse_blk_resize)

/* io_uring channels: sqe->cmd_op values and the SQE's command area */
#define FUSE_BLK_URING_HEADER_SIZE	128

struct fuse_blk_uring_cmd {
	__u16	entry;			/* 0..queue_depth-1 */
	__u16	flags;			/* FUSE_BLK_URING_F_* */
	__u32	data_segs;		/* with FUSE_BLK_URING_F_DATA_IOVEC, else 0 */
	__u64	data_addr;		/* with either FUSE_BLK_URING_F_DATA_*, else 0 */
};

/*
 * fuse_blk_uring_cmd.flags, COMMIT only and one at most: READ reply data is
 * at data_addr, or in the data_segs struct iovec at data_addr.
 */
#define FUSE_BLK_URING_F_DATA_ADDR	(1 << 0)
#define FUSE_BLK_URING_F_DATA_IOVEC	(1 << 1)

#define FUSE_BLK_URING_FETCH		_IOW(FUSE_BLK_IOC_MAGIC, 0x20, struct fuse_blk_uring_cmd)
#define FUSE_BLK_URING_COMMIT_AND_FETCH	_IOW(FUSE_BLK_IOC_MAGIC, 0x21, struct fuse_blk_uring_cmd)

#endif /* _UAPI_LINUX_FUSE_BLK_H */
