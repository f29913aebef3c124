/*
 * The module's load-time constructor. Compiled to an object that the root crate's build
 * script links into the cdylib only: a constructor inside the Rust rlib would be kept in
 * every executable linking the crate (the `pcache` binary too), and with it the whole
 * SPDK module and a dependency on SPDK's libraries.
 */

/* Defined by the module (src/env/spdk/mod.rs): registers it with the bdev layer and its
 * RPC methods. */
extern void spdk_sys_module_load(void);

__attribute__((constructor)) static void
spdk_sys_load(void)
{
	spdk_sys_module_load();
}
