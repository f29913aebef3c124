//! Build script of spdk-sys: locates an SPDK, generates the bindings with bindgen,
//! compiles the C shim for SPDK's `static inline` helpers, and tells the root crate which
//! SPDK libraries to link into the module (spdk-module/, crate `spdk_bdev_pcache`).
//!
//! Where SPDK comes from, first match wins:
//! 1. `SPDK_DIR`: an install prefix (`include/spdk`, `lib/`) or a source tree built with
//!    `--with-shared` (`include/spdk`, `build/lib/`).
//! 2. pkg-config: the directory of `spdk_log.pc` on `PKG_CONFIG_PATH` (a package with no
//!    `Requires`), taken as a tree or prefix as above.
//!
//! What is linked: exactly the SPDK libraries the module calls (`SPDK_LIBS`), and for
//! executables the system and DPDK libraries those underlinked .so files use, read from
//! `spdk_syslibs.pc` and `spdk_dpdklibs.pc` (two files that name no other package; a
//! fixed list when absent). Never `spdk_bdev.pc`: it pulls in every bdev module through
//! `spdk_bdev_modules.pc`, which with OCF names a package SPDK never writes, so
//! pkg-config fails, and a module preloaded into an SPDK app needs none of them.
//!
//! Invariants: SPDK is never built here and never linked statically (a static copy inside
//! a module preloaded into `spdk_tgt` would be a second bdev layer and RPC table, and
//! the module would register into the wrong one). This crate emits no link flags for
//! SPDK itself: it exports them (`DEP_SPDK_LINK_ARGS`) and the module crate's build
//! script (spdk-module/build.rs) passes them to its cdylib only (the root crate's to its
//! test executables only), so the `pcache` binary never depends on SPDK. For the same
//! reason the module's load-time constructor is a C object of that crate
//! (spdk-module/c/load.c), not part of this one.

use std::env;
use std::path::{Path, PathBuf};

/// What the rest of the build needs to know about the SPDK found.
struct Spdk {
    /// Directories holding `spdk/*.h`.
    include: Vec<PathBuf>,
    /// Directory of `libspdk_*.so`.
    lib_dir: PathBuf,
    /// Further `-L` directories the system libraries need (ISA-L of a source tree).
    search: Vec<PathBuf>,
    /// The non-SPDK libraries (DPDK, system) SPDK's .so files use, often without
    /// declaring them.
    syslibs: Vec<String>,
}

/// The SPDK libraries whose functions the module (src/env/spdk, c/shim.c) calls, in link
/// order. Checked with `nm -D --undefined-only libspdk_bdev_pcache.so` against each library's
/// exports (SPDK 26.09-pre: 58 symbols, all from these): the bdev layer and module API,
/// threads and pollers, JSON and JSON-RPC, the RPC method table, logging, utilities
/// (crc, uuid, string) and the env (spdk_zmalloc, spdk_get_ticks).
const SPDK_LIBS: &[&str] = &[
    "spdk_bdev",
    "spdk_thread",
    "spdk_rpc",
    "spdk_jsonrpc",
    "spdk_json",
    "spdk_env_dpdk",
    "spdk_util",
    "spdk_log",
];

/// System libraries when SPDK has no `spdk_syslibs.pc` / `spdk_dpdklibs.pc`.
const FALLBACK_SYSLIBS: &[&str] = &[
    "rte_eal",
    "rte_mempool",
    "rte_ring",
    "rte_bus_pci",
    "rte_pci",
    "ssl",
    "crypto",
    "uuid",
    "numa",
];

/// The .pc files read for the system libraries; neither has `Requires` into SPDK.
const SYSLIB_PCS: &[&str] = &["spdk_syslibs", "spdk_dpdklibs"];

fn main() {
    println!("cargo:rerun-if-env-changed=SPDK_DIR");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
    println!("cargo:rerun-if-changed=c/wrapper.h");
    println!("cargo:rerun-if-changed=c/shim.h");
    println!("cargo:rerun-if-changed=c/shim.c");
    println!("cargo:rerun-if-changed=c/host.c");

    let spdk = match locate() {
        Ok(s) => s,
        Err(msg) => {
            // A build script cannot print a friendlier error than a panic message.
            panic!(
                "spdk-sys: no usable SPDK ({msg}). Set SPDK_DIR to an SPDK install prefix or \
                 a source tree built --with-shared (scripts/build-spdk.sh builds one and \
                 prints its path), or PKG_CONFIG_PATH to its lib/pkgconfig directory."
            );
        }
    };

    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    generate_bindings(&spdk, &out);
    compile_shim(&spdk);
    emit_link(&spdk);
    emit_version(&spdk);
}

fn locate() -> Result<Spdk, String> {
    if let Some(dir) = env::var_os("SPDK_DIR").filter(|d| !d.is_empty()) {
        return from_dir(Path::new(&dir));
    }
    // spdk_log requires nothing, so this probe cannot trip over the module list.
    let log = pkg_config::Config::new()
        .cargo_metadata(false)
        .env_metadata(false)
        .probe("spdk_log")
        .map_err(|e| format!("SPDK_DIR is not set, and pkg-config spdk_log: {e}"))?;
    let lib_dir = log
        .link_paths
        .iter()
        .find(|d| d.join("libspdk_log.so").exists())
        .ok_or("pkg-config spdk_log gave no directory holding libspdk_log.so")?;
    // The include directory pkg-config names, else <prefix>/include beside <prefix>/lib.
    let include = log
        .include_paths
        .iter()
        .find(|d| d.join("spdk/bdev_module.h").is_file())
        .cloned()
        .or_else(|| lib_dir.parent().map(|p| p.join("include")))
        .ok_or("pkg-config spdk_log gave no include directory")?;
    from_parts(include, lib_dir.clone())
}

/// SPDK_DIR: an install prefix or a source tree built with `--with-shared`.
fn from_dir(dir: &Path) -> Result<Spdk, String> {
    let lib_dir = [dir.join("build/lib"), dir.join("lib")]
        .into_iter()
        .find(|d| d.join("libspdk_bdev.so").exists())
        .ok_or_else(|| {
            format!(
                "{}: no libspdk_bdev.so in build/lib or lib (SPDK must be built, \
                 configured --with-shared)",
                dir.display()
            )
        })?;
    from_parts(dir.join("include"), lib_dir)
}

/// Checks that the headers and every library in `SPDK_LIBS` are there.
fn from_parts(include: PathBuf, lib_dir: PathBuf) -> Result<Spdk, String> {
    if !include.join("spdk/bdev_module.h").is_file() {
        return Err(format!("no {}/spdk/bdev_module.h", include.display()));
    }
    let missing: Vec<String> = SPDK_LIBS
        .iter()
        .map(|l| format!("lib{l}.so"))
        .filter(|f| !lib_dir.join(f).exists())
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "{}: no {} (SPDK must be configured --with-shared)",
            lib_dir.display(),
            missing.join(", ")
        ));
    }
    let (search, syslibs) = syslibs(&lib_dir.join("pkgconfig"));
    Ok(Spdk {
        include: vec![include],
        lib_dir,
        search,
        syslibs,
    })
}

/// `-L` directories and `-l` names of SPDK's system and DPDK libraries.
fn syslibs(pc_dir: &Path) -> (Vec<PathBuf>, Vec<String>) {
    let mut search = Vec::new();
    let mut libs = Vec::new();
    for pc in SYSLIB_PCS {
        let file = pc_dir.join(format!("{pc}.pc"));
        println!("cargo:rerun-if-changed={}", file.display());
        if !file.is_file() {
            continue;
        }
        // Probing the file by path reads only it (and what it requires: nothing).
        let Ok(lib) = pkg_config::Config::new()
            .cargo_metadata(false)
            .env_metadata(false)
            .probe(&file.to_string_lossy())
        else {
            continue;
        };
        for p in lib.link_paths {
            if !search.contains(&p) {
                search.push(p);
            }
        }
        for l in lib.libs {
            if !l.starts_with("spdk_") && !libs.contains(&l) {
                libs.push(l);
            }
        }
    }
    if libs.is_empty() {
        libs = FALLBACK_SYSLIBS.iter().map(|s| s.to_string()).collect();
    }
    (search, libs)
}

fn generate_bindings(spdk: &Spdk, out: &Path) {
    let mut b = bindgen::Builder::default()
        .header("c/wrapper.h")
        .clang_arg("-Ic")
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        // The functions the module calls, and their types recursively.
        .allowlist_function("spdk_bdev_.*")
        .allowlist_function("spdk_io_.*")
        .allowlist_function("spdk_(get|put)_io_channel")
        .allowlist_function("spdk_poller_.*")
        .allowlist_function("spdk_thread_.*")
        .allowlist_function("spdk_get_thread")
        .allowlist_function("spdk_for_each_channel.*")
        .allowlist_function("spdk_json_.*")
        .allowlist_function("spdk_jsonrpc_.*")
        .allowlist_function("spdk_rpc_.*")
        .allowlist_function("spdk_dma_.*")
        .allowlist_function("spdk_(z)?malloc|spdk_free")
        .allowlist_function("spdk_mem_(un)?register")
        .allowlist_function("spdk_vtophys")
        .allowlist_function("spdk_uuid_.*")
        .allowlist_function("spdk_log")
        .allowlist_function("spdk_get_ticks(_hz)?")
        .allowlist_function("spdk_strerror")
        .allowlist_function("spdk_sys_.*")
        .allowlist_type("spdk_bdev_module")
        .allowlist_type("spdk_bdev_fn_table")
        .allowlist_type("spdk_bdev_io_wait_entry")
        .allowlist_type("spdk_bdev_claim_opts")
        .allowlist_var("SPDK_.*")
        .allowlist_type("spdk_thread_poller_rc")
        .default_enum_style(bindgen::EnumVariation::Consts)
        .prepend_enum_name(false)
        .derive_default(true)
        .derive_debug(false)
        .layout_tests(true)
        .generate_comments(false)
        // NVMe structs are only carried around (passthru params) and their bitfields
        // trip bindgen's layout computation; the packed `spdk_bdev_ext_io_opts` holds
        // unions with an alignment attribute, which Rust forbids. The module uses
        // neither, so they stay opaque: exact size and alignment, no fields.
        .opaque_type("spdk_nvme_.*")
        .opaque_type("spdk_bdev_ext_io_opts")
        // u128 / long double in libc structs the allowlist does not need.
        .blocklist_type("max_align_t")
        .size_t_is_usize(true);
    for inc in &spdk.include {
        b = b.clang_arg(format!("-I{}", inc.display()));
    }
    let bindings = b.generate().expect("bindgen failed on the SPDK headers");
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("cannot write bindings.rs");
}

fn compile_shim(spdk: &Spdk) {
    let mut cc = cc::Build::new();
    cc.file("c/shim.c")
        .file("c/host.c")
        .include("c")
        .warnings(true)
        .pic(true);
    // SPDK's own headers have unused parameters in inline helpers.
    cc.flag_if_supported("-Wno-unused-parameter");
    for inc in &spdk.include {
        cc.include(inc);
    }
    cc.compile("spdk_sys_shim");
}

/// Exports, as `DEP_SPDK_LINK_ARGS` (space-separated), the linker arguments that link
/// SPDK into a shared object or executable, so the crates that link SPDK (the module's
/// cdylib, the root crate's test executables) pass the same ones: -L and an rpath for each
/// library directory (SPDK's .so files then load without LD_LIBRARY_PATH), -l for exactly
/// the libraries the module calls, and SPDK's system libraries with --no-as-needed
/// (SPDK's .so files use them without declaring them, and rustc's default --as-needed
/// would drop them).
fn emit_link(spdk: &Spdk) {
    let mut args = Vec::new();
    for dir in std::iter::once(&spdk.lib_dir).chain(&spdk.search) {
        args.push(format!("-L{}", dir.display()));
        args.push(format!("-Wl,-rpath,{}", dir.display()));
    }
    args.extend(SPDK_LIBS.iter().map(|l| format!("-l{l}")));
    if !spdk.syslibs.is_empty() {
        let sys: Vec<String> = spdk.syslibs.iter().map(|l| format!("-l{l}")).collect();
        args.push(format!(
            "-Wl,--push-state,--no-as-needed,{},--pop-state",
            sys.join(",")
        ));
    }
    println!("cargo:link_args={}", args.join(" "));
}

/// Exposes the SPDK version the bindings were generated from as `SPDK_SYS_VERSION`.
fn emit_version(spdk: &Spdk) {
    let text = spdk
        .include
        .iter()
        .find_map(|d| std::fs::read_to_string(d.join("spdk/version.h")).ok())
        .unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| {
                let mut it = l.split_whitespace();
                (it.next() == Some("#define") && it.next() == Some(name))
                    .then(|| it.next().map(|v| v.trim_matches('"').to_string()))
                    .flatten()
            })
            .unwrap_or_default()
    };
    let (ma, mi, pa, suffix) = (
        field("SPDK_VERSION_MAJOR"),
        field("SPDK_VERSION_MINOR"),
        field("SPDK_VERSION_PATCH"),
        field("SPDK_VERSION_SUFFIX"),
    );
    let mi = if mi.len() == 1 { format!("0{mi}") } else { mi };
    let pa = if pa.is_empty() || pa == "0" {
        String::new()
    } else {
        format!(".{pa}")
    };
    println!("cargo:rustc-env=SPDK_SYS_VERSION={ma}.{mi}{pa}{suffix}");
    println!(
        "cargo:rustc-env=SPDK_SYS_LIB_DIR={}",
        spdk.lib_dir.display()
    );
}
