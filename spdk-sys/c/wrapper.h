/*
 * The SPDK headers spdk-sys binds: everything an out-of-tree virtual bdev module with
 * JSON-RPC methods, pollers and DMA buffers needs. Only public headers (include/spdk/),
 * never spdk_internal/, so the bindings follow SPDK's public ABI only.
 */
#include <spdk/stdinc.h>
#include <spdk/bdev.h>
#include <spdk/bdev_module.h>
#include <spdk/env.h>
#include <spdk/json.h>
#include <spdk/jsonrpc.h>
#include <spdk/log.h>
#include <spdk/rpc.h>
#include <spdk/string.h>
#include <spdk/thread.h>
#include <spdk/util.h>
#include <spdk/uuid.h>
#include <spdk/version.h>

#include "shim.h"
