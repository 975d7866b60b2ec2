/*
 * hostinit: the tiny helper behind the simulated hosts of test/e2e.
 *
 *   hostinit reaper NAME FIRSTPID
 *       PID 1 of a simulated host (started by `unshare --pid --fork ...`).
 *       Becomes a session leader, sets the hostname to NAME, makes the next
 *       PID of its namespace FIRSTPID, prints "ready" on stdout, then reaps
 *       children until fd 3 (the lifeline pipe from the test process) reports
 *       hang-up. Exiting as PID 1 makes the kernel kill every process of the
 *       host, so the host dies with the test process even when the test
 *       process is killed.
 *
 *   hostinit hold
 *       Holds the namespaces it was started in (by `unshare --net ...`: the
 *       switch joining the hosts): prints "ready" on stdout and waits until
 *       fd 3, the lifeline, reports hang-up.
 *
 *   hostinit spawn DIR STDOUT STDERR PROG ARGS...
 *       Run inside a host (via nsenter). Forks PROG as a session leader with
 *       DIR as working directory, stdin from /dev/null, stdout/stderr appended
 *       to the given files and every other fd closed; prints PROG's PID as
 *       the host sees it and exits, so PROG is re-parented to the host's
 *       reaper. Exit status 127 with a message when PROG cannot be executed.
 *
 *   hostinit exec DIR PROG ARGS...
 *       Run inside a host (via nsenter). Arranges to be killed when its parent
 *       (nsenter) dies, changes to DIR unless it is "-", and executes PROG.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static void die(const char *what)
{
	fprintf(stderr, "hostinit: %s: %s\n", what, strerror(errno));
	exit(126);
}

static void close_from(int lowfd)
{
#ifdef SYS_close_range
	if (syscall(SYS_close_range, lowfd, ~0U, 0) == 0)
		return;
#endif
	for (int fd = lowfd; fd < 65536; fd++)
		close(fd);
}

/* lifeline checks fd 3, the lifeline, and makes it close-on-exec. */
static void lifeline(void)
{
	if (fcntl(3, F_GETFD) < 0) {
		fprintf(stderr, "hostinit: needs its lifeline on fd 3\n");
		exit(2);
	}
	fcntl(3, F_SETFD, FD_CLOEXEC);
}

/* detach_stdio reports readiness and lets go of the caller's stdio. */
static void detach_stdio(void)
{
	int fd;
	if (write(1, "ready\n", 6) != 6)
		die("write ready");
	fd = open("/dev/null", O_RDWR);
	if (fd < 0)
		die("/dev/null");
	dup2(fd, 0);
	dup2(fd, 1);
	dup2(fd, 2);
	if (fd > 2)
		close(fd);
}

static int reaper(const char *name, const char *first)
{
	sigset_t set;
	int sfd, fd;
	long start = atol(first);

	if (getpid() != 1) {
		fprintf(stderr, "hostinit: reaper must be PID 1 of its namespace\n");
		return 2;
	}
	setsid();
	if (sethostname(name, strlen(name)) < 0)
		die("sethostname");
	if (start > 1) {
		char buf[32];
		int n = snprintf(buf, sizeof(buf), "%ld", start - 1);
		fd = open("/proc/sys/kernel/ns_last_pid", O_WRONLY | O_CLOEXEC);
		if (fd < 0 || write(fd, buf, n) != n)
			die("ns_last_pid");
		close(fd);
	}
	if (chdir("/") < 0)
		die("chdir");

	sigemptyset(&set);
	sigaddset(&set, SIGCHLD);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGHUP);
	if (sigprocmask(SIG_BLOCK, &set, NULL) < 0)
		die("sigprocmask");
	sfd = signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
	if (sfd < 0)
		die("signalfd");

	lifeline();
	detach_stdio();

	for (;;) {
		struct pollfd pfd[2] = {{.fd = 3, .events = POLLIN}, {.fd = sfd, .events = POLLIN}};
		struct signalfd_siginfo si;

		if (poll(pfd, 2, -1) < 0 && errno != EINTR)
			return 3;
		if (pfd[0].revents)
			return 0; /* lifeline closed: take the whole host down */
		while (read(sfd, &si, sizeof(si)) == sizeof(si))
			;
		while (waitpid(-1, NULL, WNOHANG) > 0)
			;
	}
}

static int hold(void)
{
	struct pollfd pfd = {.fd = 3, .events = POLLIN};
	lifeline();
	if (chdir("/") < 0)
		die("chdir");
	detach_stdio();
	while (poll(&pfd, 1, -1) < 0 && errno == EINTR)
		;
	return 0;
}

static int spawn(char **argv)
{
	const char *dir = argv[0], *out = argv[1], *err = argv[2];
	char **prog = argv + 3;
	int pfd[2], e = 0;
	pid_t pid;
	ssize_t n;

	if (pipe2(pfd, O_CLOEXEC) < 0)
		die("pipe");
	pid = fork();
	if (pid < 0)
		die("fork");
	if (pid == 0) {
		int fd;
		close(pfd[0]);
		if (setsid() < 0)
			goto fail;
		if (chdir(dir) < 0)
			goto fail;
		if ((fd = open("/dev/null", O_RDONLY)) < 0 || dup2(fd, 0) < 0)
			goto fail;
		if ((fd = open(out, O_WRONLY | O_CREAT | O_APPEND, 0644)) < 0 || dup2(fd, 1) < 0)
			goto fail;
		if ((fd = open(err, O_WRONLY | O_CREAT | O_APPEND, 0644)) < 0 || dup2(fd, 2) < 0)
			goto fail;
		/* Keep only stdio and the error pipe (close-on-exec). */
		if (pfd[1] != 3) {
			if (dup3(pfd[1], 3, O_CLOEXEC) < 0)
				goto fail;
		}
		close_from(4);
		pfd[1] = 3;
		signal(SIGPIPE, SIG_DFL);
		execvp(prog[0], prog);
	fail:
		e = errno;
		if (write(pfd[1], &e, sizeof(e)) < 0)
			_exit(127);
		_exit(127);
	}
	close(pfd[1]);
	n = read(pfd[0], &e, sizeof(e));
	if (n == sizeof(e)) {
		fprintf(stderr, "hostinit: spawn %s: %s\n", prog[0], strerror(e));
		waitpid(pid, NULL, 0);
		return 127;
	}
	printf("%d\n", (int)pid);
	return 0;
}

static int run(char **argv)
{
	const char *dir = argv[0];
	if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0)
		die("prctl");
	if (getppid() == 1) /* parent already gone */
		return 125;
	if (strcmp(dir, "-") != 0 && chdir(dir) < 0)
		die(dir);
	execvp(argv[1], argv + 1);
	fprintf(stderr, "hostinit: exec %s: %s\n", argv[1], strerror(errno));
	return 127;
}

int main(int argc, char **argv)
{
	if (argc >= 4 && strcmp(argv[1], "reaper") == 0)
		return reaper(argv[2], argv[3]);
	if (argc == 2 && strcmp(argv[1], "hold") == 0)
		return hold();
	if (argc >= 6 && strcmp(argv[1], "spawn") == 0)
		return spawn(argv + 2);
	if (argc >= 4 && strcmp(argv[1], "exec") == 0)
		return run(argv + 2);
	fprintf(stderr, "usage: hostinit reaper NAME FIRSTPID | hold | spawn DIR OUT ERR PROG ARGS... | exec DIR PROG ARGS...\n");
	return 2;
}
