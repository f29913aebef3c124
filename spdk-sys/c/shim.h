/*
 * C wrappers for the SPDK helpers that are `static inline` in the headers (bindgen only
 * sees functions with a symbol), prefixed spdk_sys_. Kept tiny: each one only forwards.
 */
#ifndef SPDK_SYS_SHIM_H
#define SPDK_SYS_SHIM_H

#include <spdk/bdev_module.h>
#include <spdk/thread.h>

/* spdk_io_channel_get_ctx(): the per-channel context follows struct spdk_io_channel,
 * whose size is private to libspdk_thread. */
void *spdk_sys_io_channel_get_ctx(struct spdk_io_channel *ch);

/* spdk_bdev_io_from_ctx(): the bdev_io owning a driver_ctx. */
struct spdk_bdev_io *spdk_sys_bdev_io_from_ctx(void *ctx);

/* host.c: the SPDK of the app that loaded the module (see there). */

/* The SPDK version string ("SPDK v26.09-pre ...") compiled into the object providing
 * spdk_rpc_register_method to the module, and that object's path. 0: found; -1: no
 * loaded object holds that address; -2: the object has no version string. Both buffers
 * are always NUL-terminated (truncated to their lengths). */
int spdk_sys_host_version(char *version, size_t version_len, char *path, size_t path_len);

/* The real paths of the loaded libspdk_bdev.so* objects, one per line in `paths`
 * (NUL-terminated, truncated to `len`); returns how many there are. */
int spdk_sys_host_bdev_libs(char *paths, size_t len);

#endif
