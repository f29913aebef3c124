/*
 * What SPDK the app that loaded the module runs, read at load time (before the app's
 * main, so no SPDK call is made): the version string SPDK compiles into libspdk_rpc
 * (SPDK_VERSION_STRING, what the spdk_get_version RPC answers) of the object that
 * provides spdk_rpc_register_method to the module, and the paths of every loaded copy of
 * libspdk_bdev. The module (src/env/spdk/mod.rs) compares them with the SPDK it was
 * built against and refuses to register on a mismatch.
 *
 * Invariants: only reads memory the dynamic linker reports as mapped and readable
 * (PT_LOAD segments without PF_W, up to p_filesz); writes only into the caller's
 * buffers, always NUL-terminated within their lengths; allocates nothing, takes no lock
 * of its own (dl_iterate_phdr holds the loader's), never fails hard: a value it cannot
 * find is reported as such.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <dlfcn.h>
#include <link.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <spdk/rpc.h>

#include "shim.h"

static void
copy_out(char *dst, size_t len, const char *src)
{
	if (len == 0) {
		return;
	}
	strncpy(dst, src, len - 1);
	dst[len - 1] = '\0';
}

/* The file of a loaded object: its name, or the executable's for the main program. */
static void
object_path(const struct dl_phdr_info *info, char *out, size_t len)
{
	if (info->dlpi_name != NULL && info->dlpi_name[0] != '\0') {
		copy_out(out, len, info->dlpi_name);
		return;
	}
	char exe[PATH_MAX];
	ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
	if (n < 0) {
		n = 0;
	}
	exe[n] = '\0';
	copy_out(out, len, exe);
}

struct version_ctx {
	uintptr_t addr;
	char *version;
	size_t version_len;
	char *path;
	size_t path_len;
	int rc;
};

static int
version_cb(struct dl_phdr_info *info, size_t size, void *arg)
{
	struct version_ctx *c = arg;
	int mine = 0;

	(void)size;
	for (int i = 0; i < info->dlpi_phnum; i++) {
		const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
		uintptr_t start = info->dlpi_addr + ph->p_vaddr;
		if (ph->p_type == PT_LOAD && c->addr >= start && c->addr < start + ph->p_memsz) {
			mine = 1;
		}
	}
	if (!mine) {
		return 0;
	}
	object_path(info, c->path, c->path_len);
	c->rc = -2;
	for (int i = 0; i < info->dlpi_phnum; i++) {
		const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
		if (ph->p_type != PT_LOAD || !(ph->p_flags & PF_R) || (ph->p_flags & PF_W)) {
			continue;
		}
		const char *base = (const char *)(info->dlpi_addr + ph->p_vaddr);
		const char *end = base + ph->p_filesz;
		const char *p = base;
		while (p < end && (p = memmem(p, (size_t)(end - p), "SPDK v", 6)) != NULL) {
			/* "SPDK v" then a digit: the version string, not a format. */
			if (p + 6 < end && isdigit((unsigned char)p[6])) {
				size_t n = 0;
				while (p + n < end && p[n] != '\0' && n + 1 < c->version_len) {
					n++;
				}
				if (c->version_len > 0) {
					memcpy(c->version, p, n);
					c->version[n] = '\0';
				}
				c->rc = 0;
				return 1;
			}
			p++;
		}
	}
	return 1;
}

int
spdk_sys_host_version(char *version, size_t version_len, char *path, size_t path_len)
{
	/* The address the module's own reference resolved to: the app's libspdk_rpc when it
	 * shares one with the module, which is what the RPC methods register into. */
	struct version_ctx c = {
		.addr = (uintptr_t)(void *)spdk_rpc_register_method,
		.version = version,
		.version_len = version_len,
		.path = path,
		.path_len = path_len,
		.rc = -1,
	};

	copy_out(version, version_len, "");
	copy_out(path, path_len, "");
	dl_iterate_phdr(version_cb, &c);
	return c.rc;
}

struct bdev_ctx {
	char *paths;
	size_t len;
	size_t used;
	int count;
};

static int
bdev_cb(struct dl_phdr_info *info, size_t size, void *arg)
{
	struct bdev_ctx *c = arg;
	const char *name = info->dlpi_name;
	const char *base;
	char real[PATH_MAX];

	(void)size;
	if (name == NULL || name[0] == '\0') {
		return 0;
	}
	base = strrchr(name, '/');
	base = base != NULL ? base + 1 : name;
	/* libspdk_bdev.so or libspdk_bdev.so.<version>, not libspdk_bdev_malloc.so... */
	if (strncmp(base, "libspdk_bdev.so", 15) != 0 || (base[15] != '\0' && base[15] != '.')) {
		return 0;
	}
	if (realpath(name, real) == NULL) {
		copy_out(real, sizeof(real), name);
	}
	size_t n = strlen(real);
	if (c->count > 0 && c->used < c->len && c->used + 1 + n + 1 <= c->len) {
		c->paths[c->used++] = '\n';
	}
	if (c->used + n + 1 <= c->len) {
		memcpy(c->paths + c->used, real, n + 1);
		c->used += n;
	}
	c->count++;
	return 0;
}

int
spdk_sys_host_bdev_libs(char *paths, size_t len)
{
	struct bdev_ctx c = { .paths = paths, .len = len, .used = 0, .count = 0 };

	copy_out(paths, len, "");
	dl_iterate_phdr(bdev_cb, &c);
	return c.count;
}
