/*
 * Compiled in front of tests/dm-user/daemon.c (cc -include) for
 * bench/dm-user's reliability part: with DMU_STORE=PATH in the
 * environment, the daemon's memory store is PATH mapped shared (a file on
 * tmpfs), so a daemon that replaces another, or restarts after kill -9,
 * serves the same data and fio's verification can judge the path, not the
 * store. Without DMU_STORE the daemon is unchanged (calloc).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

static void *bench_shared_store(size_t count, size_t size)
{
	const char *path = getenv("DMU_STORE");
	void *store;
	int fd;

	if (!path)
		return calloc(count, size);
	fd = open(path, O_RDWR | O_CREAT, 0600);
	if (fd < 0)
		return NULL;
	/* The same size again keeps what an earlier daemon stored. */
	if (ftruncate(fd, (off_t)(count * size)) != 0) {
		close(fd);
		return NULL;
	}
	store = mmap(NULL, count * size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	close(fd);
	return store == MAP_FAILED ? NULL : store;
}
/* daemon.c's only calloc is its store's. */
#define calloc(count, size) bench_shared_store(count, size)
