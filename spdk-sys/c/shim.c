/*
 * Out-of-line copies of SPDK's static inline helpers (see shim.h). Compiled by build.rs
 * with the same headers bindgen read, so the offsets they encode match the SPDK linked.
 */
#include "shim.h"

void *
spdk_sys_io_channel_get_ctx(struct spdk_io_channel *ch)
{
	return spdk_io_channel_get_ctx(ch);
}

struct spdk_bdev_io *
spdk_sys_bdev_io_from_ctx(void *ctx)
{
	return spdk_bdev_io_from_ctx(ctx);
}
