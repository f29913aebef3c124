/*
 * The SPDK module's load-time constructor: runs when spdk_tgt / bdevperf load
 * libspdk_bdev_pcache.so (LD_PRELOAD: before the app's main) and hands over to the module
 * (spdk_sys_module_load in pcache's src/env/spdk/mod.rs), which checks the app's SPDK
 * against the one the module was built for and registers the bdev module and its RPC
 * methods, or refuses with an error naming both.
 *
 * Invariants: compiled by spdk-module/build.rs into the cdylib only, as a loose object on
 * its link line (always linked). A constructor inside the pcache rlib would be kept in
 * every executable linking pcache (the `pcache` binary too), and with it the whole SPDK
 * module and a dependency on SPDK's libraries.
 */

extern void spdk_sys_module_load(void);

__attribute__((constructor)) static void
spdk_bdev_pcache_load(void)
{
	spdk_sys_module_load();
}
