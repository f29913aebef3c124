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

#endif
