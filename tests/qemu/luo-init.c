// SPDX-License-Identifier: GPL-2.0-only
/*
 * luo-init.c — a tiny static /init for the qemu LUO selftest initrd (see run-selftests.sh).
 *
 * Kernel command line parameters it reads from /proc/cmdline:
 *   luo_test=NAME   run /tests/NAME (a binary from tools/testing/selftests/liveupdate/)
 *   luo_stage=N     1 (default) or 2; passed to the test as `--stage N`
 *   luo_kexec=0     the test has no stages (e.g. `liveupdate`, the kselftest harness):
 *                   run it without --stage, report, power off; no kexec
 *
 * Stage 1: run `/tests/NAME --stage 1` (it forks a child that keeps the LUO session fds open
 * and the parent exits 0), then kexec_file_load(/boot/bzImage, <this very initrd, read back from
 * /sys/firmware/initrd thanks to `retain_initrd`>, same command line with luo_stage=2) and
 * reboot(LINUX_REBOOT_CMD_KEXEC).
 * Stage 2: run `/tests/NAME --stage 2` and report.
 *
 * Every line this program prints starts with "LUOINIT:"; the verdict is one line
 *   LUOINIT: RESULT NAME PASS      or      LUOINIT: RESULT NAME FAIL (why)
 * after which the guest is reset (qemu runs with -no-reboot, so it exits).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/reboot.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static char test_name[128] = "";

#define SAY_PREFIX "LUOINIT"
#include "init-common.h"

static void __attribute__((noreturn)) finish(int pass, const char *why)
{
	if (pass)
		say("RESULT %s PASS", test_name);
	else
		say("RESULT %s FAIL (%s)", test_name, why);
	sync();
	/* No ACPI in the kernel: a reset is the way out; qemu -no-reboot turns it into an exit. */
	syscall(SYS_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2, LINUX_REBOOT_CMD_RESTART, NULL);
	for (;;)
		pause();
}

static void fail(const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	if (errno && n > 0 && (size_t)n < sizeof(buf))
		snprintf(buf + n, sizeof(buf) - n, ": %s", strerror(errno));
	finish(0, buf);
}

static void do_mount(const char *src, const char *dst, const char *type, int must)
{
	mkdir(dst, 0755);
	if (mount(src, dst, type, 0, NULL) < 0 && errno != EBUSY) {
		if (must)
			fail("mount %s on %s", type, dst);
		say("note: mount %s on %s failed: %s", type, dst, strerror(errno));
	}
}


static int run_test(const char *path, const char *stage)
{
	int status;
	pid_t pid = fork();

	if (pid < 0)
		fail("fork");
	if (pid == 0) {
		if (stage)
			execl(path, path, "--stage", stage, (char *)NULL);
		else
			execl(path, path, (char *)NULL);
		perror("execl");
		_exit(127);
	}
	while (waitpid(pid, &status, 0) < 0)
		if (errno != EINTR)
			fail("waitpid");
	if (WIFEXITED(status))
		return WEXITSTATUS(status);
	return 128 + WTERMSIG(status);
}

/* Copy src (e.g. /sys/firmware/initrd) to a file in the rootfs (tmpfs/ramfs). */
static long copy_file(const char *src, const char *dst)
{
	static char buf[1 << 16];
	int in = open(src, O_RDONLY), out;
	long total = 0;
	ssize_t n;

	if (in < 0)
		return -1;
	out = open(dst, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	if (out < 0) {
		close(in);
		return -1;
	}
	while ((n = read(in, buf, sizeof(buf))) > 0) {
		if (write(out, buf, n) != n) {
			total = -1;
			break;
		}
		total += n;
	}
	if (n < 0)
		total = -1;
	close(in);
	close(out);
	return total;
}

static void kexec_stage2(const char *cmdline)
{
	char next[4096 + 64], kl[16] = "?";
	const char *s1 = strstr(cmdline, "luo_stage=1");
	int kfd, ifd;
	long isize;

	if (s1) {
		snprintf(next, sizeof(next), "%.*sluo_stage=2%s", (int)(s1 - cmdline), cmdline,
			 s1 + strlen("luo_stage=1"));
	} else {
		snprintf(next, sizeof(next), "%s luo_stage=2", cmdline);
	}

	isize = copy_file("/sys/firmware/initrd", "/initrd.img");
	if (isize <= 0)
		fail("cannot read back the initrd from /sys/firmware/initrd (is retain_initrd on the command line?)");
	kfd = open("/boot/bzImage", O_RDONLY | O_CLOEXEC);
	if (kfd < 0)
		fail("open /boot/bzImage");
	ifd = open("/initrd.img", O_RDONLY | O_CLOEXEC);
	if (ifd < 0)
		fail("open /initrd.img");

	say("kexec_file_load(/boot/bzImage, initrd %ld bytes, \"%s\")", isize, next);
	errno = 0;
	if (syscall(SYS_kexec_file_load, kfd, ifd, strlen(next) + 1, next, 0UL) < 0)
		fail("kexec_file_load");
	read_file("/sys/kernel/kexec_loaded", kl, sizeof(kl));
	say("kexec image loaded (/sys/kernel/kexec_loaded=%s); rebooting into it", kl);
	sync();
	errno = 0;
	syscall(SYS_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2, LINUX_REBOOT_CMD_KEXEC, NULL);
	fail("reboot(LINUX_REBOOT_CMD_KEXEC) returned");
}

int main(void)
{
	char cmdline[4096], stage[8] = "1", kexec[8] = "1", path[256];
	int rc;

	/* The kernel opened /dev/console (a node in the initrd) as fds 0-2 for us. */
	setvbuf(stdout, NULL, _IOLBF, 0);
	do_mount("proc", "/proc", "proc", 1);
	do_mount("sysfs", "/sys", "sysfs", 1);
	do_mount("devtmpfs", "/dev", "devtmpfs", 1);
	do_mount("debugfs", "/sys/kernel/debug", "debugfs", 0);

	if (read_file("/proc/cmdline", cmdline, sizeof(cmdline)) < 0)
		fail("read /proc/cmdline");
	if (!param(cmdline, "luo_test", test_name, sizeof(test_name)))
		fail("no luo_test=NAME on the kernel command line");
	param(cmdline, "luo_stage", stage, sizeof(stage));
	param(cmdline, "luo_kexec", kexec, sizeof(kexec));
	say("test=%s stage=%s cmdline=\"%s\"", test_name, kexec[0] == '0' ? "-" : stage, cmdline);
	if (access("/sys/kernel/debug/kho/in", F_OK) == 0)
		say("debugfs kho/in present: this is a live-update (KHO) boot");
	say("/dev/liveupdate %s", access("/dev/liveupdate", F_OK) == 0 ? "present" : "MISSING");

	snprintf(path, sizeof(path), "/tests/%s", test_name);
	if (kexec[0] == '0') {
		rc = run_test(path, NULL);
		if (rc)
			errno = 0, fail("%s exited with status %d", test_name, rc);
		finish(1, NULL);
	}

	if (strcmp(stage, "1") && strcmp(stage, "2"))
		errno = 0, fail("bad luo_stage=%s", stage);
	rc = run_test(path, stage);
	say("%s --stage %s exited with status %d", test_name, stage, rc);
	if (rc)
		errno = 0, fail("stage %s exited with status %d", stage, rc);
	if (stage[0] == '1')
		kexec_stage2(cmdline);	/* does not return */
	finish(1, NULL);
}
