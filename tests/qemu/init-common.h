/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * What the static /init programs of the qemu tier share (luo-init.c, contract-init.c): clock, console
 * lines, small file and kernel-command-line helpers.  Define SAY_PREFIX before including it: the serial
 * log is parsed by that prefix.
 */
#ifndef SAY_PREFIX
#error "define SAY_PREFIX"
#endif

static double uptime(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_BOOTTIME, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void say(const char *fmt, ...)
{
	va_list ap;

	printf("%s: [%8.3f] ", SAY_PREFIX, uptime());
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	putchar('\n');
	fflush(stdout);
}

static int read_file(const char *path, char *buf, size_t len)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	ssize_t n;

	if (fd < 0)
		return -1;
	n = read(fd, buf, len - 1);
	close(fd);
	if (n < 0)
		return -1;
	buf[n] = 0;
	while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == ' '))
		buf[--n] = 0;
	return 0;
}

/* Value of `key=` in the command line, or NULL. */
static const char *param(const char *cmdline, const char *key, char *out, size_t outlen)
{
	size_t klen = strlen(key);
	const char *p = cmdline;

	while (*p) {
		while (*p == ' ')
			p++;
		if (!strncmp(p, key, klen) && p[klen] == '=') {
			size_t i = 0;

			p += klen + 1;
			while (*p && *p != ' ' && i + 1 < outlen)
				out[i++] = *p++;
			out[i] = 0;
			return out;
		}
		while (*p && *p != ' ')
			p++;
	}
	return NULL;
}
