// SPDX-License-Identifier: GPL-2.0-only
/*
 * contract-init.c — the static /init of the contract-suite initrd (see run-contract.sh).
 *
 * It mounts proc, sysfs, devtmpfs, tmpfs on /tmp and /dev/shm (and debugfs if it can), reads
 * `luo_boot=N` (default 0) from /proc/cmdline and runs, with cwd /luo,
 *
 *     /usr/bin/python3.11 -m tests.contract.kexec_driver --boot N
 *
 * The driver does the kexec itself (kexec_file_load + reboot(LINUX_REBOOT_CMD_KEXEC)) while holding
 * the scenarios' session fds, so in every boot but the last it never returns.  When it does return,
 * /init prints its exit status and resets the machine (qemu runs with -no-reboot, so it exits).
 *
 * Every line this program prints starts with "CONTRACTINIT:".
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

#define SAY_PREFIX "CONTRACTINIT"
#include "init-common.h"

static void __attribute__((noreturn)) power_off(void)
{
	sync();
	/* No ACPI in the kernel: a reset is the way out; qemu -no-reboot turns it into an exit. */
	syscall(SYS_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2, LINUX_REBOOT_CMD_RESTART, NULL);
	for (;;)
		pause();
}

static void do_mount(const char *src, const char *dst, const char *type, const char *opts)
{
	mkdir(dst, 0755);
	if (mount(src, dst, type, 0, opts) < 0 && errno != EBUSY)
		say("note: mount %s on %s failed: %s", type, dst, strerror(errno));
}


/*
 * The KHO scratch areas (lowmem, global, one per node): kexec_file_load must place the next kernel
 * and initrd inside them.  They are sized on the cold boot and inherited by every kexec'd kernel.
 */
static void print_scratch(void)
{
	char buf[512], line[512] = "", *p, *save = NULL;
	unsigned long long total = 0, v;

	if (read_file("/sys/kernel/debug/kho/out/scratch_len", buf, sizeof(buf)) < 0)
		return;
	for (p = strtok_r(buf, "\n", &save); p; p = strtok_r(NULL, "\n", &save)) {
		v = strtoull(p, NULL, 16);
		total += v;
		snprintf(line + strlen(line), sizeof(line) - strlen(line), "%s%llu", line[0] ? " + " : "", v >> 20);
	}
	say("KHO scratch areas: %s = %llu MiB", line, total >> 20);
}

int main(void)
{
	char cmdline[4096], boot[16] = "0";
	char *const env[] = {
		"PATH=/usr/bin:/bin",
		"HOME=/tmp",
		"USER=root",
		"LOGNAME=root",
		"LANG=C.UTF-8",
		"PYTHONPATH=/luo/src:/luo/site",
		"PYTHONDONTWRITEBYTECODE=1",
		"PYTHONIOENCODING=utf-8:backslashreplace",
		"PYTHONUNBUFFERED=1",
		"TERM=dumb",
		NULL,
	};
	int status;
	pid_t pid;

	setvbuf(stdout, NULL, _IOLBF, 0);
	do_mount("proc", "/proc", "proc", NULL);
	do_mount("sysfs", "/sys", "sysfs", NULL);
	do_mount("devtmpfs", "/dev", "devtmpfs", NULL);
	do_mount("tmpfs", "/dev/shm", "tmpfs", "mode=1777");
	do_mount("tmpfs", "/tmp", "tmpfs", "mode=1777");
	do_mount("debugfs", "/sys/kernel/debug", "debugfs", NULL);

	if (read_file("/proc/cmdline", cmdline, sizeof(cmdline)) < 0) {
		say("RESULT FAIL (cannot read /proc/cmdline)");
		power_off();
	}
	param(cmdline, "luo_boot", boot, sizeof(boot));
	say("boot=%s cmdline=\"%s\"", boot, cmdline);
	if (access("/sys/kernel/debug/kho/in", F_OK) == 0)
		say("debugfs kho/in present: this is a live-update (KHO) boot");
	say("/dev/liveupdate %s", access("/dev/liveupdate", F_OK) == 0 ? "present" : "MISSING");
	print_scratch();

	pid = fork();
	if (pid < 0) {
		say("RESULT FAIL (fork: %s)", strerror(errno));
		power_off();
	}
	if (pid == 0) {
		if (chdir("/luo") < 0)
			perror("chdir /luo");
		execle("/usr/bin/python3.11", "python3", "-m", "tests.contract.kexec_driver", "--boot", boot,
		       (char *)NULL, env);
		perror("execle /usr/bin/python3.11");
		_exit(127);
	}
	/* Reap everything (orphans get re-parented to us) until the driver itself exits. */
	for (;;) {
		pid_t w = wait(&status);

		if (w == pid)
			break;
		if (w < 0 && errno != EINTR) {
			say("RESULT FAIL (wait: %s)", strerror(errno));
			power_off();
		}
	}
	if (WIFEXITED(status))
		say("driver (boot %s) exited with status %d", boot, WEXITSTATUS(status));
	else
		say("driver (boot %s) killed by signal %d", boot, WTERMSIG(status));
	say("RESULT %s", WIFEXITED(status) && WEXITSTATUS(status) == 0 ? "PASS" : "FAIL");
	power_off();
}
