//! Build script of spdk-sys: locates an SPDK installation, generates the bindings with
//! bindgen, compiles the C shim for SPDK's `static inline` helpers, and emits the link
//! flags for SPDK's *shared* libraries.
//!
//! Where SPDK comes from, first match wins:
//! 1. `SPDK_DIR`: an install prefix (`include/spdk`, `lib/`) or a built source tree
//!    (`include/spdk`, `build/lib/`). Its `pkgconfig/` directory, when present, supplies
//!    the exact library list; otherwise a fixed minimal list is linked.
//! 2. pkg-config (`spdk_bdev`, `spdk_env_dpdk`, `spdk_syslibs` on `PKG_CONFIG_PATH`).
//!
//! Invariants: SPDK is never built here and never linked statically (a static copy inside
//! a module preloaded into `spdk_tgt` would be a second bdev layer and RPC table, and
//! the module would register into the wrong one). `spdk_syslibs` is always linked because
//! SPDK's shared libraries are underlinked (libspdk_util uses libcrypto without a NEEDED
//! entry). The library directory and those system libraries are exported as
//! `DEP_SPDK_LIB_DIR` and `DEP_SPDK_SYSLIBS` so the root crate can set an rpath and keep
//! the system libraries in its executables.

use std::env;
use std::path::{Path, PathBuf};

/// What the rest of the build needs to know about the SPDK found.
struct Spdk {
    /// Directories holding `spdk/*.h`.
    include: Vec<PathBuf>,
    /// Directory of `libspdk_*.so`.
    lib_dir: PathBuf,
    /// `-L` directories, `lib_dir` first.
    search: Vec<PathBuf>,
    /// `-l` names, in link order.
    libs: Vec<String>,
    /// The non-SPDK libraries (DPDK, system) SPDK's .so files use without declaring them.
    syslibs: Vec<String>,
}

/// Linked when SPDK_DIR has no pkg-config files: the libraries the module calls into,
/// plus the system libraries SPDK's own .so files forget to declare.
const FALLBACK_LIBS: &[&str] = &[
    "spdk_bdev",
    "spdk_thread",
    "spdk_json",
    "spdk_jsonrpc",
    "spdk_rpc",
    "spdk_log",
    "spdk_util",
    "spdk_env_dpdk",
    "ssl",
    "crypto",
    "uuid",
];

/// System libraries of the fallback list (see `FALLBACK_LIBS`).
const FALLBACK_SYSLIBS: &[&str] = &[
    "rte_eal",
    "rte_mempool",
    "rte_ring",
    "rte_bus_pci",
    "rte_pci",
    "ssl",
    "crypto",
    "uuid",
];

/// pkg-config packages whose union is the link line.
const PC_PACKAGES: &[&str] = &["spdk_bdev", "spdk_env_dpdk", "spdk_syslibs"];

fn main() {
    println!("cargo:rerun-if-env-changed=SPDK_DIR");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
    println!("cargo:rerun-if-changed=c/wrapper.h");
    println!("cargo:rerun-if-changed=c/shim.h");
    println!("cargo:rerun-if-changed=c/shim.c");

    let spdk = match locate() {
        Ok(s) => s,
        Err(msg) => {
            // A build script cannot print a friendlier error than a panic message.
            panic!(
                "spdk-sys: no SPDK found ({msg}). Set SPDK_DIR to an SPDK install prefix or \
                 built source tree, or PKG_CONFIG_PATH to its lib/pkgconfig directory."
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
    from_pkg_config(None)
}

/// SPDK_DIR: an install prefix or a source tree built with `--with-shared`.
fn from_dir(dir: &Path) -> Result<Spdk, String> {
    let include = dir.join("include");
    if !include.join("spdk/bdev_module.h").is_file() {
        return Err(format!(
            "SPDK_DIR={}: no include/spdk/bdev_module.h",
            dir.display()
        ));
    }
    let lib_dir = [dir.join("build/lib"), dir.join("lib")]
        .into_iter()
        .find(|d| d.join("libspdk_bdev.so").exists())
        .ok_or_else(|| {
            format!(
                "SPDK_DIR={}: no libspdk_bdev.so in build/lib or lib (SPDK must be \
                 configured --with-shared)",
                dir.display()
            )
        })?;
    let pc_dir = lib_dir.join("pkgconfig");
    if pc_dir.join("spdk_bdev.pc").is_file() {
        let mut s = from_pkg_config(Some(&pc_dir))?;
        s.include.insert(0, include);
        s.lib_dir = lib_dir;
        return Ok(s);
    }
    Ok(Spdk {
        include: vec![include],
        search: vec![lib_dir.clone()],
        lib_dir,
        libs: FALLBACK_LIBS.iter().map(|s| s.to_string()).collect(),
        syslibs: FALLBACK_SYSLIBS.iter().map(|s| s.to_string()).collect(),
    })
}

/// pkg-config, optionally restricted to one directory of .pc files.
fn from_pkg_config(dir: Option<&Path>) -> Result<Spdk, String> {
    if let Some(d) = dir {
        // pkg-config reads PKG_CONFIG_PATH from the environment; the build script is the
        // only process that sees this change.
        let mut path = d.as_os_str().to_owned();
        if let Some(old) = env::var_os("PKG_CONFIG_PATH") {
            path.push(":");
            path.push(old);
        }
        env::set_var("PKG_CONFIG_PATH", path);
    }
    let mut include = Vec::new();
    let mut search = Vec::new();
    let mut libs = Vec::new();
    let mut syslibs = Vec::new();
    for pkg in PC_PACKAGES {
        let lib = pkg_config::Config::new()
            .cargo_metadata(false)
            .env_metadata(false)
            .probe(pkg)
            .map_err(|e| format!("pkg-config {pkg}: {e}"))?;
        for p in lib.include_paths {
            if !include.contains(&p) {
                include.push(p);
            }
        }
        for p in lib.link_paths {
            if !search.contains(&p) {
                search.push(p);
            }
        }
        // DPDK's and the system's libraries: SPDK's .so files rely on them being loaded.
        for l in lib.libs.iter().filter(|l| !l.starts_with("spdk_")) {
            if !syslibs.contains(l) {
                syslibs.push(l.clone());
            }
        }
        for l in lib.libs {
            if !libs.contains(&l) {
                libs.push(l);
            }
        }
    }
    let lib_dir = search
        .iter()
        .find(|d| d.join("libspdk_bdev.so").exists())
        .cloned()
        .ok_or("pkg-config gave no directory holding libspdk_bdev.so")?;
    if !include
        .iter()
        .any(|d| d.join("spdk/bdev_module.h").is_file())
    {
        // spdk_bdev.pc of an install prefix names <prefix>/include.
        let guess = lib_dir.parent().map(|p| p.join("include"));
        match guess {
            Some(g) if g.join("spdk/bdev_module.h").is_file() => include.push(g),
            _ => return Err("pkg-config gave no include directory with spdk/".into()),
        }
    }
    Ok(Spdk {
        include,
        lib_dir,
        search,
        libs,
        syslibs,
    })
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
    cc.file("c/shim.c").include("c").warnings(true).pic(true);
    // SPDK's own headers have unused parameters in inline helpers.
    cc.flag_if_supported("-Wno-unused-parameter");
    for inc in &spdk.include {
        cc.include(inc);
    }
    cc.compile("spdk_sys_shim");
}

fn emit_link(spdk: &Spdk) {
    for d in &spdk.search {
        println!("cargo:rustc-link-search=native={}", d.display());
    }
    for l in &spdk.libs {
        println!("cargo:rustc-link-lib=dylib={l}");
    }
    println!("cargo:lib_dir={}", spdk.lib_dir.display());
    // Executables linked with --as-needed drop these (nothing of theirs references
    // them), and then SPDK's libraries fail to load: the root crate links them again
    // with --no-as-needed.
    println!("cargo:syslibs={}", spdk.syslibs.join(" "));
    if let Some(inc) = spdk.include.first() {
        println!("cargo:include={}", inc.display());
    }
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
}
