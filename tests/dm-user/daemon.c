/*
 * A dm-user daemon for the tests, written against dm-user's ABI alone (see
 * Documentation/DM-USER.md): a memory store served on /dev/dm-user/NAME.
 * It knows nothing of fuse-blk; it would run the same on dm-user itself.
 *
 * Usage: daemon [-t THREADS] [-p PIECE] [-o] [-g] NODE SIZE
 *   -t THREADS  descriptors, each opened and served by a thread of its own
 *               (default 1)
 *   -p PIECE    read and write data in pieces of at most PIECE bytes
 *               (default 1000); headers are read in pieces of 7 bytes (or
 *               PIECE if smaller), an answer's header is written whole;
 *               from 4096 up, each message is read with one read(2) of a
 *               1 MiB buffer, which must end where the message ends
 *   -o          read up to four messages (the later ones with O_NONBLOCK,
 *               until EAGAIN) and answer them in reverse order
 *   -g          first check that garbage answers fail with EINVAL: an
 *               unknown seq, a short header, then (on the first message)
 *               a wrong answer type; then serve as usual
 *   SIZE        bytes, with an optional K, M or G suffix
 * Exits 0 when the target goes away (reads fail with ENOTBLK), 1 on any
 * other error, 2 when a garbage check fails.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum { T_READ = 0, T_WRITE = 1, T_FLUSH = 2, T_DISCARD = 3, T_WRITE_ZEROES = 6 };
enum { A_SUCCESS = 0, A_ERROR = 1, A_UNSUPPORTED = 2 };
#define HDR 40
#define SECTOR 512

struct msg {
	uint64_t seq, type, flags, sector, len;
	unsigned char *data; /* WRITE data read, or READ data to answer */
};

static unsigned char *store;
static uint64_t store_size;
static size_t piece = 1000;
/* Headers are read in pieces of this (or of PIECE if smaller). */
static size_t header_piece = 7;
static int out_of_order, garbage;
static const char *node;
static pthread_mutex_t store_lock = PTHREAD_MUTEX_INITIALIZER;

static void put64(unsigned char *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = v >> (8 * i);
}

static uint64_t get64(const unsigned char *p)
{
	uint64_t v = 0;
	for (int i = 7; i >= 0; i--)
		v = v << 8 | p[i];
	return v;
}

static void encode(unsigned char *h, uint64_t seq, uint64_t type, uint64_t flags,
		   uint64_t sector, uint64_t len)
{
	put64(h, seq);
	put64(h + 8, type);
	put64(h + 16, flags);
	put64(h + 24, sector);
	put64(h + 32, len);
}

/* Reads exactly n bytes in pieces: 1 with them, 0 on ENOTBLK (the target
 * is gone), -1 on EAGAIN before any byte (nonblocking), exits otherwise. */
static int read_all(int fd, unsigned char *buf, size_t n, size_t step)
{
	size_t got = 0;
	while (got < n) {
		size_t want = n - got < step ? n - got : step;
		ssize_t r = read(fd, buf + got, want);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0 && errno == ENOTBLK)
			return 0;
		if (r < 0 && errno == EAGAIN && got == 0)
			return -1;
		if (r <= 0) {
			fprintf(stderr, "daemon: read: %s\n", r ? strerror(errno) : "end of file");
			exit(1);
		}
		got += r;
	}
	return 1;
}

static void write_all(int fd, const unsigned char *buf, size_t n, size_t step)
{
	size_t done = 0;
	while (done < n) {
		size_t want = n - done < step ? n - done : step;
		ssize_t r = write(fd, buf + done, want);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0) {
			fprintf(stderr, "daemon: write: %s\n", strerror(errno));
			exit(1);
		}
		done += r;
	}
}

static int receive_whole(int fd, struct msg *m);

/* 1 with a message, 0 on ENOTBLK, -1 on EAGAIN. */
static int receive(int fd, struct msg *m)
{
	unsigned char h[HDR];
	int r;
	if (piece >= 4096)
		return receive_whole(fd, m);
	r = read_all(fd, h, HDR, header_piece < piece ? header_piece : piece);
	if (r <= 0)
		return r;
	m->seq = get64(h);
	m->type = get64(h + 8);
	m->flags = get64(h + 16);
	m->sector = get64(h + 24);
	m->len = get64(h + 32);
	m->data = NULL;
	if (m->len > (64u << 20)) {
		fprintf(stderr, "daemon: message of %llu bytes\n", (unsigned long long)m->len);
		exit(1);
	}
	if (m->type == T_WRITE) {
		m->data = malloc(m->len ? m->len : 1);
		/* The data follows at once: never EAGAIN in the middle. */
		if (read_all(fd, m->data, m->len, piece) != 1) {
			fprintf(stderr, "daemon: WRITE data missing\n");
			exit(1);
		}
	}
	return 1;
}

/* With large pieces, one read(2) for the whole message where the node
 * gives it so (a read never spans two messages, so it ends where this one
 * ends; the bridge returns header and data together, dm-user's target the
 * header first). */
static int receive_whole(int fd, struct msg *m)
{
	size_t cap = HDR + (1 << 20);
	unsigned char *buf = malloc(cap);
	ssize_t r;
	do
		r = read(fd, buf, cap);
	while (r < 0 && errno == EINTR);
	if (r < 0 && (errno == ENOTBLK || errno == EAGAIN)) {
		int gone = errno == ENOTBLK;
		free(buf);
		return gone ? 0 : -1;
	}
	if (r < HDR) {
		fprintf(stderr, "daemon: read of %zd bytes: %s\n", r, r < 0 ? strerror(errno) : "short");
		exit(1);
	}
	m->seq = get64(buf);
	m->type = get64(buf + 8);
	m->flags = get64(buf + 16);
	m->sector = get64(buf + 24);
	m->len = get64(buf + 32);
	m->data = NULL;
	if (m->type == T_WRITE) {
		size_t have = r;
		if (m->len > cap - HDR || have > HDR + m->len) {
			fprintf(stderr, "daemon: WRITE of %llu bytes came as %zd\n",
				(unsigned long long)m->len, r);
			exit(1);
		}
		/* The data may come in later reads: dm-user's own target
		 * returns the header alone, then the data. */
		while (have < HDR + m->len) {
			ssize_t n = read(fd, buf + have, HDR + m->len - have);
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0) {
				fprintf(stderr, "daemon: WRITE data: %s\n",
					n < 0 ? strerror(errno) : "end of file");
				exit(1);
			}
			have += n;
		}
		m->data = malloc(m->len ? m->len : 1);
		memcpy(m->data, buf + HDR, m->len);
	} else if (r != HDR) {
		fprintf(stderr, "daemon: a read spanned two messages (%zd bytes)\n", r);
		exit(1);
	}
	free(buf);
	return 1;
}

static int in_range(const struct msg *m)
{
	uint64_t off = m->sector * SECTOR;
	return off <= store_size && m->len <= store_size - off;
}

static void answer(int fd, struct msg *m)
{
	unsigned char h[HDR];
	uint64_t type = A_SUCCESS;
	unsigned char *data = NULL;
	uint64_t off = m->sector * SECTOR;

	switch (m->type) {
	case T_READ:
		if (!in_range(m)) {
			type = A_ERROR;
			break;
		}
		data = malloc(m->len ? m->len : 1);
		pthread_mutex_lock(&store_lock);
		memcpy(data, store + off, m->len);
		pthread_mutex_unlock(&store_lock);
		break;
	case T_WRITE:
		if (!in_range(m)) {
			type = A_ERROR;
			break;
		}
		pthread_mutex_lock(&store_lock);
		memcpy(store + off, m->data, m->len);
		pthread_mutex_unlock(&store_lock);
		break;
	case T_FLUSH:
		break;
	case T_DISCARD:
	case T_WRITE_ZEROES:
		if (!in_range(m)) {
			type = A_ERROR;
			break;
		}
		pthread_mutex_lock(&store_lock);
		memset(store + off, 0, m->len);
		pthread_mutex_unlock(&store_lock);
		break;
	default:
		type = A_UNSUPPORTED;
	}
	encode(h, m->seq, type, 0, m->sector, m->len);
	write_all(fd, h, HDR, HDR);
	if (data) {
		write_all(fd, data, m->len, piece);
		free(data);
	}
	free(m->data);
}

static void expect_einval(int fd, const unsigned char *buf, size_t n, const char *what)
{
	ssize_t r = write(fd, buf, n);
	if (r >= 0 || errno != EINVAL) {
		fprintf(stderr, "daemon: %s: write gave %zd (%s), not EINVAL\n", what, r,
			r < 0 ? strerror(errno) : "no error");
		exit(2);
	}
	fprintf(stderr, "daemon: %s: EINVAL\n", what);
}

static void *serve(void *arg)
{
	int fd = open(node, O_RDWR | O_CLOEXEC);
	int first = 1;
	(void)arg;
	if (fd < 0) {
		perror(node);
		exit(1);
	}
	if (garbage) {
		unsigned char h[HDR];
		encode(h, 0x7fffffffffffULL, A_SUCCESS, 0, 0, 0);
		expect_einval(fd, h, HDR, "unknown seq");
		expect_einval(fd, h, 20, "short header");
	}
	for (;;) {
		struct msg m[4];
		int n = 0, r;

		r = receive(fd, &m[0]);
		if (r == 0)
			break;
		n = 1;
		if (garbage && first) {
			unsigned char h[HDR];
			encode(h, m[0].seq, 7, 0, m[0].sector, m[0].len);
			expect_einval(fd, h, HDR, "wrong answer type");
			encode(h, m[0].seq + 1000000, A_SUCCESS, 0, 0, 0);
			expect_einval(fd, h, HDR, "unknown seq after a read");
		}
		first = 0;
		if (out_of_order) {
			int flags = fcntl(fd, F_GETFL);
			fcntl(fd, F_SETFL, flags | O_NONBLOCK);
			while (n < 4 && (r = receive(fd, &m[n])) == 1)
				n++;
			fcntl(fd, F_SETFL, flags);
			if (r == 0) {
				/* Gone while we held some: answering fails now. */
				break;
			}
		}
		while (n > 0)
			answer(fd, &m[--n]);
	}
	close(fd);
	return NULL;
}

static uint64_t parse_size(const char *s)
{
	char *end;
	uint64_t v = strtoull(s, &end, 10);
	switch (*end) {
	case 'G': v <<= 10; /* fall through */
	case 'M': v <<= 10; /* fall through */
	case 'K': v <<= 10; break;
	case 0: break;
	default: fprintf(stderr, "daemon: bad size %s\n", s); exit(1);
	}
	return v;
}

int main(int argc, char **argv)
{
	int threads = 1, opt;
	pthread_t tid[64];

	while ((opt = getopt(argc, argv, "t:p:og")) != -1) {
		switch (opt) {
		case 't': threads = atoi(optarg); break;
		case 'p': piece = strtoul(optarg, NULL, 10); break;
		case 'o': out_of_order = 1; break;
		case 'g': garbage = 1; break;
		default: return 1;
		}
	}
	if (optind + 2 != argc || threads < 1 || threads > 64 || piece < 1) {
		fprintf(stderr, "usage: daemon [-t THREADS] [-p PIECE] [-o] [-g] NODE SIZE\n");
		return 1;
	}
	node = argv[optind];
	store_size = parse_size(argv[optind + 1]);
	store = calloc(1, store_size);
	if (!store) {
		perror("store");
		return 1;
	}
	for (int i = 0; i < threads; i++)
		pthread_create(&tid[i], NULL, serve, NULL);
	for (int i = 0; i < threads; i++)
		pthread_join(tid[i], NULL);
	fprintf(stderr, "daemon: the target is gone\n");
	return 0;
}
