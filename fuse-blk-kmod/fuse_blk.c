// SPDX-License-Identifier: GPL-2.0
/*
 * fuse_blk: block devices served from userspace over the FUSE protocol.
 *
 * A device's block requests reach a daemon as the FUSE messages a file
 * already has (READ, WRITE, FSYNC, FALLOCATE), so a FUSE file handler
 * serves a block device. The ABI is include/uapi/linux/fuse_blk.h.
 *
 * Objects and lifetimes
 *
 *  struct fblk_dev	one block device (/dev/fuseblkN). Created by
 *			FUSE_BLK_IOC_CREATE and found by id in fblk_idr until
 *			FUSE_BLK_IOC_DESTROY, which tears down the gendisk and
 *			tag set. Reference counted: the idr entry holds one
 *			reference, every channel another; the struct is freed
 *			with the last. Each device also pins the module, so
 *			the module cannot be unloaded while devices exist.
 *  struct fblk_queue	one per hardware queue, inside fblk_dev.
 *  struct fblk_chan	an attached channel: the private_data of a
 *			/dev/fuse-blk file after FUSE_BLK_IOC_ATTACH, on its
 *			queue's list of channels until the file is released.
 *			Of a queue's channels, the newest that has answered
 *			FUSE_INIT is the active one and takes new requests;
 *			the ones attached before it are retired: they read
 *			FUSE_DESTROY and may still answer what they took
 *			(daemon handoff). A channel retired before it answered
 *			FUSE_INIT lost a takeover race: its INIT reply fails
 *			with ESTALE.
 *  struct fblk_cmd	the record of one tag of a queue (fblk_queue.cmds,
 *			allocated with the device): the request holding the
 *			tag and where it stands. A reply names its request by
 *			tag and unique and is checked against this record
 *			under the queue lock before the request is touched, so
 *			a stale or forged reply never reaches a request that
 *			has ended (whose memory an I/O scheduler switch may
 *			have freed).
 *  backing file		of a FUSE_BLK_F_PASSTHROUGH device (fblk_dev.backing):
 *			taken at CREATE, put at DESTROY once every request
 *			has ended. Its reads and writes run in the device's
 *			workqueues, one work item (fblk_cmd.work) a request.
 *  struct fblk_ring_ent	an io_uring entry of a channel: the daemon's header
 *			and payload buffers and, while it waits for a request,
 *			the held IORING_OP_URING_CMD. In chan->ents (one per
 *			tag), allocated at the first command and freed with
 *			the channel, which cannot be released before every
 *			held command has completed (each pins the file).
 *
 * A command moves through these states; whoever moves it to DONE
 * completes the request, exactly once:
 *
 *	queue_rq -> PENDING (on queue->pending)
 *	read()   -> SENDING (owned by that read) -> SENT (on queue->sent)
 *	write()  -> RECEIVING (owned by that write) -> DONE
 *	timeout, channel release, destroy: PENDING/SENT -> DONE (EIO)
 *	release of the channel that read it: SENT -> PENDING (requeued)
 *	passthrough read or write: queue_rq -> BACKING (owned by its work
 *	item, on no list, never timed out) -> DONE
 *
 * SENDING and RECEIVING belong to one read()/write() call (or io_uring
 * delivery or commit), which finishes the command itself if the device
 * died meanwhile; the timeout handler re-arms their timer.
 *
 * io_uring entries move through these states, under the queue lock but for
 * a commit's USER -> KICKED (and back, if the reply is refused): a cmpxchg,
 * since only a commit leaves USER:
 *
 *	FETCH            FREE -> KICKED
 *	nothing to do    KICKED -> IDLE (on chan->idle_ents, command held)
 *	work arrives     IDLE -> KICKED (task work queued by whoever added it;
 *	                 queue_rq kicks one per burst: chan->ring_kicked)
 *	rest of a burst  IDLE -> KICKED by a task work of the same task and
 *	                 ring, which delivers and completes it there
 *	request copied   KICKED -> USER (command completed with 0)
 *	COMMIT_AND_FETCH USER -> KICKED (the reply is taken first; READ
 *	                 data from the payload buffer, data_addr, or the
 *	                 iovec array at data_addr)
 *	channel over, ring cancelled, fault: IDLE/KICKED -> FREE
 *
 * A KICKED entry belongs to the one context that moved it there, and every
 * copy to or from an entry's buffers runs in the task of its ring (issue
 * path or task work): commands issued from io-wq are bounced there first.
 *
 * Timeouts: a request unanswered after io_timeout_ms is sent a
 * FUSE_INTERRUPT and fails with EIO one timeout later. A request that no
 * daemon ever read fails after one timeout, or, with FUSE_BLK_F_RECOVERY,
 * once its queue has been without a channel for recovery_timeout_ms.
 * Requests a channel had read when it closed are requeued for the queue's
 * other channels or for the next daemon, unless FUSE_BLK_F_FAIL_INFLIGHT
 * (or, without FUSE_BLK_F_RECOVERY, when no channel is left) fails them.
 *
 * Unprivileged devices: with the module parameter `unprivileged` on, a
 * user who can open /dev/fuse-blk (its mode and group are the
 * administrator's, set by udev) creates devices of its own without
 * CAP_SYS_ADMIN. Such a device records its owner (fblk_dev.owner, the
 * creator's fsuid) and carries FUSE_BLK_F_UNPRIVILEGED; only the owner or
 * an admin may attach to it, resize, inspect or destroy it
 * (fblk_may_control()), passthrough is refused (the driver would read and
 * write a file with its own rights), timeouts are capped at the default
 * (probes by udev and others wait on the user's daemon at most that long),
 * and a user owns at most `max_devices_per_user` of them (counted on
 * fblk_owned under fblk_mutex, from CREATE until DESTROY has finished).
 *
 * Lock order: fblk_mutex -> fblk_dev.mutex -> fblk_queue.lock.
 * fblk_queue.lock is only ever taken in process context: blk-mq runs
 * queue_rq from the submitting task or kblockd (this driver completes
 * requests in process context, so no queue is run from an interrupt), the
 * timeout handler from a work item, and everything else from system calls,
 * io_uring task work and work items. It leaves interrupts on.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/blk-mq.h>
#include <linux/blkdev.h>
#include <linux/ctype.h>
#include <linux/falloc.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/fuse.h>
#include <linux/idr.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/poll.h>
#include <linux/sched/mm.h>
#include <linux/sizes.h>
#include <linux/slab.h>
#include <linux/uio.h>
#include <linux/workqueue.h>

#include "compat.h"
#include "uapi/linux/fuse_blk.h"

#define FBLK_MINORS		16
#define FBLK_MAX_DEVICES	(1 << (MINORBITS - 4))
#define FBLK_DEFAULT_MAX_IO	(1U << 20)
#define FBLK_LIMIT_MAX_IO	(8U << 20)
#define FBLK_DEFAULT_TIMEOUT_MS	30000U
#define FBLK_LIMIT_TIMEOUT_MS	(3600U * 1000)
#define FBLK_FUSE_MINOR		31
#define FBLK_MIN_FUSE_MINOR	23
#define FBLK_MAX_ERRNO		511

/*
 * Passthrough requests smaller than this run on the submitting CPU's
 * workqueue pool (cache-warm, and no more workers than CPUs contend for
 * the file's locks); larger ones on any CPU, so that one submitter's large
 * copies spread. Measured in the guest (2 boots of 3 rounds) against one
 * unbound workqueue: 4 KiB random writes +22 % to +110 % in every round,
 * 4 KiB reads mostly ahead; 1 MiB reads lost 40 % when they stayed local.
 */
#define FBLK_BACKING_LOCAL_MAX	SZ_64K

/* The tag bits of a unique that no request can have: INIT and DESTROY. */
#define FBLK_CONTROL_TAG	0x7fffffffU

/* FUSE marks the unique of an interrupt with the low bit. */
#define FBLK_INTERRUPT_BIT	1ULL

/* A message's header and argument, everything but WRITE data. */
#define FBLK_MAX_ARG		sizeof(struct fuse_write_in)

/* fuse_blk_uring_cmd.flags: the ways a commit names where READ data is */
#define FBLK_URING_DATA_FLAGS	(FUSE_BLK_URING_F_DATA_ADDR | \
				 FUSE_BLK_URING_F_DATA_IOVEC)

enum fblk_cmd_state {
	FBLK_CMD_DONE,		/* ended, or the tag has no request yet */
	FBLK_CMD_PENDING,
	FBLK_CMD_SENDING,
	FBLK_CMD_SENT,
	FBLK_CMD_RECEIVING,
	FBLK_CMD_BACKING,
};

/* The record of a queue's tag: the request that holds the tag, if any. */
struct fblk_cmd {
	struct request *rq;		/* valid while not DONE */
	struct list_head entry;		/* on queue->pending or queue->sent */
	struct list_head int_entry;	/* on owner->interrupts */
	struct fblk_chan *owner;	/* the channel that read it (SENT) */
	u64 unique;
	enum fblk_cmd_state state;
	bool interrupted;
	struct work_struct work;	/* passthrough I/O (BACKING) */
};

struct fblk_chan;

enum fblk_ent_state {
	FBLK_ENT_FREE,
	FBLK_ENT_IDLE,
	FBLK_ENT_KICKED,
	FBLK_ENT_USER,
};

struct fblk_ring_ent {
	struct list_head entry;		/* on chan->idle_ents (IDLE) */
	struct fblk_chan *chan;
	struct io_uring_cmd *ucmd;	/* the held command (IDLE, KICKED) */
	void __user *header;		/* FUSE_BLK_URING_HEADER_SIZE bytes */
	void __user *payload;		/* params.max_io_bytes */
	struct task_struct *task;	/* issued the held command (IDLE) */
	u64 unique;			/* of the request it holds (USER) */
	enum fblk_ent_state state;
};

/* What an io_uring command carries from its SQE to its task work. */
struct fblk_ring_pdu {
	struct fblk_ring_ent *ent;
	u64 addr;		/* FETCH: sqe->addr; COMMIT: data_addr */
	u32 len;		/* FETCH: sqe->len; COMMIT: data_segs */
	u32 op;
	u16 flags;		/* COMMIT: FUSE_BLK_URING_F_DATA_* */
};

struct fblk_queue {
	struct fblk_dev *dev;
	unsigned int index;
	spinlock_t lock;
	struct list_head pending;	/* not yet read by the daemon */
	struct list_head sent;		/* read, not yet answered */
	struct list_head chans;		/* attached channels, oldest first */
	struct fblk_chan *active;	/* takes new requests; may be NULL */
	bool orphaned;			/* had channels, has none now */
	unsigned long orphaned_at;	/* jiffies */
	u32 seq;			/* upper half of uniques */
	wait_queue_head_t waitq;	/* the channel's readers and pollers */
	struct fblk_cmd *cmds;		/* one per tag (params.queue_depth) */
};

struct fblk_chan {
	struct list_head entry;		/* on queue->chans */
	struct fblk_dev *dev;
	struct fblk_queue *queue;
	struct list_head interrupts;	/* FUSE_INTERRUPTs to send */
	u64 init_unique;
	bool init_sent;
	bool ready;		/* FUSE_INIT answered and accepted */
	bool failed;		/* FUSE_INIT refused by the daemon */
	bool retired;		/* a newer channel took over */
	bool destroy_sent;
	struct fblk_ring_ent *ents;	/* io_uring entries, or NULL */
	/*
	 * Entries waiting for a request, the most recently used first: the
	 * next request goes to the entry whose buffers are warmest, and the
	 * entries in use stay as few as the requests in flight.
	 */
	struct list_head idle_ents;
	/*
	 * queue_rq has kicked an idle entry whose task work has not started
	 * yet: that task work serves every request pending by then (see
	 * fblk_ring_drain()), so further requests need no kick of their own.
	 */
	bool ring_kicked;
};

struct fblk_dev {
	struct kref ref;
	struct mutex mutex;	/* serialises attach against destroy */
	int id;
	kuid_t owner;		/* its creator, with FUSE_BLK_F_UNPRIVILEGED */
	struct list_head owned;	/* on fblk_owned, unprivileged devices only */
	bool dead;		/* set once, read under any queue lock */
	bool sized;		/* capacity published (under mutex) */
	struct fuse_blk_params params;
	size_t min_read;	/* smallest read buffer a channel may use */
	struct delayed_work recovery_work;	/* fails what waited too long */
	struct fblk_cmd *cmds;	/* every queue's, queue after queue */
	struct blk_mq_tag_set tag_set;
	struct gendisk *disk;
	struct file *backing;		/* FUSE_BLK_F_PASSTHROUGH, or NULL */
	struct workqueue_struct *backing_local_wq;	/* small requests */
	struct workqueue_struct *backing_wq;		/* large requests */
	struct fblk_queue queues[];	/* params.nr_queues of them */
};

static DEFINE_MUTEX(fblk_mutex);
static DEFINE_IDR(fblk_idr);
static int fblk_major;
/* Unprivileged devices, also while created or destroyed (fblk_mutex). */
static LIST_HEAD(fblk_owned);

static bool fblk_unprivileged;
module_param_named(unprivileged, fblk_unprivileged, bool, 0644);
MODULE_PARM_DESC(unprivileged,
		 "Users who can open /dev/fuse-blk may create and serve devices of their own (default: no)");

static unsigned int fblk_max_per_user = 8;
module_param_named(max_devices_per_user, fblk_max_per_user, uint, 0644);
MODULE_PARM_DESC(max_devices_per_user,
		 "Unprivileged devices one user may have at once (default: 8)");

static unsigned int fblk_nr_queues(const struct fblk_dev *dev)
{
	return dev->params.nr_queues;
}

static void fblk_dev_release(struct kref *ref)
{
	struct fblk_dev *dev = container_of(ref, struct fblk_dev, ref);

	kvfree(dev->cmds);
	kfree(dev);
	module_put(THIS_MODULE);
}

static void fblk_dev_put(struct fblk_dev *dev)
{
	kref_put(&dev->ref, fblk_dev_release);
}

static bool fblk_has(const struct fblk_dev *dev, u64 feature)
{
	return dev->params.features & feature;
}

/* Whether the caller has CAP_SYS_ADMIN; a probe, not a denial to audit. */
static bool fblk_admin(void)
{
	return ns_capable_noaudit(&init_user_ns, CAP_SYS_ADMIN);
}

/* Whether the caller may attach to, resize, inspect or destroy @dev. */
static bool fblk_may_control(const struct fblk_dev *dev)
{
	if (fblk_admin())
		return true;
	return fblk_has(dev, FUSE_BLK_F_UNPRIVILEGED) &&
	       uid_eq(dev->owner, current_fsuid());
}

/* Whether requests of an orphaned @queue must fail now (queue lock held). */
static bool fblk_recovery_over(struct fblk_queue *queue)
{
	struct fblk_dev *dev = queue->dev;

	if (!queue->orphaned || !fblk_has(dev, FUSE_BLK_F_RECOVERY))
		return false;
	return time_after_eq(jiffies, queue->orphaned_at +
			     msecs_to_jiffies(dev->params.recovery_timeout_ms));
}

static u64 fblk_next_unique(struct fblk_queue *queue, u32 tag)
{
	/* Uniques are even: FUSE marks interrupts with the low bit. */
	return ((u64)++queue->seq << 32) | ((u64)tag << 1);
}

/*
 * Finishes a command that has been moved to DONE. Whoever did that owns
 * the request, so it is ended right here (in the daemon's context for a
 * reply) rather than bounced to the submitting CPU: under load that saves
 * an interrupt per request.
 */
static void fblk_finish(struct request *rq, blk_status_t status)
{
	blk_mq_end_request(rq, status);
}

/*
 * The record of @rq's tag. blk-mq hands each queue tags below queue_depth
 * and a request keeps its tag from queue_rq until it ends: a reply names
 * its request by tag and is checked against this record, not against
 * whatever request blk_mq_tag_to_rq() would find for that tag.
 */
static struct fblk_cmd *fblk_cmd_of(struct request *rq)
{
	struct fblk_queue *queue = rq->mq_hctx->driver_data;

	return &queue->cmds[rq->tag];
}

FBLK_RING_TW(fblk_ring_tw);

/*
 * Takes up to @max idle io_uring entries of @chan onto @kick, for
 * fblk_ring_kick() to wake once the queue lock is dropped.
 */
static void fblk_ring_take_idle(struct fblk_chan *chan, struct list_head *kick,
				unsigned int max)
{
	struct fblk_ring_ent *ent, *next;

	lockdep_assert_held(&chan->queue->lock);
	list_for_each_entry_safe(ent, next, &chan->idle_ents, entry) {
		if (!max--)
			break;
		WRITE_ONCE(ent->state, FBLK_ENT_KICKED);
		list_move_tail(&ent->entry, kick);
	}
}

/* Has the ring's task look at each entry on @kick (see fblk_ring_tw()). */
static void fblk_ring_kick(struct list_head *kick)
{
	struct fblk_ring_ent *ent, *next;

	list_for_each_entry_safe(ent, next, kick, entry) {
		list_del_init(&ent->entry);
		fblk_complete_in_task(ent->ucmd, fblk_ring_tw);
	}
}

static const struct block_device_operations fblk_fops = {
	.owner		= THIS_MODULE,
};

/* ---- passthrough: reads and writes on the backing file ---- */

/*
 * Reads or writes @rq on the backing file, a bio at a time: the bios of a
 * merged request are contiguous on the device, not in memory.
 */
static blk_status_t fblk_backing_rw(struct fblk_dev *dev, struct request *rq)
{
	bool write = req_op(rq) == REQ_OP_WRITE;
	rwf_t flags = write && (rq->cmd_flags & REQ_FUA) ? RWF_DSYNC : 0;
	loff_t pos = (loff_t)blk_rq_pos(rq) << SECTOR_SHIFT;
	struct bio *bio;

	/* The block layer lets writes to a read-only disk through. */
	if (write && fblk_has(dev, FUSE_BLK_F_READ_ONLY))
		return BLK_STS_IOERR;

	__rq_for_each_bio(bio, rq) {
		size_t len = bio->bi_iter.bi_size;
		unsigned int nr_bvecs = 0;
		struct iov_iter iter;
		struct bvec_iter it;
		struct bio_vec bv;
		ssize_t done;

		bio_for_each_bvec(bv, bio, it)
			nr_bvecs++;
		iov_iter_bvec(&iter, write ? ITER_SOURCE : ITER_DEST,
			      __bvec_iter_bvec(bio->bi_io_vec, bio->bi_iter),
			      nr_bvecs, len);
		iter.iov_offset = fblk_bvec_iter_done(bio->bi_iter);

		/*
		 * A short transfer is not the end: a file system may stop at
		 * a boundary of its own. Only a transfer of nothing is: for a
		 * write, no space; for a read, the file's end, past which the
		 * device reads zeros.
		 */
		do {
			done = write ?
				vfs_iter_write(dev->backing, &iter, &pos, flags) :
				vfs_iter_read(dev->backing, &iter, &pos, 0);
			if (done < 0)
				return errno_to_blk_status(done);
		} while (done > 0 && iov_iter_count(&iter));
		if (iov_iter_count(&iter)) {
			if (write)
				return BLK_STS_NOSPC;
			pos += iov_iter_count(&iter);
			iov_iter_zero(iov_iter_count(&iter), &iter);
		}
	}
	return BLK_STS_OK;
}

static void fblk_backing_work(struct work_struct *work)
{
	struct fblk_cmd *cmd = container_of(work, struct fblk_cmd, work);
	struct request *rq = cmd->rq;
	unsigned int noio;
	blk_status_t status;

	/*
	 * Memory the file system allocates for this I/O must not be reclaimed
	 * by writing to this very device, which waits for this I/O.
	 */
	noio = memalloc_noio_save();
	status = fblk_backing_rw(rq->q->queuedata, rq);
	memalloc_noio_restore(noio);
	WRITE_ONCE(cmd->state, FBLK_CMD_DONE);
	fblk_finish(rq, status);
}

/*
 * Takes the backing file of a FUSE_BLK_F_PASSTHROUGH device: a regular
 * file or a block device, open as the device needs it, and not on (or
 * of) a fuse-blk device, whose requests could then wait on their own.
 */
static struct file *fblk_get_backing(const struct fuse_blk_params *p)
{
	bool writable = !(p->features & FUSE_BLK_F_READ_ONLY);
	struct block_device *bdev;
	struct inode *inode;
	struct file *file;
	int ret;

	file = fget(p->backing_fd);
	if (!file)
		return ERR_PTR(-EBADF);
	ret = -EBADF;
	if (!(file->f_mode & FMODE_READ) ||
	    (writable && !(file->f_mode & FMODE_WRITE)))
		goto out_put;
	ret = -EINVAL;
	if (!file->f_op->read_iter || (writable && !file->f_op->write_iter))
		goto out_put;
	inode = file->f_mapping->host;
	if (S_ISBLK(inode->i_mode))
		bdev = I_BDEV(inode);
	else if (S_ISREG(inode->i_mode))
		bdev = inode->i_sb->s_bdev;
	else
		goto out_put;
	ret = -ELOOP;
	if (bdev && bdev->bd_disk && bdev->bd_disk->fops == &fblk_fops)
		goto out_put;
	return file;

out_put:
	fput(file);
	return ERR_PTR(ret);
}

/* Lets go of what fblk_create() took for passthrough; any of it may be NULL. */
static void fblk_put_backing(struct fblk_dev *dev)
{
	if (dev->backing_wq)
		destroy_workqueue(dev->backing_wq);
	if (dev->backing_local_wq)
		destroy_workqueue(dev->backing_local_wq);
	if (dev->backing)
		fput(dev->backing);
	dev->backing_wq = NULL;
	dev->backing_local_wq = NULL;
	dev->backing = NULL;
}

static blk_status_t fblk_queue_rq(struct blk_mq_hw_ctx *hctx,
				  const struct blk_mq_queue_data *bd)
{
	struct fblk_queue *queue = hctx->driver_data;
	struct request *rq = bd->rq;
	struct fblk_cmd *cmd = fblk_cmd_of(rq);
	LIST_HEAD(kick);

	switch (req_op(rq)) {
	case REQ_OP_READ:
	case REQ_OP_WRITE:
	case REQ_OP_FLUSH:
	case REQ_OP_DISCARD:
	case REQ_OP_WRITE_ZEROES:
		break;
	default:
		return BLK_STS_NOTSUPP;
	}

	/*
	 * Passthrough needs no daemon. A device being destroyed still has
	 * del_gendisk() to wait for these before the file is put.
	 */
	if (queue->dev->backing &&
	    (req_op(rq) == REQ_OP_READ || req_op(rq) == REQ_OP_WRITE)) {
		if (READ_ONCE(queue->dev->dead))
			return BLK_STS_IOERR;
		blk_mq_start_request(rq);
		cmd->rq = rq;
		WRITE_ONCE(cmd->state, FBLK_CMD_BACKING);
		queue_work(blk_rq_bytes(rq) < FBLK_BACKING_LOCAL_MAX ?
			   queue->dev->backing_local_wq :
			   queue->dev->backing_wq, &cmd->work);
		return BLK_STS_OK;
	}

	spin_lock(&queue->lock);
	if (queue->dev->dead || fblk_recovery_over(queue)) {
		spin_unlock(&queue->lock);
		return BLK_STS_IOERR;
	}
	blk_mq_start_request(rq);
	cmd->rq = rq;
	cmd->unique = fblk_next_unique(queue, rq->tag);
	cmd->interrupted = false;
	cmd->state = FBLK_CMD_PENDING;
	cmd->owner = NULL;
	INIT_LIST_HEAD(&cmd->int_entry);
	list_add_tail(&cmd->entry, &queue->pending);
	if (queue->active && !queue->active->ring_kicked) {
		fblk_ring_take_idle(queue->active, &kick, 1);
		queue->active->ring_kicked = !list_empty(&kick);
	}
	spin_unlock(&queue->lock);

	fblk_ring_kick(&kick);
	/* Only read() and poll() sleep here; io_uring channels never do. */
	if (wq_has_sleeper(&queue->waitq))
		wake_up(&queue->waitq);
	return BLK_STS_OK;
}

static enum blk_eh_timer_return fblk_timeout(struct request *rq)
{
	struct fblk_queue *queue = rq->mq_hctx->driver_data;
	struct fblk_cmd *cmd = fblk_cmd_of(rq);

	spin_lock(&queue->lock);
	/* READ_ONCE: a reply's taker ends RECEIVING without the lock. */
	switch (READ_ONCE(cmd->state)) {
	case FBLK_CMD_SENT:
		if (!cmd->interrupted) {
			/* Ask the daemon to give up; fail one timeout later. */
			cmd->interrupted = true;
			list_add_tail(&cmd->int_entry, &cmd->owner->interrupts);
			spin_unlock(&queue->lock);
			wake_up(&queue->waitq);
			return BLK_EH_RESET_TIMER;
		}
		goto fail;
	case FBLK_CMD_PENDING:
		/* Waiting for a daemon to come back is not a timeout. */
		if (!queue->active && queue->orphaned &&
		    fblk_has(queue->dev, FUSE_BLK_F_RECOVERY) &&
		    !fblk_recovery_over(queue)) {
			spin_unlock(&queue->lock);
			return BLK_EH_RESET_TIMER;
		}
fail:
		list_del_init(&cmd->entry);
		list_del_init(&cmd->int_entry);
		cmd->state = FBLK_CMD_DONE;
		spin_unlock(&queue->lock);
		pr_warn_ratelimited("fuseblk%d: request %llu timed out\n",
				    queue->dev->id, cmd->unique);
		fblk_finish(rq, BLK_STS_IOERR);
		return BLK_EH_DONE;
	case FBLK_CMD_SENDING:
	case FBLK_CMD_RECEIVING:
	case FBLK_CMD_BACKING:
		/* A read()/write() or work item owns it and will finish it. */
		spin_unlock(&queue->lock);
		return BLK_EH_RESET_TIMER;
	case FBLK_CMD_DONE:
	default:
		spin_unlock(&queue->lock);
		return BLK_EH_DONE;
	}
}

static int fblk_init_hctx(struct blk_mq_hw_ctx *hctx, void *data,
			  unsigned int index)
{
	struct fblk_dev *dev = data;

	hctx->driver_data = &dev->queues[index];
	return 0;
}

static const struct blk_mq_ops fblk_mq_ops = {
	.queue_rq	= fblk_queue_rq,
	.timeout	= fblk_timeout,
	.init_hctx	= fblk_init_hctx,
};

/* Moves every PENDING and SENT command of @queue on @list to DONE. */
static void fblk_take_all(struct fblk_queue *queue, struct list_head *from,
			  struct list_head *to)
{
	struct fblk_cmd *cmd, *next;

	lockdep_assert_held(&queue->lock);
	list_for_each_entry_safe(cmd, next, from, entry) {
		list_del_init(&cmd->int_entry);
		cmd->state = FBLK_CMD_DONE;
		list_move_tail(&cmd->entry, to);
	}
}

static void fblk_finish_all(struct list_head *list, blk_status_t status)
{
	struct fblk_cmd *cmd, *next;

	list_for_each_entry_safe(cmd, next, list, entry) {
		list_del_init(&cmd->entry);
		fblk_finish(cmd->rq, status);
	}
}

/*
 * Fails the requests of queues that have been without a channel for the
 * recovery timeout, and re-arms itself for queues still within it.
 */
static void fblk_recovery_work(struct work_struct *work)
{
	struct fblk_dev *dev = container_of(to_delayed_work(work),
					    struct fblk_dev, recovery_work);
	unsigned long rearm = 0;
	unsigned int i;

	for (i = 0; i < fblk_nr_queues(dev); i++) {
		struct fblk_queue *queue = &dev->queues[i];
		unsigned long deadline;
		LIST_HEAD(failed);

		spin_lock(&queue->lock);
		if (!dev->dead && fblk_recovery_over(queue)) {
			fblk_take_all(queue, &queue->pending, &failed);
		} else if (!dev->dead && queue->orphaned) {
			deadline = queue->orphaned_at +
				msecs_to_jiffies(dev->params.recovery_timeout_ms);
			if (!rearm || time_before(deadline, rearm))
				rearm = deadline;
		}
		spin_unlock(&queue->lock);
		fblk_finish_all(&failed, BLK_STS_IOERR);
	}
	if (rearm)
		mod_delayed_work(system_wq, &dev->recovery_work,
				 max_t(long, rearm - jiffies, 1));
}

/* ---- sysfs: /sys/block/fuseblkN/fuse_blk/ ---- */

static struct fblk_dev *fblk_dev_of(struct device *d)
{
	return dev_to_disk(d)->private_data;
}

/*
 * Queues with an active channel; the channels attached to any queue go to
 * *nr_channels when asked for. One walk under each queue's lock serves
 * both the state reported to userspace and the decision to go live.
 */
static unsigned int fblk_served_queues(struct fblk_dev *dev, u32 *nr_channels)
{
	unsigned int i, served = 0, attached = 0;

	for (i = 0; i < fblk_nr_queues(dev); i++) {
		struct fblk_queue *queue = &dev->queues[i];
		struct fblk_chan *chan;

		spin_lock(&queue->lock);
		if (nr_channels)
			list_for_each_entry(chan, &queue->chans, entry)
				attached++;
		if (queue->active)
			served++;
		spin_unlock(&queue->lock);
	}
	if (nr_channels)
		*nr_channels = attached;
	return served;
}

static u32 fblk_state(struct fblk_dev *dev, u32 *nr_channels)
{
	unsigned int served = fblk_served_queues(dev, nr_channels);

	if (READ_ONCE(dev->dead))
		return FUSE_BLK_STATE_DEAD;
	/*
	 * LIVE also means the capacity is published: a daemon that sees it
	 * may hand the device to users, who must find its real size.
	 */
	if (served == fblk_nr_queues(dev) && smp_load_acquire(&dev->sized))
		return FUSE_BLK_STATE_LIVE;
	return served ? FUSE_BLK_STATE_PARTIAL : FUSE_BLK_STATE_WAITING;
}

/*
 * Requests started and not ended: a snapshot for GET_INFO and sysfs, read
 * without the queue locks (passthrough and replies end theirs without).
 */
static u32 fblk_inflight(struct fblk_dev *dev)
{
	unsigned int i, n = fblk_nr_queues(dev) * dev->params.queue_depth;
	u32 inflight = 0;

	for (i = 0; i < n; i++)
		if (READ_ONCE(dev->cmds[i].state) != FBLK_CMD_DONE)
			inflight++;
	return inflight;
}

static ssize_t dev_id_show(struct device *d, struct device_attribute *attr,
			   char *buf)
{
	return sysfs_emit(buf, "%d\n", fblk_dev_of(d)->id);
}
static DEVICE_ATTR_RO(dev_id);

static ssize_t name_show(struct device *d, struct device_attribute *attr,
			 char *buf)
{
	return sysfs_emit(buf, "%s\n", fblk_dev_of(d)->params.name);
}
static DEVICE_ATTR_RO(name);

static ssize_t state_show(struct device *d, struct device_attribute *attr,
			  char *buf)
{
	static const char * const names[] = {
		[FUSE_BLK_STATE_WAITING] = "waiting",
		[FUSE_BLK_STATE_LIVE] = "live",
		[FUSE_BLK_STATE_PARTIAL] = "partial",
		[FUSE_BLK_STATE_DEAD] = "dead",
	};

	return sysfs_emit(buf, "%s\n", names[fblk_state(fblk_dev_of(d), NULL)]);
}
static DEVICE_ATTR_RO(state);

static ssize_t inflight_show(struct device *d, struct device_attribute *attr,
			     char *buf)
{
	return sysfs_emit(buf, "%u\n", fblk_inflight(fblk_dev_of(d)));
}
static DEVICE_ATTR_RO(inflight);

/* The owner's uid for udev (OWNER=), empty for an admin's device. */
static ssize_t owner_show(struct device *d, struct device_attribute *attr,
			  char *buf)
{
	struct fblk_dev *dev = fblk_dev_of(d);

	if (!fblk_has(dev, FUSE_BLK_F_UNPRIVILEGED))
		return 0;
	return sysfs_emit(buf, "%u\n", from_kuid(&init_user_ns, dev->owner));
}
static DEVICE_ATTR_RO(owner);

static struct attribute *fblk_attrs[] = {
	&dev_attr_dev_id.attr,
	&dev_attr_owner.attr,
	&dev_attr_name.attr,
	&dev_attr_state.attr,
	&dev_attr_inflight.attr,
	NULL,
};

static const struct attribute_group fblk_attr_group = {
	.name = "fuse_blk",
	.attrs = fblk_attrs,
};

static const struct attribute_group *fblk_attr_groups[] = {
	&fblk_attr_group,
	NULL,
};

/* ---- control: create, destroy, info ---- */

static int fblk_check_params(struct fuse_blk_params *p)
{
	unsigned int i;

	for (i = 0; i < ARRAY_SIZE(p->reserved); i++)
		if (p->reserved[i])
			return -EINVAL;
	if (!memchr(p->name, '\0', sizeof(p->name)))
		return -EINVAL;
	if (p->logical_block_size < SECTOR_SIZE ||
	    p->logical_block_size > PAGE_SIZE ||
	    !is_power_of_2(p->logical_block_size))
		return -EINVAL;
	if (!p->physical_block_size)
		p->physical_block_size = p->logical_block_size;
	if (p->physical_block_size < p->logical_block_size ||
	    !is_power_of_2(p->physical_block_size))
		return -EINVAL;
	if (!p->size || p->size & (p->logical_block_size - 1) ||
	    p->size >> SECTOR_SHIFT > (u64)LLONG_MAX >> SECTOR_SHIFT)
		return -EINVAL;
	if (!p->max_io_bytes)
		p->max_io_bytes = FBLK_DEFAULT_MAX_IO;
	if (p->max_io_bytes < PAGE_SIZE || p->max_io_bytes > FBLK_LIMIT_MAX_IO ||
	    p->max_io_bytes & (PAGE_SIZE - 1))
		return -EINVAL;
	if (!p->nr_queues || p->nr_queues > FUSE_BLK_MAX_QUEUES)
		return -EINVAL;
	if (!p->queue_depth || p->queue_depth > FUSE_BLK_MAX_QUEUE_DEPTH)
		return -EINVAL;
	if (!p->io_timeout_ms)
		p->io_timeout_ms = FBLK_DEFAULT_TIMEOUT_MS;
	if (p->io_timeout_ms > FBLK_LIMIT_TIMEOUT_MS)
		return -EINVAL;
	p->features &= FBLK_FEATURES;
	if (!(p->features & FUSE_BLK_F_PASSTHROUGH) && p->backing_fd)
		return -EINVAL;
	if (!(p->features & FUSE_BLK_F_RECOVERY)) {
		p->features &= ~FUSE_BLK_F_FAIL_INFLIGHT;
		p->recovery_timeout_ms = 0;
	}
	if (p->recovery_timeout_ms > FBLK_LIMIT_TIMEOUT_MS)
		return -EINVAL;
	return 0;
}

static void fblk_init_limits(const struct fuse_blk_params *p,
			     struct fblk_limits *lim)
{
	lim->logical_block_size = p->logical_block_size;
	lim->physical_block_size = p->physical_block_size;
	lim->io_min = p->physical_block_size;
	lim->max_hw_sectors = p->max_io_bytes >> SECTOR_SHIFT;
	/*
	 * Data is copied by the CPU (or handed to the backing file's
	 * read_iter/write_iter), never mapped for DMA: a request may have as
	 * many segments of any size as fit in max_io_bytes. The defaults (128
	 * segments of 64 KiB) split a 1 MiB request of scattered pages.
	 */
	lim->max_segments = USHRT_MAX;
	lim->max_segment_size = UINT_MAX;
	if (p->features & FUSE_BLK_F_DISCARD) {
		lim->max_hw_discard_sectors = UINT_MAX >> SECTOR_SHIFT;
		lim->discard_granularity = p->physical_block_size;
	}
	if (p->features & FUSE_BLK_F_WRITE_ZEROES)
		lim->max_write_zeroes_sectors = UINT_MAX >> SECTOR_SHIFT;
	if (p->features & FUSE_BLK_F_FLUSH) {
		lim->features |= BLK_FEAT_WRITE_CACHE;
		if (p->features & FUSE_BLK_F_FUA)
			lim->features |= BLK_FEAT_FUA;
	}
	if (p->features & FUSE_BLK_F_ROTATIONAL)
		lim->features |= BLK_FEAT_ROTATIONAL;
	else
		lim->features &= ~BLK_FEAT_ROTATIONAL;
}

/* How many unprivileged devices @uid has (fblk_mutex held). */
static unsigned int fblk_owned_by(kuid_t uid)
{
	struct fblk_dev *dev;
	unsigned int n = 0;

	lockdep_assert_held(&fblk_mutex);
	list_for_each_entry(dev, &fblk_owned, owned)
		n += uid_eq(dev->owner, uid);
	return n;
}

/*
 * What an unprivileged creator may not have: passthrough (the driver
 * would read and write the file with its own rights, whatever the daemon
 * could), a name that is not a plain word, and timeouts longer than the
 * default.
 */
static int fblk_check_unprivileged(struct fuse_blk_params *p)
{
	const char *c;

	if (p->features & FUSE_BLK_F_PASSTHROUGH)
		return -EPERM;
	/* The name reaches udev's rules (links): a plain word only. */
	if (p->name[0] == '.')
		return -EINVAL;
	for (c = p->name; *c; c++)
		if (!isalnum(*c) && !strchr("_-.+:", *c))
			return -EINVAL;
	p->io_timeout_ms = min(p->io_timeout_ms, FBLK_DEFAULT_TIMEOUT_MS);
	p->recovery_timeout_ms = min(p->recovery_timeout_ms,
				     FBLK_DEFAULT_TIMEOUT_MS);
	p->features |= FUSE_BLK_F_UNPRIVILEGED;
	return 0;
}

static int fblk_create(struct fuse_blk_params __user *uparams)
{
	struct fblk_limits lim = { };
	struct fuse_blk_params p;
	struct fblk_dev *dev;
	struct gendisk *disk;
	unsigned int i;
	int ret;

	if (copy_from_user(&p, uparams, sizeof(p)))
		return -EFAULT;
	ret = fblk_check_params(&p);
	if (ret)
		return ret;
	/* Only the driver marks a device unprivileged: its creator's. */
	p.features &= ~FUSE_BLK_F_UNPRIVILEGED;
	if (!fblk_admin()) {
		ret = fblk_check_unprivileged(&p);
		if (ret)
			return ret;
	}
	/* Without a write cache there is nothing for FUA to bypass. */
	if (!(p.features & FUSE_BLK_F_FLUSH))
		p.features &= ~FUSE_BLK_F_FUA;

	if (!try_module_get(THIS_MODULE))
		return -ENODEV;
	dev = kzalloc(struct_size(dev, queues, p.nr_queues), GFP_KERNEL);
	if (!dev) {
		ret = -ENOMEM;
		goto out_module;
	}
	dev->cmds = kvcalloc(p.nr_queues * p.queue_depth, sizeof(*dev->cmds),
			     GFP_KERNEL);
	if (!dev->cmds) {
		ret = -ENOMEM;
		goto out_free;
	}
	for (i = 0; i < p.nr_queues * p.queue_depth; i++)
		INIT_WORK(&dev->cmds[i].work, fblk_backing_work);
	kref_init(&dev->ref);
	mutex_init(&dev->mutex);
	INIT_LIST_HEAD(&dev->owned);
	dev->owner = current_fsuid();
	INIT_DELAYED_WORK(&dev->recovery_work, fblk_recovery_work);
	dev->params = p;
	dev->params.backing_fd = 0;	/* meaningless to anyone else */
	dev->min_read = sizeof(struct fuse_in_header) + FBLK_MAX_ARG +
			p.max_io_bytes;
	for (i = 0; i < p.nr_queues; i++) {
		struct fblk_queue *queue = &dev->queues[i];

		queue->dev = dev;
		queue->index = i;
		queue->cmds = &dev->cmds[i * p.queue_depth];
		spin_lock_init(&queue->lock);
		INIT_LIST_HEAD(&queue->pending);
		INIT_LIST_HEAD(&queue->sent);
		INIT_LIST_HEAD(&queue->chans);
		init_waitqueue_head(&queue->waitq);
	}

	mutex_lock(&fblk_mutex);
	if (p.features & FUSE_BLK_F_UNPRIVILEGED &&
	    fblk_owned_by(dev->owner) >= READ_ONCE(fblk_max_per_user))
		ret = -EDQUOT;
	else
		ret = idr_alloc(&fblk_idr, NULL, 0, FBLK_MAX_DEVICES,
				GFP_KERNEL);
	if (ret >= 0 && p.features & FUSE_BLK_F_UNPRIVILEGED)
		list_add(&dev->owned, &fblk_owned);
	mutex_unlock(&fblk_mutex);
	if (ret < 0)
		goto out_free;
	dev->id = ret;
	dev->params.dev_id = ret;

	if (p.features & FUSE_BLK_F_PASSTHROUGH) {
		dev->backing = fblk_get_backing(&p);
		if (IS_ERR(dev->backing)) {
			ret = PTR_ERR(dev->backing);
			dev->backing = NULL;
			goto out_id;
		}
		dev->backing_local_wq = alloc_workqueue("fuseblk%d",
							FBLK_WQ_PERCPU |
							WQ_MEM_RECLAIM, 0,
							dev->id);
		dev->backing_wq = alloc_workqueue("fuseblk%d_large",
						  WQ_UNBOUND | WQ_MEM_RECLAIM,
						  0, dev->id);
		if (!dev->backing_local_wq || !dev->backing_wq) {
			ret = -ENOMEM;
			goto out_backing;
		}
	}

	dev->tag_set.ops = &fblk_mq_ops;
	dev->tag_set.nr_hw_queues = p.nr_queues;
	dev->tag_set.queue_depth = p.queue_depth;
	dev->tag_set.numa_node = NUMA_NO_NODE;
	dev->tag_set.flags = FBLK_TAG_SET_FLAGS;
	dev->tag_set.timeout = msecs_to_jiffies(p.io_timeout_ms);
	dev->tag_set.driver_data = dev;
	ret = blk_mq_alloc_tag_set(&dev->tag_set);
	if (ret)
		goto out_backing;

	fblk_init_limits(&dev->params, &lim);
	disk = fblk_alloc_disk(&dev->tag_set, &lim, dev);
	if (IS_ERR(disk)) {
		ret = PTR_ERR(disk);
		goto out_tag_set;
	}
	dev->disk = disk;
	disk->major = fblk_major;
	disk->first_minor = dev->id * FBLK_MINORS;
	disk->minors = FBLK_MINORS;
	disk->fops = &fblk_fops;
	disk->private_data = dev;
	snprintf(disk->disk_name, sizeof(disk->disk_name), "fuseblk%d", dev->id);
	/*
	 * The capacity stays 0 until every queue is served: the partition
	 * scan of add_disk() would otherwise wait for a daemon that cannot
	 * attach before this ioctl returns.
	 */
	set_capacity(disk, 0);
	set_disk_ro(disk, !!(p.features & FUSE_BLK_F_READ_ONLY));

	/* Publish the params (with dev_id) before the disk is visible. */
	if (copy_to_user(uparams, &dev->params, sizeof(dev->params))) {
		ret = -EFAULT;
		goto out_disk;
	}
	ret = device_add_disk(NULL, disk, fblk_attr_groups);
	if (ret)
		goto out_disk;

	mutex_lock(&fblk_mutex);
	idr_replace(&fblk_idr, dev, dev->id);
	mutex_unlock(&fblk_mutex);
	return 0;

out_disk:
	put_disk(disk);
out_tag_set:
	blk_mq_free_tag_set(&dev->tag_set);
out_backing:
	fblk_put_backing(dev);
out_id:
	mutex_lock(&fblk_mutex);
	idr_remove(&fblk_idr, dev->id);
	list_del(&dev->owned);
	mutex_unlock(&fblk_mutex);
out_free:
	kvfree(dev->cmds);
	kfree(dev);
out_module:
	module_put(THIS_MODULE);
	return ret;
}

/* Takes a reference to device @id, or returns NULL. */
static struct fblk_dev *fblk_get(u32 id)
{
	struct fblk_dev *dev;

	mutex_lock(&fblk_mutex);
	dev = idr_find(&fblk_idr, id);
	if (dev)
		kref_get(&dev->ref);
	mutex_unlock(&fblk_mutex);
	return dev;
}

/* Device @id for a caller that may control it, or an ERR_PTR. */
static struct fblk_dev *fblk_get_controlled(u32 id)
{
	struct fblk_dev *dev = fblk_get(id);

	if (!dev)
		return ERR_PTR(-ENODEV);
	if (!fblk_may_control(dev)) {
		fblk_dev_put(dev);
		return ERR_PTR(-EPERM);
	}
	return dev;
}

static int fblk_destroy(u32 id)
{
	struct fblk_dev *dev;
	unsigned int i;

	/* The id stays allocated (mapped to NULL) until the disk is gone. */
	mutex_lock(&fblk_mutex);
	dev = idr_find(&fblk_idr, id);
	if (dev && !fblk_may_control(dev)) {
		mutex_unlock(&fblk_mutex);
		return -EPERM;
	}
	if (dev)
		idr_replace(&fblk_idr, NULL, id);
	mutex_unlock(&fblk_mutex);
	if (!dev)
		return -ENODEV;

	mutex_lock(&dev->mutex);
	WRITE_ONCE(dev->dead, true);
	for (i = 0; i < fblk_nr_queues(dev); i++) {
		struct fblk_queue *queue = &dev->queues[i];
		LIST_HEAD(failed);

		struct fblk_chan *chan;
		LIST_HEAD(kick);

		spin_lock(&queue->lock);
		fblk_take_all(queue, &queue->pending, &failed);
		fblk_take_all(queue, &queue->sent, &failed);
		list_for_each_entry(chan, &queue->chans, entry)
			fblk_ring_take_idle(chan, &kick, UINT_MAX);
		spin_unlock(&queue->lock);
		fblk_finish_all(&failed, BLK_STS_IOERR);
		/* Readers get FUSE_DESTROY, then ENODEV; entries ENODEV. */
		fblk_ring_kick(&kick);
		wake_up_all(&queue->waitq);
	}
	mutex_unlock(&dev->mutex);
	/* dead is set: nothing queues the work again. */
	cancel_delayed_work_sync(&dev->recovery_work);

	/*
	 * Waits for every request to end (it freezes the queue): commands
	 * owned by a read()/write() in progress or by a passthrough work item
	 * finish on their own, the rest were failed above.
	 */
	del_gendisk(dev->disk);
	put_disk(dev->disk);
	blk_mq_free_tag_set(&dev->tag_set);
	fblk_put_backing(dev);

	mutex_lock(&fblk_mutex);
	idr_remove(&fblk_idr, id);
	list_del(&dev->owned);
	mutex_unlock(&fblk_mutex);
	fblk_dev_put(dev);
	return 0;
}

static int fblk_get_info(struct fuse_blk_info __user *uinfo)
{
	struct fuse_blk_info info;
	struct fblk_dev *dev;
	unsigned int i;
	u32 dev_id;

	if (get_user(dev_id, &uinfo->dev_id))
		return -EFAULT;
	dev = fblk_get_controlled(dev_id);
	if (IS_ERR(dev))
		return PTR_ERR(dev);
	memset(&info, 0, sizeof(info));
	info.dev_id = dev_id;
	info.state = fblk_state(dev, &info.nr_channels);
	info.inflight = fblk_inflight(dev);
	info.params = dev->params;
	for (i = 0; i < fblk_nr_queues(dev); i++) {
		struct fblk_queue *queue = &dev->queues[i];
		struct fblk_cmd *cmd;

		spin_lock(&queue->lock);
		list_for_each_entry(cmd, &queue->pending, entry)
			info.waiting++;
		spin_unlock(&queue->lock);
	}
	fblk_dev_put(dev);
	return copy_to_user(uinfo, &info, sizeof(info)) ? -EFAULT : 0;
}

static int fblk_attach(struct file *file, struct fuse_blk_attach __user *uarg)
{
	struct fuse_blk_attach arg;
	struct fblk_queue *queue;
	struct fblk_chan *chan;
	struct fblk_dev *dev;
	unsigned int i;
	int ret;

	if (copy_from_user(&arg, uarg, sizeof(arg)))
		return -EFAULT;
	if (arg.flags & ~FUSE_BLK_ATTACH_TAKEOVER)
		return -EINVAL;
	for (i = 0; i < ARRAY_SIZE(arg.reserved); i++)
		if (arg.reserved[i])
			return -EINVAL;
	dev = fblk_get_controlled(arg.dev_id);
	if (IS_ERR(dev))
		return PTR_ERR(dev);
	ret = -EINVAL;
	if (arg.queue >= fblk_nr_queues(dev))
		goto out_put;
	ret = -ENOMEM;
	chan = kzalloc(sizeof(*chan), GFP_KERNEL);
	if (!chan)
		goto out_put;
	queue = &dev->queues[arg.queue];
	chan->dev = dev;
	chan->queue = queue;
	INIT_LIST_HEAD(&chan->interrupts);
	INIT_LIST_HEAD(&chan->idle_ents);

	mutex_lock(&dev->mutex);
	spin_lock(&queue->lock);
	if (dev->dead)
		ret = -ENODEV;
	else if (!list_empty(&queue->chans) &&
		 !(arg.flags & FUSE_BLK_ATTACH_TAKEOVER))
		ret = -EBUSY;
	else if (cmpxchg(&file->private_data, NULL, chan))
		ret = -EBUSY;	/* this file is a channel already */
	else {
		list_add_tail(&chan->entry, &queue->chans);
		/* A daemon is coming back: requests wait for its INIT. */
		queue->orphaned = false;
		chan->init_unique = fblk_next_unique(queue, FBLK_CONTROL_TAG);
		ret = 0;
	}
	spin_unlock(&queue->lock);
	mutex_unlock(&dev->mutex);
	if (ret)
		goto out_free;
	wake_up(&queue->waitq);
	/* The channel keeps the device reference. */
	return 0;

out_free:
	kfree(chan);
out_put:
	fblk_dev_put(dev);
	return ret;
}

/*
 * Sets a device's size while it serves. The daemon has made its backend
 * serve the new size first, growing or shrinking: the driver needs nothing
 * from it. Requests already past the new end when shrinking finish as the
 * daemon answers them (it refuses what lies past its new end).
 */
static int fblk_resize(struct fuse_blk_resize __user *uarg)
{
	struct fuse_blk_resize arg;
	struct fblk_dev *dev;
	int ret;

	if (copy_from_user(&arg, uarg, sizeof(arg)))
		return -EFAULT;
	if (arg.reserved0 || memchr_inv(arg.reserved, 0, sizeof(arg.reserved)))
		return -EINVAL;
	dev = fblk_get_controlled(arg.dev_id);
	if (IS_ERR(dev))
		return PTR_ERR(dev);
	ret = -EINVAL;
	if (!arg.size || arg.size & (dev->params.logical_block_size - 1) ||
	    arg.size >> SECTOR_SHIFT > (u64)LLONG_MAX >> SECTOR_SHIFT)
		goto out_put;

	mutex_lock(&dev->mutex);
	if (dev->dead) {
		ret = -ENODEV;
	} else {
		/* GET_INFO reads params without the mutex. */
		WRITE_ONCE(dev->params.size, arg.size);
		/*
		 * Before it is live the capacity stays 0: going live
		 * publishes params.size. Afterwards the change uevent carries
		 * RESIZE=1.
		 */
		if (dev->sized)
			set_capacity_and_notify(dev->disk,
						arg.size >> SECTOR_SHIFT);
		ret = 0;
	}
	mutex_unlock(&dev->mutex);
out_put:
	fblk_dev_put(dev);
	return ret;
}

static long fblk_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	void __user *argp = (void __user *)arg;

	/* Each command checks the device's owner (fblk_may_control()). */
	if (!READ_ONCE(fblk_unprivileged) && !capable(CAP_SYS_ADMIN))
		return -EPERM;

	switch (cmd) {
	case FUSE_BLK_IOC_GET_FEATURES: {
		struct fuse_blk_features features = {
			.abi_version = FUSE_BLK_ABI_VERSION,
			.features = FBLK_FEATURES,
		};

		return copy_to_user(argp, &features, sizeof(features)) ?
			-EFAULT : 0;
	}
	case FUSE_BLK_IOC_CREATE:
		return fblk_create(argp);
	case FUSE_BLK_IOC_DESTROY: {
		u32 id;

		if (get_user(id, (u32 __user *)argp))
			return -EFAULT;
		return fblk_destroy(id);
	}
	case FUSE_BLK_IOC_GET_INFO:
		return fblk_get_info(argp);
	case FUSE_BLK_IOC_ATTACH:
		return fblk_attach(file, argp);
	case FUSE_BLK_IOC_RESIZE:
		return fblk_resize(argp);
	default:
		return -ENOTTY;
	}
}

/* ---- channel: read requests, write replies ---- */

static bool fblk_chan_has_work(struct fblk_chan *chan)
{
	struct fblk_queue *queue = chan->queue;

	if (READ_ONCE(chan->dev->dead) || chan->failed || !chan->init_sent ||
	    chan->retired || !list_empty(&chan->interrupts))
		return true;
	return chan == queue->active && !list_empty(&queue->pending);
}

static void fblk_header(struct fuse_in_header *h, u32 opcode, u64 unique,
			size_t len)
{
	h->len = len;
	h->opcode = opcode;
	h->unique = unique;
	h->nodeid = FUSE_BLK_NODE_ID;
}

/* Builds the header and argument of @rq's message; returns their size. */
static size_t fblk_build_io(struct request *rq, u64 unique, void *buf,
			    u32 *data_len)
{
	struct fuse_in_header *h = buf;
	void *arg = h + 1;
	u64 offset = (u64)blk_rq_pos(rq) << SECTOR_SHIFT;
	u32 bytes = blk_rq_bytes(rq);
	size_t arg_len;
	u32 opcode;

	*data_len = 0;
	switch (req_op(rq)) {
	case REQ_OP_READ: {
		struct fuse_read_in *in = arg;

		in->offset = offset;
		in->size = bytes;
		opcode = FUSE_READ;
		arg_len = sizeof(*in);
		break;
	}
	case REQ_OP_WRITE: {
		struct fuse_write_in *in = arg;

		in->offset = offset;
		in->size = bytes;
		if (rq->cmd_flags & REQ_FUA)
			in->flags = O_DSYNC;
		opcode = FUSE_WRITE;
		arg_len = sizeof(*in);
		*data_len = bytes;
		break;
	}
	case REQ_OP_FLUSH: {
		struct fuse_fsync_in *in = arg;

		in->fsync_flags = FUSE_FSYNC_FDATASYNC;
		opcode = FUSE_FSYNC;
		arg_len = sizeof(*in);
		break;
	}
	default: {	/* REQ_OP_DISCARD, REQ_OP_WRITE_ZEROES */
		struct fuse_fallocate_in *in = arg;

		in->offset = offset;
		in->length = bytes;
		in->mode = FALLOC_FL_KEEP_SIZE |
			   (req_op(rq) == REQ_OP_DISCARD ?
			    FALLOC_FL_PUNCH_HOLE : FALLOC_FL_ZERO_RANGE);
		opcode = FUSE_FALLOCATE;
		arg_len = sizeof(*in);
		break;
	}
	}
	fblk_header(h, opcode, unique, sizeof(*h) + arg_len + *data_len);
	return sizeof(*h) + arg_len;
}

/* User pages pinned at a time by fblk_copy_user(). */
#define FBLK_PIN_BATCH		32

/*
 * Copies @rq's data to (@to_user) or from the user memory @uiter describes
 * (one buffer, or iovecs), at least blk_rq_bytes() of it, through pinned
 * pages and memcpy(), and advances @uiter. The daemon's buffers are mapped
 * in whole pages, so a batch of pins replaces a user-copy fault check per
 * segment. (Under emulation, where string instructions crawl, this is
 * several times faster for 1 MiB requests.)
 */
static int fblk_copy_user(struct request *rq, struct iov_iter *uiter,
			  bool to_user)
{
	struct page *batch[FBLK_PIN_BATCH], **pages = batch;
	size_t left = blk_rq_bytes(rq);
	size_t start = 0;	/* offset of the pinned run in pages[0] */
	ssize_t got = 0;	/* bytes of the pinned run */
	size_t used = 0;	/* of them, copied */
	struct req_iterator iter;
	struct bio_vec bv;
	int ret = 0;

	rq_for_each_segment(bv, rq, iter) {
		unsigned int done = 0;

		while (done < bv.bv_len) {
			size_t pos = start + used;
			struct page *page;
			unsigned int n;
			void *kaddr;

			if (used == got) {
				if (got)
					fblk_put_user_pages(pages,
						DIV_ROUND_UP(start + got, PAGE_SIZE),
						to_user);
				used = 0;
				got = fblk_get_user_pages(uiter, pages, left,
							  FBLK_PIN_BATCH, &start);
				if (got <= 0) {
					got = 0;
					ret = -EFAULT;
					goto out;
				}
				pos = start;
			}
			page = pages[pos >> PAGE_SHIFT];
			n = min3(bv.bv_len - done, PAGE_SIZE - offset_in_page(pos),
				 got - used);
			kaddr = kmap_local_page(page);
			if (to_user)
				memcpy_from_page(kaddr + offset_in_page(pos),
						 bv.bv_page, bv.bv_offset + done,
						 n);
			else
				memcpy_to_page(bv.bv_page, bv.bv_offset + done,
					       kaddr + offset_in_page(pos), n);
			kunmap_local(kaddr);
			done += n;
			used += n;
			left -= n;
		}
	}
out:
	if (got)
		fblk_put_user_pages(pages,
				    DIV_ROUND_UP(start + got, PAGE_SIZE), to_user);
	return ret;
}

/*
 * Moves @rq's data between its pages and a daemon's memory: through
 * pinned pages when the iterator is user memory holding all of it (the
 * channels' buffers), else a page at a time.
 */
static int fblk_copy_data_out(struct request *rq, struct iov_iter *to)
{
	struct req_iterator iter;
	struct bio_vec bv;

	if (user_backed_iter(to) && iov_iter_count(to) >= blk_rq_bytes(rq))
		return fblk_copy_user(rq, to, true);
	rq_for_each_segment(bv, rq, iter) {
		if (copy_page_to_iter(bv.bv_page, bv.bv_offset, bv.bv_len,
				      to) != bv.bv_len)
			return -EFAULT;
	}
	return 0;
}

static int fblk_copy_data_in(struct request *rq, struct iov_iter *from)
{
	struct req_iterator iter;
	struct bio_vec bv;

	if (user_backed_iter(from) && iov_iter_count(from) >= blk_rq_bytes(rq))
		return fblk_copy_user(rq, from, false);
	rq_for_each_segment(bv, rq, iter) {
		if (copy_page_from_iter(bv.bv_page, bv.bv_offset, bv.bv_len,
					from) != bv.bv_len)
			return -EFAULT;
		flush_dcache_page(bv.bv_page);
	}
	return 0;
}

static void fblk_zero_data(struct request *rq)
{
	struct req_iterator iter;
	struct bio_vec bv;

	rq_for_each_segment(bv, rq, iter)
		memzero_page(bv.bv_page, bv.bv_offset, bv.bv_len);
}

/*
 * Sends the first pending request: its header and argument to @head, WRITE
 * data to @data (the same iterator for read(2)). For an io_uring entry
 * @ent, the entry holds the request once it is sent. Called with the queue
 * lock held, returns unlocked.
 */
static ssize_t fblk_send_request(struct fblk_chan *chan, struct iov_iter *head,
				 struct iov_iter *data, struct fblk_ring_ent *ent)
	__releases(&chan->queue->lock)
{
	struct fblk_queue *queue = chan->queue;
	u8 buf[sizeof(struct fuse_in_header) + FBLK_MAX_ARG] = { };
	struct fblk_cmd *cmd;
	struct request *rq;
	size_t head_len;
	u32 data_len;
	int ret = 0;

	cmd = list_first_entry(&queue->pending, struct fblk_cmd, entry);
	list_del_init(&cmd->entry);
	cmd->state = FBLK_CMD_SENDING;
	rq = cmd->rq;
	head_len = fblk_build_io(rq, cmd->unique, buf, &data_len);
	spin_unlock(&queue->lock);

	if (copy_to_iter(buf, head_len, head) != head_len)
		ret = -EFAULT;
	else if (data_len)
		ret = fblk_copy_data_out(rq, data);

	spin_lock(&queue->lock);
	if (chan->dev->dead) {
		cmd->state = FBLK_CMD_DONE;
		spin_unlock(&queue->lock);
		fblk_finish(rq, BLK_STS_IOERR);
		return ret ? ret : -ENODEV;
	}
	if (ret) {
		/* Not delivered: the next read gets it again. */
		cmd->state = FBLK_CMD_PENDING;
		list_add(&cmd->entry, &queue->pending);
	} else {
		cmd->state = FBLK_CMD_SENT;
		cmd->owner = chan;
		list_add_tail(&cmd->entry, &queue->sent);
		if (ent) {
			ent->unique = cmd->unique;
			/* A commit takes the entry without the lock. */
			smp_store_release(&ent->state, FBLK_ENT_USER);
		}
	}
	spin_unlock(&queue->lock);
	return ret ? ret : head_len + data_len;
}

static ssize_t fblk_send_small(struct iov_iter *to, const void *msg, size_t len)
{
	return copy_to_iter(msg, len, to) == len ? len : -EFAULT;
}

static ssize_t fblk_read_iter(struct kiocb *iocb, struct iov_iter *to)
{
	struct fblk_chan *chan = iocb->ki_filp->private_data;
	struct fblk_queue *queue;
	int ret;

	if (!chan)
		return -EINVAL;	/* not attached: a control fd */
	queue = chan->queue;
	if (iov_iter_count(to) < chan->dev->min_read)
		return -EINVAL;

	for (;;) {
		spin_lock(&queue->lock);
		if (chan->dev->dead || chan->retired) {
			struct fuse_in_header msg = { };

			if (chan->destroy_sent) {
				spin_unlock(&queue->lock);
				return -ENODEV;
			}
			chan->destroy_sent = true;
			fblk_header(&msg, FUSE_DESTROY,
				    fblk_next_unique(queue, FBLK_CONTROL_TAG),
				    sizeof(msg));
			spin_unlock(&queue->lock);
			return fblk_send_small(to, &msg, sizeof(msg));
		}
		if (chan->failed) {
			spin_unlock(&queue->lock);
			return -EPROTO;
		}
		if (!chan->init_sent) {
			struct {
				struct fuse_in_header h;
				struct fuse_init_in in;
			} msg = { };

			chan->init_sent = true;
			fblk_header(&msg.h, FUSE_INIT, chan->init_unique,
				    sizeof(msg));
			msg.in.major = FUSE_KERNEL_VERSION;
			msg.in.minor = FBLK_FUSE_MINOR;
			msg.in.flags = FUSE_ASYNC_READ | FUSE_BIG_WRITES |
				       FUSE_MAX_PAGES;
			spin_unlock(&queue->lock);
			ret = fblk_send_small(to, &msg, sizeof(msg));
			if (ret < 0) {
				spin_lock(&queue->lock);
				chan->init_sent = false;
				spin_unlock(&queue->lock);
			}
			return ret;
		}
		if (!list_empty(&chan->interrupts)) {
			struct {
				struct fuse_in_header h;
				struct fuse_interrupt_in in;
			} msg = { };
			struct fblk_cmd *cmd;

			cmd = list_first_entry(&chan->interrupts,
					       struct fblk_cmd, int_entry);
			list_del_init(&cmd->int_entry);
			fblk_header(&msg.h, FUSE_INTERRUPT,
				    cmd->unique | FBLK_INTERRUPT_BIT,
				    sizeof(msg));
			msg.in.unique = cmd->unique;
			spin_unlock(&queue->lock);
			return fblk_send_small(to, &msg, sizeof(msg));
		}
		if (chan == queue->active && !list_empty(&queue->pending))
			return fblk_send_request(chan, to, to, NULL);
		spin_unlock(&queue->lock);

		if ((iocb->ki_filp->f_flags & O_NONBLOCK) ||
		    (iocb->ki_flags & IOCB_NOWAIT))
			return -EAGAIN;
		ret = wait_event_interruptible(queue->waitq,
					       fblk_chan_has_work(chan));
		if (ret)
			return ret;
	}
}

/* Publishes the capacity once every queue has an initialised channel. */
static void fblk_maybe_go_live(struct fblk_dev *dev)
{
	mutex_lock(&dev->mutex);
	if (!dev->dead && !dev->sized &&
	    fblk_served_queues(dev, NULL) == fblk_nr_queues(dev)) {
		/*
		 * Partitions are read at the next first open (the attaching
		 * daemon's, or udev's on the uevent below): mark them before
		 * the capacity appears, so that no open sees one without the
		 * other.
		 */
		set_bit(GD_NEED_PART_SCAN, &dev->disk->state);
		set_capacity_and_notify(dev->disk,
					dev->params.size >> SECTOR_SHIFT);
		/* Only now may GET_INFO and sysfs say LIVE (fblk_state()). */
		smp_store_release(&dev->sized, true);
		/*
		 * set_capacity_and_notify() sends no uevent for a change from
		 * zero. Tell udev the disk has content now, as loop does once
		 * configured, so that it probes it (filesystem labels and
		 * UUIDs, the /dev/disk/by-* links).
		 */
		kobject_uevent(&disk_to_dev(dev->disk)->kobj, KOBJ_CHANGE);
	}
	mutex_unlock(&dev->mutex);
}

static ssize_t fblk_init_reply(struct fblk_chan *chan,
			       const struct fuse_out_header *oh,
			       struct iov_iter *from, size_t payload)
{
	struct fblk_queue *queue = chan->queue;
	struct fuse_init_out out = { };
	bool refused = false;
	LIST_HEAD(kick);

	if (payload) {
		if (oh->error || payload < FUSE_COMPAT_22_INIT_OUT_SIZE ||
		    payload > sizeof(out))
			return -EINVAL;
		if (copy_from_iter(&out, payload, from) != payload)
			return -EFAULT;
		if (out.major != FUSE_KERNEL_VERSION ||
		    out.minor < FBLK_MIN_FUSE_MINOR ||
		    out.max_write < chan->dev->params.max_io_bytes)
			return -EINVAL;
	} else if (oh->error) {
		refused = true;
	} else {
		return -EINVAL;
	}

	spin_lock(&queue->lock);
	if (!chan->init_sent || chan->ready || chan->failed) {
		spin_unlock(&queue->lock);
		return -ENOENT;
	}
	/*
	 * A newer channel answered INIT first: this takeover lost the race
	 * and must not take the queue back from the winner.
	 */
	if (chan->retired) {
		spin_unlock(&queue->lock);
		return -ESTALE;
	}
	if (refused) {
		chan->failed = true;
	} else {
		struct fblk_chan *older;

		chan->ready = true;
		/*
		 * The newest initialised channel takes over the queue: every
		 * channel attached before this one is retired, none after it
		 * (chans is oldest first), so of two takeovers racing, the
		 * later attach wins whichever answers INIT first.
		 */
		list_for_each_entry(older, &queue->chans, entry) {
			if (older == chan)
				break;
			older->retired = true;
			fblk_ring_take_idle(older, &kick, UINT_MAX);
		}
		queue->active = chan;
		queue->orphaned = false;
	}
	spin_unlock(&queue->lock);
	fblk_ring_kick(&kick);
	wake_up_all(&queue->waitq);
	if (!refused)
		fblk_maybe_go_live(chan->dev);
	return 0;
}

/* Checks that a successful reply carries what @rq needs. */
static bool fblk_reply_fits(struct request *rq, size_t payload)
{
	switch (req_op(rq)) {
	case REQ_OP_READ:	/* no data: the range reads as zeros */
		return payload == blk_rq_bytes(rq) || payload == 0;
	case REQ_OP_WRITE:
		return payload == sizeof(struct fuse_write_out);
	default:
		return payload == 0;
	}
}

/*
 * Takes the reply @oh (with @payload bytes after it) to a request of @chan:
 * checks it against the request, copies what it carries (fuse_write_out
 * from @args, READ data from @data) and completes the request. On an error
 * the request stays with the daemon, except for ENOENT: no such request.
 */
static int fblk_take_reply(struct fblk_chan *chan,
			   const struct fuse_out_header *oh, size_t payload,
			   struct iov_iter *args, struct iov_iter *data)
{
	struct fblk_queue *queue = chan->queue;
	struct fblk_dev *dev = chan->dev;
	struct fblk_cmd *cmd;
	struct request *rq;
	u32 tag = (u32)oh->unique >> 1;
	int ret = 0;

	if (tag >= dev->params.queue_depth)
		return -ENOENT;

	spin_lock(&queue->lock);
	if (dev->dead) {
		spin_unlock(&queue->lock);
		return -ENODEV;
	}
	/* Only a SENT record's request is known to be alive. */
	cmd = &queue->cmds[tag];
	if (cmd->state != FBLK_CMD_SENT || cmd->unique != oh->unique ||
	    cmd->owner != chan) {
		spin_unlock(&queue->lock);
		return -ENOENT;
	}
	rq = cmd->rq;
	if ((!oh->error && !fblk_reply_fits(rq, payload)) ||
	    (oh->error && payload)) {
		spin_unlock(&queue->lock);
		return -EINVAL;
	}
	cmd->state = FBLK_CMD_RECEIVING;
	list_del_init(&cmd->entry);
	list_del_init(&cmd->int_entry);
	spin_unlock(&queue->lock);

	if (!oh->error && req_op(rq) == REQ_OP_READ && !payload) {
		fblk_zero_data(rq);
	} else if (!oh->error && req_op(rq) == REQ_OP_READ) {
		/* A gathered source may fall short of what the header says. */
		ret = iov_iter_count(data) < payload ? -EINVAL :
			fblk_copy_data_in(rq, data);
	} else if (!oh->error && req_op(rq) == REQ_OP_WRITE) {
		struct fuse_write_out out;

		if (copy_from_iter(&out, sizeof(out), args) != sizeof(out))
			ret = -EFAULT;
		else if (out.size != blk_rq_bytes(rq))
			ret = -EINVAL;
	}

	if (!ret) {
		/*
		 * RECEIVING is ours alone (the timeout handler only re-arms it,
		 * destroy and release never see it on a list): no lock to end it.
		 */
		WRITE_ONCE(cmd->state, FBLK_CMD_DONE);
		fblk_finish(rq, oh->error ? errno_to_blk_status(oh->error) :
					    BLK_STS_OK);
		return 0;
	}

	spin_lock(&queue->lock);
	if (!dev->dead) {
		/* Refused: the request stays with the daemon. */
		cmd->state = FBLK_CMD_SENT;
		list_add_tail(&cmd->entry, &queue->sent);
		spin_unlock(&queue->lock);
		return ret;
	}
	cmd->state = FBLK_CMD_DONE;
	spin_unlock(&queue->lock);
	fblk_finish(rq, BLK_STS_IOERR);
	return ret;
}

static bool fblk_errno_ok(s32 error)
{
	return error <= 0 && error >= -FBLK_MAX_ERRNO;
}

static ssize_t fblk_write_iter(struct kiocb *iocb, struct iov_iter *from)
{
	struct fblk_chan *chan = iocb->ki_filp->private_data;
	size_t count = iov_iter_count(from);
	struct fuse_out_header oh;
	int ret;

	if (!chan)
		return -EINVAL;
	if (count < sizeof(oh))
		return -EINVAL;
	if (copy_from_iter(&oh, sizeof(oh), from) != sizeof(oh))
		return -EFAULT;
	if (oh.len != count || !fblk_errno_ok(oh.error))
		return -EINVAL;

	/* Answers to FUSE_INTERRUPT carry nothing we act on. */
	if (oh.unique & FBLK_INTERRUPT_BIT)
		return count;
	if (READ_ONCE(chan->dev->dead))
		return -ENODEV;
	if (oh.unique == chan->init_unique)
		ret = fblk_init_reply(chan, &oh, from, count - sizeof(oh));
	else
		ret = fblk_take_reply(chan, &oh, count - sizeof(oh), from, from);
	return ret ? ret : count;
}

/* ---- io_uring channels ---- */

#if FBLK_URING

static struct fblk_ring_pdu *fblk_ring_pdu(struct io_uring_cmd *ucmd)
{
	return io_uring_cmd_to_pdu(ucmd, struct fblk_ring_pdu);
}

/* Whether an entry of @chan has something to complete with (lock held). */
static bool fblk_ring_has_work(struct fblk_chan *chan)
{
	struct fblk_queue *queue = chan->queue;

	lockdep_assert_held(&queue->lock);
	return chan->dev->dead || chan->retired ||
	       (chan == queue->active && !list_empty(&queue->pending));
}

/* Unregisters a KICKED entry whose command ends now. */
static void fblk_ring_free_ent(struct fblk_ring_ent *ent)
{
	struct fblk_queue *queue = ent->chan->queue;

	spin_lock(&queue->lock);
	WRITE_ONCE(ent->state, FBLK_ENT_FREE);
	ent->ucmd = NULL;
	spin_unlock(&queue->lock);
}

/*
 * Copies the next request into a KICKED entry (ring task context), with
 * the queue lock held, which it drops. With nothing to
 * deliver, the entry, whose command is held (ent->ucmd), goes IDLE under
 * the same lock. Returns 0 (the entry is USER now), -EIOCBQUEUED (IDLE),
 * or the error that ends the entry's command.
 */
static int fblk_ring_deliver_locked(struct fblk_ring_ent *ent)
	__releases(&ent->chan->queue->lock)
{
	struct fblk_chan *chan = ent->chan;
	struct fblk_queue *queue = chan->queue;
	struct iov_iter head, data;
	ssize_t ret;

	lockdep_assert_held(&queue->lock);
	if (chan->dev->dead || chan->retired) {
		spin_unlock(&queue->lock);
		return -ENODEV;
	}
	if (chan != queue->active || list_empty(&queue->pending)) {
		/* Work added later kicks an idle entry: this one. */
		WRITE_ONCE(ent->state, FBLK_ENT_IDLE);
		list_add(&ent->entry, &chan->idle_ents);
		spin_unlock(&queue->lock);
		return -EIOCBQUEUED;
	}
	if (import_ubuf(ITER_DEST, ent->header, FUSE_BLK_URING_HEADER_SIZE,
			&head) ||
	    import_ubuf(ITER_DEST, ent->payload, chan->dev->params.max_io_bytes,
			&data)) {
		spin_unlock(&queue->lock);
		return -EFAULT;
	}
	ret = fblk_send_request(chan, &head, &data, ent);
	return ret < 0 ? ret : 0;
}

/* fblk_ring_deliver_locked(), from the entry's task work if @from_task_work. */
static int fblk_ring_deliver(struct fblk_ring_ent *ent, bool from_task_work)
{
	struct fblk_chan *chan = ent->chan;

	spin_lock(&chan->queue->lock);
	/* This task work serves what is pending now: later requests kick. */
	if (from_task_work)
		chan->ring_kicked = false;
	return fblk_ring_deliver_locked(ent);
}

/* The io_uring instance a command was issued on. */
static struct io_ring_ctx *fblk_ring_ctx(struct io_uring_cmd *ucmd)
{
	return cmd_to_io_kiocb(ucmd)->ctx;
}

/*
 * Serves what else is pending with more idle entries of @chan, from a task
 * work on the ring @ctx that holds a command of @chan's file (so @chan
 * stays): a burst of requests costs queue_rq one task work instead of one
 * each. Only entries held by this task on this ring qualify: their buffers
 * are in this task's memory, and @issue_flags (whether the ring's lock is
 * held) are right for completing them. Any other entry is kicked to its
 * own task work, which then does the same.
 */
static void fblk_ring_drain(struct fblk_chan *chan, struct io_ring_ctx *ctx,
			    unsigned int issue_flags)
{
	struct fblk_queue *queue = chan->queue;
	struct fblk_ring_ent *ent;
	struct io_uring_cmd *ucmd;
	LIST_HEAD(kick);
	int ret;

	for (;;) {
		spin_lock(&queue->lock);
		ent = list_first_entry_or_null(&chan->idle_ents,
					       struct fblk_ring_ent, entry);
		if (!ent || !fblk_ring_has_work(chan)) {
			spin_unlock(&queue->lock);
			return;
		}
		if (ent->task != current || fblk_ring_ctx(ent->ucmd) != ctx) {
			fblk_ring_take_idle(chan, &kick, 1);
			spin_unlock(&queue->lock);
			fblk_ring_kick(&kick);
			return;
		}
		WRITE_ONCE(ent->state, FBLK_ENT_KICKED);
		list_del_init(&ent->entry);
		ucmd = ent->ucmd;
		ret = fblk_ring_deliver_locked(ent);
		if (ret == -EIOCBQUEUED)	/* IDLE again: nothing left */
			return;
		if (ret)
			fblk_ring_free_ent(ent);
		fblk_uring_cmd_done(ucmd, ret, issue_flags);
		if (ret)
			return;
	}
}

/*
 * Task work of a KICKED entry: deliver, end, or go back to waiting. Having
 * taken a request, it serves the rest of the burst before completing its
 * own command, which keeps the channel's file open meanwhile.
 */
static void fblk_ring_tw(struct io_uring_cmd *ucmd, unsigned int issue_flags)
{
	struct fblk_ring_ent *ent = fblk_ring_pdu(ucmd)->ent;
	struct fblk_chan *chan = ent->chan;
	int ret;

	if (issue_flags & FBLK_TW_CANCEL) {
		spin_lock(&chan->queue->lock);
		chan->ring_kicked = false;
		spin_unlock(&chan->queue->lock);
		ret = -ECANCELED;
	} else {
		ret = fblk_ring_deliver(ent, true);
	}
	if (ret == -EIOCBQUEUED)
		return;
	if (ret)
		fblk_ring_free_ent(ent);
	else
		fblk_ring_drain(chan, fblk_ring_ctx(ucmd), issue_flags);
	fblk_uring_cmd_done(ucmd, ret, issue_flags);
}

/* The ring is going away: completes the command if its entry waits. */
static void fblk_ring_cancel(struct io_uring_cmd *ucmd, unsigned int issue_flags)
{
	struct fblk_ring_ent *ent = fblk_ring_pdu(ucmd)->ent;
	struct fblk_queue *queue = ent->chan->queue;
	bool idle;

	spin_lock(&queue->lock);
	idle = ent->state == FBLK_ENT_IDLE && ent->ucmd == ucmd;
	if (idle) {
		list_del_init(&ent->entry);
		WRITE_ONCE(ent->state, FBLK_ENT_FREE);
		ent->ucmd = NULL;
	}
	spin_unlock(&queue->lock);
	/* A KICKED one completes from its task work. */
	if (idle)
		fblk_uring_cmd_done(ucmd, -ECANCELED, issue_flags);
}

/* FETCH: registers a FREE entry's buffers; the entry is KICKED after. */
static int fblk_ring_register(struct fblk_ring_ent *ent,
			      const struct fblk_ring_pdu *pdu)
{
	struct fblk_chan *chan = ent->chan;
	size_t max_io = chan->dev->params.max_io_bytes;
	struct iovec iov[2];
	int ret;

	if (pdu->len)	/* sqe->len: reserved */
		return -EINVAL;
	if (copy_from_user(iov, u64_to_user_ptr(pdu->addr), sizeof(iov)))
		return -EFAULT;
	if (iov[0].iov_len < FUSE_BLK_URING_HEADER_SIZE ||
	    iov[1].iov_len < max_io)
		return -EINVAL;
	if (!access_ok(iov[0].iov_base, FUSE_BLK_URING_HEADER_SIZE) ||
	    !access_ok(iov[1].iov_base, max_io))
		return -EFAULT;

	spin_lock(&chan->queue->lock);
	if (ent->state != FBLK_ENT_FREE) {
		ret = -EBUSY;
	} else if (!chan->ready) {
		ret = -EPROTO;
	} else {
		WRITE_ONCE(ent->state, FBLK_ENT_KICKED);
		ent->header = iov[0].iov_base;
		ent->payload = iov[1].iov_base;
		ret = 0;
	}
	spin_unlock(&chan->queue->lock);
	return ret;
}

/*
 * Copies in and takes the reply held in a KICKED entry's buffers. Its READ
 * data is in the payload buffer, or where the commit @pdu says: at
 * data_addr, or gathered from the data_segs iovecs at data_addr.
 */
static int fblk_ring_take_reply(struct fblk_ring_ent *ent,
				const struct fblk_ring_pdu *pdu)
{
	size_t max_io = ent->chan->dev->params.max_io_bytes;
	struct iovec iovstack[UIO_FASTIOV], *iov = NULL;
	struct fuse_out_header oh;
	struct iov_iter args, data;
	void __user *src;
	size_t len;
	ssize_t ret;

	if (copy_from_user(&oh, ent->header, sizeof(oh)))
		return -EFAULT;
	if (oh.unique != ent->unique || oh.len < sizeof(oh) ||
	    !fblk_errno_ok(oh.error))
		return -EINVAL;
	if (import_ubuf(ITER_SOURCE, ent->header + sizeof(oh),
			FUSE_BLK_URING_HEADER_SIZE - sizeof(oh), &args))
		return -EFAULT;
	/* Only what the reply says it carries must be readable at the source. */
	len = min_t(size_t, oh.len - sizeof(oh), max_io);
	if (pdu->flags & FUSE_BLK_URING_F_DATA_IOVEC) {
		/* Leaves @iov NULL, or an array to free, whatever it returns. */
		iov = iovstack;
		ret = import_iovec(ITER_SOURCE, u64_to_user_ptr(pdu->addr),
				   pdu->len, UIO_FASTIOV, &iov, &data);
		if (ret < 0)
			return ret;
		iov_iter_truncate(&data, len);
	} else {
		src = pdu->flags & FUSE_BLK_URING_F_DATA_ADDR ?
			u64_to_user_ptr(pdu->addr) : ent->payload;
		if (import_ubuf(ITER_SOURCE, src, len, &data))
			return -EFAULT;
	}
	ret = fblk_take_reply(ent->chan, &oh, oh.len - sizeof(oh), &args,
			      &data);
	kfree(iov);
	return ret;
}

/* COMMIT_AND_FETCH: takes the reply of a USER entry, which is KICKED after. */
static int fblk_ring_commit(struct fblk_ring_ent *ent,
			    const struct fblk_ring_pdu *pdu)
{
	enum fblk_ent_state user = FBLK_ENT_USER;
	int ret;

	/*
	 * Only a commit leaves USER, and only the one that moved the entry
	 * there enters it: of two commits of one entry (two rings sharing
	 * the channel), one wins, without the queue lock.
	 */
	if (!try_cmpxchg(&ent->state, &user, FBLK_ENT_KICKED))
		return -EINVAL;

	ret = fblk_ring_take_reply(ent, pdu);
	if (ret == -ENOENT)	/* the request is gone: fetch all the same */
		ret = 0;
	if (ret == -EINVAL || ret == -EFAULT || ret == -ENOMEM) {
		/* Refused: the entry keeps its request. */
		smp_store_release(&ent->state, FBLK_ENT_USER);
	} else if (ret) {
		fblk_ring_free_ent(ent);
	}
	return ret;
}

/* Runs a FETCH or COMMIT_AND_FETCH in the task of its ring. */
static int fblk_ring_issue(struct io_uring_cmd *ucmd, unsigned int issue_flags)
{
	struct fblk_ring_pdu *pdu = fblk_ring_pdu(ucmd);
	struct fblk_ring_ent *ent = pdu->ent;
	int ret;

	if (pdu->op == FUSE_BLK_URING_FETCH)
		ret = fblk_ring_register(ent, pdu);
	else
		ret = fblk_ring_commit(ent, pdu);
	if (ret)
		return ret;

	/*
	 * The entry is KICKED and ours: a request waiting goes straight in,
	 * else the command is held until there is work for it. Nothing can
	 * complete it before it is marked cancelable: kicks run as task work
	 * of this task, and cancellation holds the ring's lock, as we do.
	 */
	ent->ucmd = ucmd;
	ent->task = current;
	ret = fblk_ring_deliver(ent, false);
	if (ret == -EIOCBQUEUED)
		io_uring_cmd_mark_cancelable(ucmd, issue_flags);
	else if (ret)
		fblk_ring_free_ent(ent);
	return ret;
}

FBLK_RING_TW(fblk_ring_issue_tw)
{
	int ret = -ECANCELED;

	if (!(issue_flags & FBLK_TW_CANCEL))
		ret = fblk_ring_issue(ucmd, issue_flags);
	if (ret != -EIOCBQUEUED)
		fblk_uring_cmd_done(ucmd, ret, issue_flags);
}

/* The channel's entries, allocated at its first io_uring command. */
static struct fblk_ring_ent *fblk_ring_ents(struct fblk_chan *chan)
{
	unsigned int depth = chan->dev->params.queue_depth;
	struct fblk_ring_ent *ents;
	unsigned int i;

	ents = READ_ONCE(chan->ents);
	if (ents)
		return ents;
	ents = kcalloc(depth, sizeof(*ents), GFP_KERNEL);
	if (!ents)
		return NULL;
	for (i = 0; i < depth; i++) {
		INIT_LIST_HEAD(&ents[i].entry);
		ents[i].chan = chan;
	}
	spin_lock(&chan->queue->lock);
	if (chan->ents) {
		kfree(ents);
		ents = chan->ents;
	} else {
		WRITE_ONCE(chan->ents, ents);
	}
	spin_unlock(&chan->queue->lock);
	return ents;
}

static int fblk_uring_cmd(struct io_uring_cmd *ucmd, unsigned int issue_flags)
{
	struct fblk_chan *chan = ucmd->file->private_data;
	struct fblk_ring_pdu *pdu = fblk_ring_pdu(ucmd);
	const struct fuse_blk_uring_cmd *arg;
	struct fblk_ring_ent *ents;
	u32 data_segs;
	u64 data_addr;
	u16 entry, flags;

	if (issue_flags & IO_URING_F_CANCEL) {
		fblk_ring_cancel(ucmd, issue_flags);
		return 0;
	}
	if (!chan)
		return -EINVAL;	/* not attached: a control fd */
	/* The iovec layout of 32-bit tasks is not supported. */
	if (issue_flags & IO_URING_F_COMPAT)
		return -EOPNOTSUPP;
	if (ucmd->cmd_op != FUSE_BLK_URING_FETCH &&
	    ucmd->cmd_op != FUSE_BLK_URING_COMMIT_AND_FETCH)
		return -EINVAL;
	arg = fblk_uring_sqe_cmd(ucmd->sqe, struct fuse_blk_uring_cmd);
	entry = READ_ONCE(arg->entry);
	flags = READ_ONCE(arg->flags);
	data_segs = READ_ONCE(arg->data_segs);
	data_addr = READ_ONCE(arg->data_addr);
	if (entry >= chan->dev->params.queue_depth)
		return -EINVAL;
	/*
	 * Only a commit names where its READ data is, one way at most, never
	 * at NULL, and an iovec array of 1..UIO_MAXIOV entries.
	 */
	if (flags & ~FBLK_URING_DATA_FLAGS ||
	    (flags && ucmd->cmd_op != FUSE_BLK_URING_COMMIT_AND_FETCH) ||
	    flags == FBLK_URING_DATA_FLAGS || !flags != !data_addr ||
	    !(flags & FUSE_BLK_URING_F_DATA_IOVEC) != !data_segs ||
	    data_segs > UIO_MAXIOV)
		return -EINVAL;
	ents = fblk_ring_ents(chan);
	if (!ents)
		return -ENOMEM;
	pdu->ent = &ents[entry];
	pdu->op = ucmd->cmd_op;
	pdu->flags = flags;
	if (pdu->op == FUSE_BLK_URING_FETCH) {
		pdu->addr = READ_ONCE(ucmd->sqe->addr);
		pdu->len = READ_ONCE(ucmd->sqe->len);
	} else {
		pdu->addr = data_addr;
		pdu->len = data_segs;
	}

	/* From io-wq: go to the ring's task, where entries are handled. */
	if (issue_flags & IO_URING_F_UNLOCKED) {
		fblk_complete_in_task(ucmd, fblk_ring_issue_tw);
		return -EIOCBQUEUED;
	}
	return fblk_ring_issue(ucmd, issue_flags);
}
#else
static int fblk_uring_cmd(struct io_uring_cmd *ucmd, unsigned int issue_flags)
{
	return -EOPNOTSUPP;
}
#endif /* FBLK_URING */

static __poll_t fblk_poll(struct file *file, poll_table *wait)
{
	struct fblk_chan *chan = file->private_data;
	struct fblk_queue *queue;
	__poll_t mask = EPOLLOUT | EPOLLWRNORM;

	if (!chan)
		return EPOLLERR;
	queue = chan->queue;
	poll_wait(file, &queue->waitq, wait);
	spin_lock(&queue->lock);
	if ((chan->dev->dead || chan->retired) && chan->destroy_sent)
		mask |= EPOLLERR | EPOLLHUP;
	else if (fblk_chan_has_work(chan))
		mask |= EPOLLIN | EPOLLRDNORM;
	spin_unlock(&queue->lock);
	return mask;
}

static int fblk_release(struct inode *inode, struct file *file)
{
	struct fblk_chan *chan = file->private_data;
	struct fblk_cmd *cmd, *next;
	struct fblk_queue *queue;
	struct fblk_dev *dev;
	LIST_HEAD(failed);
	LIST_HEAD(kick);
	bool requeue;

	if (!chan)
		return 0;
	queue = chan->queue;
	dev = chan->dev;
	spin_lock(&queue->lock);
	list_del(&chan->entry);
	if (queue->active == chan)
		queue->active = NULL;
	if (list_empty(&queue->chans) && !dev->dead) {
		queue->orphaned = true;
		queue->orphaned_at = jiffies;
		if (fblk_has(dev, FUSE_BLK_F_RECOVERY))
			mod_delayed_work(system_wq, &dev->recovery_work,
				msecs_to_jiffies(dev->params.recovery_timeout_ms) + 1);
	}
	requeue = !dev->dead && !fblk_has(dev, FUSE_BLK_F_FAIL_INFLIGHT) &&
		  (!list_empty(&queue->chans) || fblk_has(dev, FUSE_BLK_F_RECOVERY));
	list_for_each_entry_safe(cmd, next, &queue->sent, entry) {
		if (cmd->owner != chan)
			continue;
		list_del_init(&cmd->int_entry);
		cmd->owner = NULL;
		if (requeue) {
			/* Reissued, first in line, to the next channel. */
			cmd->state = FBLK_CMD_PENDING;
			cmd->interrupted = false;
			list_move(&cmd->entry, &queue->pending);
		} else {
			cmd->state = FBLK_CMD_DONE;
			list_move_tail(&cmd->entry, &failed);
		}
	}
	/* Without recovery, or with a zero timeout, nothing waits. */
	if (fblk_recovery_over(queue))
		fblk_take_all(queue, &queue->pending, &failed);
	else if (queue->active)
		fblk_ring_take_idle(queue->active, &kick, UINT_MAX);
	spin_unlock(&queue->lock);
	fblk_finish_all(&failed, BLK_STS_IOERR);
	fblk_ring_kick(&kick);
	wake_up_all(&queue->waitq);
	fblk_dev_put(dev);
	/* Every io_uring command pinned the file: none is held now. */
	kfree(chan->ents);
	kfree(chan);
	return 0;
}

static int fblk_open(struct inode *inode, struct file *file)
{
	/* misc_open() left the miscdevice here; NULL marks a control fd. */
	file->private_data = NULL;
	/*
	 * Reads honour IOCB_NOWAIT (EAGAIN rather than waiting for a
	 * request) and writes never wait: io_uring may issue both inline and
	 * poll the channel instead of parking a worker thread in read().
	 */
	file->f_mode |= FMODE_NOWAIT;
	return nonseekable_open(inode, file);
}

static const struct file_operations fblk_ctl_fops = {
	.owner		= THIS_MODULE,
	.open		= fblk_open,
	.read_iter	= fblk_read_iter,
	.write_iter	= fblk_write_iter,
	.poll		= fblk_poll,
	.uring_cmd	= fblk_uring_cmd,
	.release	= fblk_release,
	.unlocked_ioctl	= fblk_ioctl,
	.compat_ioctl	= compat_ptr_ioctl,
};

static struct miscdevice fblk_misc = {
	.minor		= FUSE_BLK_MINOR,
	.name		= "fuse-blk",
	.fops		= &fblk_ctl_fops,
	.mode		= 0600,
};

static int __init fblk_init(void)
{
	int ret;

	ret = register_blkdev(0, "fuseblk");
	if (ret < 0)
		return ret;
	fblk_major = ret;
	ret = misc_register(&fblk_misc);
	if (ret == -EBUSY) {
		/*
		 * Another local driver has the minor: serve on a dynamic one.
		 * The node still appears (devtmpfs, udev); only loading the
		 * module by opening it is lost.
		 */
		pr_warn("misc minor %d is taken; /dev/fuse-blk gets a dynamic one\n",
			FUSE_BLK_MINOR);
		fblk_misc.minor = MISC_DYNAMIC_MINOR;
		ret = misc_register(&fblk_misc);
	}
	if (ret) {
		unregister_blkdev(fblk_major, "fuseblk");
		return ret;
	}
	return 0;
}

static void __exit fblk_exit(void)
{
	/* Every device pins the module: none exist by now. */
	misc_deregister(&fblk_misc);
	unregister_blkdev(fblk_major, "fuseblk");
	idr_destroy(&fblk_idr);
}

module_init(fblk_init);
module_exit(fblk_exit);

MODULE_DESCRIPTION("Block devices served from userspace over the FUSE protocol");
MODULE_AUTHOR("The fuse-blk developers");
MODULE_LICENSE("GPL");
/* The first open of /dev/fuse-blk loads the module (kmod's static nodes). */
MODULE_ALIAS_MISCDEV(FUSE_BLK_MINOR);
MODULE_ALIAS("devname:fuse-blk");
