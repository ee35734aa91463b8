// SPDX-License-Identifier: GPL-2.0
/*
 * A QEMU TCG plugin for bench/profile: counts the guest instructions each
 * translation block executes, so that the time of a workload in the
 * emulated guest (where perf has no PMU and samples only the idle loop)
 * can be attributed to kernel and user functions. Under software emulation
 * time follows executed instructions closely enough to compare two paths.
 *
 * Control is through files in the directory given as dir=DIR (shared with
 * the guest): DIR/reset zeroes the counters; DIR/dump, holding a file
 * name, writes "vaddr insns count" lines of every block that ran since to
 * DIR/<name>. Each is removed once done.
 *
 * Only the plugin ABI's functions are declared here, as QEMU documents
 * them (include/qemu/qemu-plugin.h, API version 2 and later).
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef uint64_t qemu_plugin_id_t;
struct qemu_plugin_tb;
typedef void (*qemu_plugin_vcpu_udata_cb_t)(unsigned int vcpu_index,
					    void *userdata);
typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t id,
					       struct qemu_plugin_tb *tb);
enum qemu_plugin_cb_flags { QEMU_PLUGIN_CB_NO_REGS };

void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id,
					   qemu_plugin_vcpu_tb_trans_cb_t cb);
void qemu_plugin_register_vcpu_tb_exec_cb(struct qemu_plugin_tb *tb,
					  qemu_plugin_vcpu_udata_cb_t cb,
					  enum qemu_plugin_cb_flags flags,
					  void *userdata);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
uint64_t qemu_plugin_tb_vaddr(const struct qemu_plugin_tb *tb);

__attribute__((visibility("default"))) int qemu_plugin_version = 2;

/* One translated block: where it starts, its length, how often it ran. */
struct block {
	uint64_t vaddr;
	uint64_t insns;
	uint64_t count;
};

/* Open addressing; blocks are never removed. */
#define NR_BLOCKS (1u << 22)
static struct block *blocks;
static unsigned int nr_used;
static pthread_mutex_t blocks_lock = PTHREAD_MUTEX_INITIALIZER;
static char dir[4096] = ".";

static void block_ran(unsigned int vcpu, void *userdata)
{
	struct block *b = userdata;

	__atomic_add_fetch(&b->count, 1, __ATOMIC_RELAXED);
}

/* The block of @vaddr and @insns; NULL once the table is nearly full. */
static struct block *find_block(uint64_t vaddr, uint64_t insns)
{
	uint64_t hash = (vaddr * 0x9E3779B97F4A7C15ull) ^ insns;
	unsigned int i;

	for (i = 0; i < NR_BLOCKS; i++) {
		struct block *b = &blocks[(hash + i) & (NR_BLOCKS - 1)];

		if (b->insns == 0) {
			if (nr_used >= NR_BLOCKS / 2)
				return NULL;
			nr_used++;
			b->vaddr = vaddr;
			b->insns = insns;
			return b;
		}
		if (b->vaddr == vaddr && b->insns == insns)
			return b;
	}
	return NULL;
}

static void block_translated(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
	struct block *b;

	pthread_mutex_lock(&blocks_lock);
	b = find_block(qemu_plugin_tb_vaddr(tb), qemu_plugin_tb_n_insns(tb));
	pthread_mutex_unlock(&blocks_lock);
	if (b)
		qemu_plugin_register_vcpu_tb_exec_cb(tb, block_ran,
						     QEMU_PLUGIN_CB_NO_REGS, b);
}

static void dump(const char *name)
{
	char path[8192];
	unsigned int i;
	FILE *out;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	out = fopen(path, "w");
	if (!out)
		return;
	for (i = 0; i < NR_BLOCKS; i++) {
		uint64_t count = __atomic_exchange_n(&blocks[i].count, 0,
						     __ATOMIC_RELAXED);

		if (count)
			fprintf(out, "%lx %lu %lu\n",
				(unsigned long)blocks[i].vaddr,
				(unsigned long)blocks[i].insns,
				(unsigned long)count);
	}
	fclose(out);
}

static void *watch(void *arg)
{
	char reset[8192], request[8192], name[256];

	snprintf(reset, sizeof(reset), "%s/reset", dir);
	snprintf(request, sizeof(request), "%s/dump", dir);
	for (;;) {
		FILE *f;

		usleep(20000);
		if (access(reset, F_OK) == 0) {
			unsigned int i;

			for (i = 0; i < NR_BLOCKS; i++)
				__atomic_store_n(&blocks[i].count, 0,
						 __ATOMIC_RELAXED);
			unlink(reset);
		}
		f = fopen(request, "r");
		if (!f)
			continue;
		if (fgets(name, sizeof(name), f)) {
			name[strcspn(name, "\n/")] = 0;
			dump(name[0] ? name : "blocks.txt");
		}
		fclose(f);
		unlink(request);
	}
	return NULL;
}

__attribute__((visibility("default")))
int qemu_plugin_install(qemu_plugin_id_t id, const void *info, int argc,
			char **argv)
{
	pthread_t watcher;
	int i;

	for (i = 0; i < argc; i++)
		if (strncmp(argv[i], "dir=", 4) == 0)
			snprintf(dir, sizeof(dir), "%s", argv[i] + 4);
	blocks = calloc(NR_BLOCKS, sizeof(*blocks));
	if (!blocks)
		return -1;
	qemu_plugin_register_vcpu_tb_trans_cb(id, block_translated);
	return pthread_create(&watcher, NULL, watch, NULL) ? -1 : 0;
}
