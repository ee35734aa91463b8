/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Kernel-version differences of fuse_blk, kept in one place.
 *
 * The driver is written against Linux 6.12. Older kernels differ in
 * ways that matter here:
 *  - before 6.11, queue features (write cache, FUA, rotational) were queue
 *    flags set after allocation instead of queue_limits.features;
 *  - before 6.9, blk_mq_alloc_disk() took no queue_limits;
 *  - 6.14 dropped BLK_MQ_F_SHOULD_MERGE (merging became the default).
 * A port to an older LTS kernel adds its variants here.
 */
#ifndef FUSE_BLK_COMPAT_H
#define FUSE_BLK_COMPAT_H

#include <linux/version.h>
#include <linux/blk-mq.h>

#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 12, 0)
#error "fuse_blk needs Linux 6.12 or later; see compat.h to port it"
#endif

#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 14, 0)
#define FBLK_TAG_SET_FLAGS	BLK_MQ_F_SHOULD_MERGE
#else
#define FBLK_TAG_SET_FLAGS	0
#endif

#endif /* FUSE_BLK_COMPAT_H */
