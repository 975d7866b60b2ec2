/*
 * memhog: the stateful, single-threaded workload of migrated's e2e tests.
 *
 * It touches a memory region whose cold part keeps a fixed content (its
 * checksum is computed once at start) and whose hot part is rewritten
 * continuously, counts every tick (about 1 ms), records the largest gap of
 * the wall clock (CLOCK_REALTIME) between two ticks, and writes a status
 * file of key=value lines atomically (write a temporary file, rename) about
 * every 20 ms. The largest gap is the downtime as the workload sees it: CRIU
 * restores into a time namespace that hides the frozen period from
 * CLOCK_MONOTONIC, not from CLOCK_REALTIME.
 *
 * Signals: SIGUSR1 recomputes the cold checksum and reports verify=ok|bad,
 * cold_sum_now and an incremented verify_count; SIGUSR2 resets max_gap_us.
 * The time spent verifying does not count as a gap.
 *
 * Options:
 *   --mem MIB         memory touched (default 64)
 *   --hot MIB         part of it rewritten continuously (default 0)
 *   --hot-period MS   time to rewrite the whole hot part once (default 1000)
 *   --compressible    text-like content instead of pseudo-random bytes
 *   --children N      fork N children that count too (a process tree)
 *   --listen PORT     listen on 0.0.0.0:PORT; answer each connection with
 *                     "counter=N\n" and close it
 *   --file PATH       keep PATH open (append) and add a line every second
 *   --pipe            a child streams sequence numbers to the parent through
 *                     a pipe; the parent checks none is lost or repeated
 *   --status PATH     status file (default: none)
 *   --tick-us US      tick length (default 1000)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define MIB (1024UL * 1024UL)
#define PAGE 4096UL
#define MAX_CHILDREN 64

static volatile sig_atomic_t want_verify, want_reset;

static void on_usr1(int sig) { (void)sig; want_verify = 1; }
static void on_usr2(int sig) { (void)sig; want_reset = 1; }

static uint64_t now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static uint64_t rng = 0x9e3779b97f4a7c15ULL;

static uint64_t next_rand(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

static const char *words[] = {
	"the ", "process ", "memory ", "page ", "migrate ", "host ", "checkpoint ",
	"restore ", "counter ", "network ", "socket ", "kernel ", "of ", "and ",
	"to ", "a ", "in ", "is ", "that ", "with ", "\n",
};

/* fill writes len bytes of pseudo-random or text-like content. */
static void fill(unsigned char *p, size_t len, int compressible)
{
	size_t i = 0;
	if (!compressible) {
		for (; i + 8 <= len; i += 8) {
			uint64_t v = next_rand();
			memcpy(p + i, &v, 8);
		}
		for (; i < len; i++)
			p[i] = (unsigned char)next_rand();
		return;
	}
	while (i < len) {
		const char *w = words[next_rand() % (sizeof(words) / sizeof(words[0]))];
		size_t n = strlen(w);
		if (n > len - i)
			n = len - i;
		memcpy(p + i, w, n);
		i += n;
	}
}

static uint64_t checksum(const unsigned char *p, size_t len)
{
	uint64_t h = 0xcbf29ce484222325ULL;
	size_t i = 0;
	for (; i + 8 <= len; i += 8) {
		uint64_t v;
		memcpy(&v, p + i, 8);
		h = (h ^ v) * 0x100000001b3ULL;
		h ^= h >> 29;
	}
	for (; i < len; i++)
		h = (h ^ p[i]) * 0x100000001b3ULL;
	return h;
}

static void usage(void)
{
	fprintf(stderr, "usage: memhog [--mem MIB] [--hot MIB] [--hot-period MS] [--compressible] "
			"[--children N] [--listen PORT] [--file PATH] [--pipe] [--status PATH] [--tick-us US]\n");
	exit(2);
}

static long num(const char *s)
{
	char *end;
	long v = strtol(s, &end, 10);
	if (*s == 0 || *end != 0 || v < 0)
		usage();
	return v;
}

static void sleep_us(long us)
{
	struct timespec ts = {.tv_sec = us / 1000000, .tv_nsec = (us % 1000000) * 1000};
	nanosleep(&ts, NULL);
}

int main(int argc, char **argv)
{
	long mem_mib = 64, hot_mib = 0, hot_period_ms = 1000, nchildren = 0, port = -1, tick_us = 1000;
	int compressible = 0, use_pipe = 0;
	const char *status = NULL, *file = NULL;

	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		int more = i + 1 < argc;
		if (!strcmp(a, "--mem") && more)
			mem_mib = num(argv[++i]);
		else if (!strcmp(a, "--hot") && more)
			hot_mib = num(argv[++i]);
		else if (!strcmp(a, "--hot-period") && more)
			hot_period_ms = num(argv[++i]);
		else if (!strcmp(a, "--compressible"))
			compressible = 1;
		else if (!strcmp(a, "--children") && more)
			nchildren = num(argv[++i]);
		else if (!strcmp(a, "--listen") && more)
			port = num(argv[++i]);
		else if (!strcmp(a, "--file") && more)
			file = argv[++i];
		else if (!strcmp(a, "--pipe"))
			use_pipe = 1;
		else if (!strcmp(a, "--status") && more)
			status = argv[++i];
		else if (!strcmp(a, "--tick-us") && more)
			tick_us = num(argv[++i]);
		else
			usage();
	}
	if (hot_mib > mem_mib || nchildren > MAX_CHILDREN || hot_period_ms == 0 || tick_us == 0 || port > 65535)
		usage();

	size_t mem = (size_t)mem_mib * MIB, hot = (size_t)hot_mib * MIB, cold = mem - hot;
	unsigned char *region = NULL;
	if (mem > 0) {
		region = mmap(NULL, mem, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (region == MAP_FAILED) {
			perror("memhog: mmap");
			return 1;
		}
		fill(region, mem, compressible);
	}
	unsigned char *hotp = region + cold;
	uint64_t cold_sum = checksum(region, cold), cold_sum_now = 0;

	/* Child counters live in a shared page: the parent reports them. */
	volatile uint64_t *shared = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (shared == MAP_FAILED) {
		perror("memhog: mmap shared");
		return 1;
	}
	pid_t children[MAX_CHILDREN];
	for (long c = 0; c < nchildren; c++) {
		pid_t pid = fork();
		if (pid < 0) {
			perror("memhog: fork");
			return 1;
		}
		if (pid == 0) {
			prctl(PR_SET_PDEATHSIG, SIGKILL);
			for (;;) {
				sleep_us(tick_us);
				shared[c]++;
			}
		}
		children[c] = pid;
	}

	int pipefd = -1;
	pid_t pipe_pid = 0;
	if (use_pipe) {
		int p[2];
		if (pipe(p) < 0) {
			perror("memhog: pipe");
			return 1;
		}
		pipe_pid = fork();
		if (pipe_pid < 0) {
			perror("memhog: fork");
			return 1;
		}
		if (pipe_pid == 0) {
			prctl(PR_SET_PDEATHSIG, SIGKILL);
			close(p[0]);
			for (uint64_t seq = 1;; seq++) {
				if (write(p[1], &seq, sizeof(seq)) != sizeof(seq))
					_exit(1);
				sleep_us(tick_us);
			}
		}
		close(p[1]);
		pipefd = p[0];
		fcntl(pipefd, F_SETFL, O_NONBLOCK);
	}

	int lfd = -1;
	if (port >= 0) {
		struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
		int one = 1;
		lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
		if (lfd < 0 || setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ||
		    bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(lfd, 64) < 0) {
			perror("memhog: listen");
			return 1;
		}
	}

	int ffd = -1;
	if (file) {
		ffd = open(file, O_WRONLY | O_CREAT | O_APPEND, 0644);
		if (ffd < 0) {
			perror("memhog: open file");
			return 1;
		}
	}

	signal(SIGUSR1, on_usr1);
	signal(SIGUSR2, on_usr2);
	signal(SIGPIPE, SIG_IGN);

	char tmp[4096];
	if (status && snprintf(tmp, sizeof(tmp), "%s.tmp", status) >= (int)sizeof(tmp)) {
		fprintf(stderr, "memhog: status path too long\n");
		return 2;
	}

	/* Hot bytes rewritten per tick: the whole hot part once per period. */
	size_t chunk = 0, hot_off = 0;
	if (hot > 0) {
		chunk = (size_t)((double)hot * (double)tick_us / ((double)hot_period_ms * 1000.0));
		chunk = (chunk + PAGE - 1) / PAGE * PAGE;
		if (chunk == 0)
			chunk = PAGE;
		if (chunk > hot)
			chunk = hot;
	}

	uint64_t counter = 0, max_gap = 0, verify_count = 0, conns = 0, file_lines = 0;
	uint64_t pipe_seq = 0, pipe_errors = 0;
	const char *verify = "none";
	uint64_t last = now_us(), last_status = 0, last_file = last;

	for (;;) {
		sleep_us(tick_us);
		uint64_t t = now_us();
		if (t > last && t - last > max_gap)
			max_gap = t - last;
		last = t;
		counter++;

		if (chunk > 0) {
			if (hot_off + chunk > hot)
				hot_off = 0;
			fill(hotp + hot_off, chunk, compressible);
			hot_off += chunk;
		}
		if (lfd >= 0) {
			int c;
			while ((c = accept(lfd, NULL, NULL)) >= 0) {
				char buf[64];
				int n = snprintf(buf, sizeof(buf), "counter=%" PRIu64 "\n", counter);
				if (write(c, buf, n) < 0) {
					/* the client went away: nothing to do */
				}
				close(c);
				conns++;
			}
		}
		if (pipefd >= 0) {
			uint64_t v[64];
			ssize_t n;
			while ((n = read(pipefd, v, sizeof(v))) > 0) {
				/* Writes of 8 bytes are atomic, so reads come in whole numbers. */
				for (ssize_t i = 0; i < n / 8; i++) {
					if (v[i] != pipe_seq + 1)
						pipe_errors++;
					pipe_seq = v[i];
				}
			}
		}
		if (ffd >= 0 && t - last_file >= 1000000) {
			char buf[64];
			int n = snprintf(buf, sizeof(buf), "counter=%" PRIu64 "\n", counter);
			if (write(ffd, buf, n) == n)
				file_lines++;
			last_file = t;
		}
		if (want_reset) {
			want_reset = 0;
			max_gap = 0;
		}
		int force = 0;
		if (want_verify) {
			want_verify = 0;
			cold_sum_now = checksum(region, cold);
			verify = cold_sum_now == cold_sum ? "ok" : "bad";
			verify_count++;
			force = 1;
			last = now_us(); /* verifying is not downtime */
		}
		if (status && (force || t - last_status >= 20000)) {
			char buf[4096];
			int n = snprintf(buf, sizeof(buf),
					 "pid=%d\ncounter=%" PRIu64 "\nmax_gap_us=%" PRIu64 "\ntime_us=%" PRIu64
					 "\nmem_mib=%ld\nhot_mib=%ld\ncold_sum=%016" PRIx64 "\nverify=%s\n"
					 "verify_count=%" PRIu64 "\ncold_sum_now=%016" PRIx64 "\nconns=%" PRIu64
					 "\nfile_lines=%" PRIu64 "\npipe_pid=%d\npipe_seq=%" PRIu64
					 "\npipe_errors=%" PRIu64 "\nchildren=",
					 (int)getpid(), counter, max_gap, t, mem_mib, hot_mib, cold_sum, verify,
					 verify_count, cold_sum_now, conns, file_lines, (int)pipe_pid, pipe_seq,
					 pipe_errors);
			for (long c = 0; c < nchildren; c++)
				n += snprintf(buf + n, sizeof(buf) - n, "%s%d", c ? "," : "", (int)children[c]);
			n += snprintf(buf + n, sizeof(buf) - n, "\nchild_counters=");
			for (long c = 0; c < nchildren; c++)
				n += snprintf(buf + n, sizeof(buf) - n, "%s%" PRIu64, c ? "," : "", shared[c]);
			n += snprintf(buf + n, sizeof(buf) - n, "\n");
			int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
			if (fd >= 0) {
				int ok = write(fd, buf, n) == n;
				close(fd);
				if (ok)
					rename(tmp, status);
			}
			last_status = t;
		}
	}
}
