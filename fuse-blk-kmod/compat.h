/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Kernel-version differences of fuse_blk, kept in one place.
 *
 * The driver is written against Linux 6.12 and builds on 6.1 (Debian
 * bookworm), 6.12 and 7.3 (the kernels tests/vm/run boots). What differs:
 *
 *  - io_uring channels (FBLK_URING): a held command must be cancelable
 *    when its ring goes away (IORING_URING_CMD_CANCELABLE) and its task work
 *    must know whether its task is dying. Kernels before 6.12 lack one or
 *    the other here: there the channels take no io_uring commands (GET_FEATURES
 *    and CREATE leave FUSE_BLK_F_URING* out, IORING_OP_URING_CMD fails with
 *    EOPNOTSUPP) and daemons serve with read(2)/write(2).
 *  - 7.0: task work is given the request and a cancel token instead of
 *    the command and IO_URING_F_TASK_DEAD, io_uring_cmd_done() lost res2,
 *    io_uring_sqe_cmd() takes the command's type, and bvec_iter's
 *    bi_bvec_done became bi_offset. (All between 6.12 and 7.3; the kernels
 *    in between are not tested.)
 *  - before 6.11, queue features (write cache, FUA, rotational) were queue
 *    flags, and before 6.9 blk_mq_alloc_disk() took no queue_limits: the
 *    driver fills a struct fblk_limits, which fblk_alloc_disk() applies;
 *  - before 6.3, user pages are taken with references, not pinned;
 *  - 6.14 dropped BLK_MQ_F_SHOULD_MERGE (merging became the default);
 *  - 6.17 added WQ_PERCPU, and 7.3 warns when alloc_workqueue() is given
 *    neither WQ_PERCPU nor WQ_UNBOUND: FBLK_WQ_PERCPU.
 */
#ifndef FUSE_BLK_COMPAT_H
#define FUSE_BLK_COMPAT_H

#include <linux/version.h>
#include <linux/blk-mq.h>
#include <linux/blkdev.h>
#include <linux/mm.h>
#include <linux/uio.h>
#include <linux/workqueue.h>

#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 1, 0)
#error "fuse_blk needs Linux 6.1 or later; see compat.h to port it"
#endif

#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 14, 0)
#define FBLK_TAG_SET_FLAGS	BLK_MQ_F_SHOULD_MERGE
#else
#define FBLK_TAG_SET_FLAGS	0
#endif

/* A workqueue bound to CPUs (the default, which 7.3 wants named). */
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 17, 0)
#define FBLK_WQ_PERCPU		WQ_PERCPU
#else
#define FBLK_WQ_PERCPU		0
#endif

/* ---- io_uring channels ---- */

#define FBLK_URING	(LINUX_VERSION_CODE >= KERNEL_VERSION(6, 12, 0))

#if FBLK_URING
#include <linux/io_uring/cmd.h>
#define FBLK_FEATURES	FUSE_BLK_F_ALL
#else
#include <linux/io_uring.h>
#define FBLK_FEATURES	(FUSE_BLK_F_ALL & ~(FUSE_BLK_F_URING |		\
					    FUSE_BLK_F_URING_DATA_ADDR |	\
					    FUSE_BLK_F_URING_DATA_IOVEC))
#endif

/*
 * Task work of an io_uring command. The driver's callbacks take the
 * command and issue flags, FBLK_TW_CANCEL among them when the command must
 * end without touching the task's memory. Declare one (its prototype) with
 * FBLK_RING_TW(name) and queue it with fblk_complete_in_task(ucmd, name).
 */
#if !FBLK_URING
/* The callbacks are not built: no command is held, none is kicked. */
#define FBLK_RING_TW(name)	static_assert(!FBLK_URING, #name)
#define fblk_complete_in_task(ucmd, name)	WARN_ON_ONCE(ucmd)
#elif LINUX_VERSION_CODE >= KERNEL_VERSION(7, 0, 0)
/* Not a flag of the kernel's; the driver's callbacks are called with it. */
#define FBLK_TW_CANCEL		(1U << 20)
#define FBLK_RING_TW(name)						\
static void name(struct io_uring_cmd *ucmd, unsigned int issue_flags);	\
static void name##_tw(struct io_tw_req tw_req, io_tw_token_t tw)	\
{									\
	name(io_uring_cmd_from_tw(tw_req),				\
	     IO_URING_CMD_TASK_WORK_ISSUE_FLAGS |			\
	     (tw.cancel ? FBLK_TW_CANCEL : 0));				\
}									\
static void name(struct io_uring_cmd *ucmd, unsigned int issue_flags)
#define fblk_complete_in_task(ucmd, name)				\
	io_uring_cmd_complete_in_task(ucmd, name##_tw)
#define fblk_uring_cmd_done(ucmd, ret, issue_flags)			\
	io_uring_cmd_done(ucmd, ret, issue_flags)
#define fblk_uring_sqe_cmd(sqe, type)	io_uring_sqe_cmd(sqe, type)
#else
#define FBLK_TW_CANCEL		IO_URING_F_TASK_DEAD
#define FBLK_RING_TW(name)						\
static void name(struct io_uring_cmd *ucmd, unsigned int issue_flags)
#define fblk_complete_in_task(ucmd, name)				\
	io_uring_cmd_complete_in_task(ucmd, name)
#define fblk_uring_cmd_done(ucmd, ret, issue_flags)			\
	io_uring_cmd_done(ucmd, ret, 0, issue_flags)
#define fblk_uring_sqe_cmd(sqe, type)					\
	((const type *)io_uring_sqe_cmd(sqe))
#endif

/* ---- bios ---- */

/* The bytes of a bio's first bvec its iterator has done. */
#if LINUX_VERSION_CODE >= KERNEL_VERSION(7, 0, 0)
#define fblk_bvec_iter_done(iter)	((iter).bi_offset)
#else
#define fblk_bvec_iter_done(iter)	((iter).bi_bvec_done)
#endif

/* ---- queue limits ---- */

#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 11, 0)
#define fblk_limits	queue_limits

static inline struct gendisk *fblk_alloc_disk(struct blk_mq_tag_set *set,
					      struct queue_limits *lim,
					      void *queuedata)
{
	return blk_mq_alloc_disk(set, lim, queuedata);
}
#else
#define BLK_FEAT_WRITE_CACHE	(1U << 0)
#define BLK_FEAT_FUA		(1U << 1)
#define BLK_FEAT_ROTATIONAL	(1U << 2)

/* The limits the driver sets, as queue_limits has them since 6.11. */
struct fblk_limits {
	unsigned int	logical_block_size;
	unsigned int	physical_block_size;
	unsigned int	io_min;
	unsigned int	max_hw_sectors;
	unsigned short	max_segments;
	unsigned int	max_segment_size;
	unsigned int	max_hw_discard_sectors;
	unsigned int	discard_granularity;
	unsigned int	max_write_zeroes_sectors;
	unsigned int	features;	/* BLK_FEAT_* */
};

static inline struct gendisk *fblk_alloc_disk(struct blk_mq_tag_set *set,
					      struct fblk_limits *lim,
					      void *queuedata)
{
	struct request_queue *q;
	struct gendisk *disk;

	disk = blk_mq_alloc_disk(set, queuedata);
	if (IS_ERR(disk))
		return disk;
	q = disk->queue;
	blk_queue_logical_block_size(q, lim->logical_block_size);
	blk_queue_physical_block_size(q, lim->physical_block_size);
	blk_queue_io_min(q, lim->io_min);
	blk_queue_max_hw_sectors(q, lim->max_hw_sectors);
	blk_queue_max_segments(q, lim->max_segments);
	blk_queue_max_segment_size(q, lim->max_segment_size);
	blk_queue_max_discard_sectors(q, lim->max_hw_discard_sectors);
	q->limits.discard_granularity = lim->discard_granularity;
	blk_queue_max_write_zeroes_sectors(q, lim->max_write_zeroes_sectors);
	blk_queue_write_cache(q, lim->features & BLK_FEAT_WRITE_CACHE,
			      lim->features & BLK_FEAT_FUA);
	if (lim->features & BLK_FEAT_ROTATIONAL)
		blk_queue_flag_clear(QUEUE_FLAG_NONROT, q);
	else
		blk_queue_flag_set(QUEUE_FLAG_NONROT, q);
	return disk;
}
#endif

/* ---- user pages ---- */

/*
 * Takes the user pages under up to @maxsize bytes of a user-backed @iter
 * into @pages (at most @maxpages; the data starts at *@start in the first)
 * and advances @iter; fblk_put_user_pages() gives them back, marked dirty
 * if @dirty.
 */
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 3, 0)
static inline ssize_t fblk_get_user_pages(struct iov_iter *iter,
					  struct page **pages, size_t maxsize,
					  unsigned int maxpages, size_t *start)
{
	return iov_iter_extract_pages(iter, &pages, maxsize, maxpages, 0,
				      start);
}

static inline void fblk_put_user_pages(struct page **pages,
				       unsigned long npages, bool dirty)
{
	unpin_user_pages_dirty_lock(pages, npages, dirty);
}
#else
static inline ssize_t fblk_get_user_pages(struct iov_iter *iter,
					  struct page **pages, size_t maxsize,
					  unsigned int maxpages, size_t *start)
{
	return iov_iter_get_pages2(iter, pages, maxsize, maxpages, start);
}

static inline void fblk_put_user_pages(struct page **pages,
				       unsigned long npages, bool dirty)
{
	unsigned long i;

	for (i = 0; i < npages; i++) {
		if (dirty)
			set_page_dirty_lock(pages[i]);
		put_page(pages[i]);
	}
}
#endif

#endif /* FUSE_BLK_COMPAT_H */
