//! Source hygiene checks over `src/`, run as ordinary tests.
//!
//! - `engine_is_sans_io`: nothing under `src/engine/` uses `unsafe`, the file system,
//!   the network, threads, clocks, io_uring, SPDK or libc (the engine is a
//!   deterministic library; environments live in `src/env/`).
//! - `unsafe_is_documented`: every `unsafe` block and `unsafe impl` anywhere in `src/`
//!   has a `// SAFETY:` comment on its line, within the 3 lines above it, or in the
//!   comment block directly above it; an `unsafe fn` (or `unsafe trait`) may instead
//!   carry a `# Safety` section in its doc comment.
//! - `files_have_module_docs`: every `.rs` file under `src/` starts with a `//!`
//!   paragraph stating its role.
//! - `files_are_short`: no file under `src/` exceeds 800 lines before its test module.
//! - `layers_point_one_way`: engine <- runtime <- env <- frontend <- bin: the engine
//!   names none of the others, the runtime core (`src/runtime`) is sans-I/O like the
//!   engine and names neither env nor frontend outside its tests, env never names the
//!   front end, and the SPDK module (`src/env/spdk`) never the embedded runtime
//!   (`env::posix`; the medium mapping both use is `env::medium`).
//! - `no_import_cycles`: within each folder listed in `ACYCLIC`, the files' imports
//!   of each other form no cycle.
//! - `spdk_module_crate_has_no_unsafe`: the SPDK module crate (`spdk-module/src`) only
//!   makes pcache's code a shared object: no `unsafe`, no `#[no_mangle]` or
//!   `link_section` of its own, and a `//!` header (its unsafe code stays in `src/env`).
//!
//! Matching is done on code with comments and string/char literal contents blanked out
//! (a small lexer below), at identifier boundaries, so `unsafe_code` or `"unsafe"` in
//! a message do not count. Each check prints what it looked at and every offender.

use std::path::{Path, PathBuf};

/// Longest allowed source file, in lines before its `#[cfg(test)]` module.
const MAX_LINES: usize = 800;
/// How many lines above an `unsafe` the `// SAFETY:` comment may sit.
const SAFETY_WINDOW: usize = 3;
/// Identifiers and paths the engine must not mention.
const ENGINE_FORBIDDEN: [&str; 9] = [
    "unsafe",
    "std::fs",
    "std::net",
    "std::thread",
    "Instant",
    "SystemTime",
    "io_uring",
    "spdk_sys",
    "libc::",
];

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        for e in entries {
            let p = e.expect("directory entry").path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn rel(p: &Path) -> String {
    p.strip_prefix(env!("CARGO_MANIFEST_DIR"))
        .unwrap_or(p)
        .display()
        .to_string()
}

/// The code of each line of `src`, with comments removed and the contents of string
/// and char literals replaced by spaces (the quotes stay). Handles nested block
/// comments, escapes, raw strings (`r"…"`, `r#"…"#`, `br"…"`) and tells char literals
/// from lifetimes.
fn code_lines(src: &str) -> Vec<String> {
    let c: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    let mut depth = 0usize; // block comment nesting
    while i < c.len() {
        let ch = c[i];
        let next = c.get(i + 1).copied();
        if depth > 0 {
            if ch == '/' && next == Some('*') {
                depth += 1;
                i += 2;
            } else if ch == '*' && next == Some('/') {
                depth -= 1;
                i += 2;
            } else {
                if ch == '\n' {
                    out.push('\n');
                }
                i += 1;
            }
            continue;
        }
        match ch {
            '/' if next == Some('/') => {
                while i < c.len() && c[i] != '\n' {
                    i += 1;
                }
            }
            '/' if next == Some('*') => {
                depth = 1;
                i += 2;
            }
            'r' if (next == Some('"') || next == Some('#'))
                && (i == 0
                    || !is_ident(c[i - 1])
                    || (c[i - 1] == 'b' && (i < 2 || !is_ident(c[i - 2])))) =>
            {
                // Raw string: r, hashes, quote ... quote, hashes.
                let mut j = i + 1;
                let mut hashes = 0;
                while c.get(j) == Some(&'#') {
                    hashes += 1;
                    j += 1;
                }
                if c.get(j) != Some(&'"') {
                    out.push(ch);
                    i += 1;
                    continue;
                }
                out.push_str("r\"");
                j += 1;
                loop {
                    match c.get(j) {
                        None => break,
                        Some('"') if (1..=hashes).all(|k| c.get(j + k) == Some(&'#')) => {
                            j += 1 + hashes;
                            break;
                        }
                        Some('\n') => out.push('\n'),
                        Some(_) => out.push(' '),
                    }
                    j += 1;
                }
                out.push('"');
                i = j;
            }
            '"' => {
                out.push('"');
                i += 1;
                while i < c.len() && c[i] != '"' {
                    if c[i] == '\\' {
                        out.push(' ');
                        i += 1;
                    }
                    if i < c.len() {
                        out.push(if c[i] == '\n' { '\n' } else { ' ' });
                        i += 1;
                    }
                }
                out.push('"');
                i += 1;
            }
            '\'' => {
                // Char literal ('x', '\n', '\u{..}') or a lifetime ('a).
                if next == Some('\\') {
                    let mut j = i + 2;
                    while j < c.len() && c[j] != '\'' && c[j] != '\n' {
                        j += 1;
                    }
                    out.push_str("' '");
                    i = j + 1;
                } else if c.get(i + 2) == Some(&'\'') {
                    out.push_str("' '");
                    i += 3;
                } else {
                    out.push('\'');
                    i += 1;
                }
            }
            _ => {
                out.push(ch);
                i += 1;
            }
        }
    }
    out.split('\n').map(str::to_owned).collect()
}

fn is_ident(ch: char) -> bool {
    ch.is_alphanumeric() || ch == '_'
}

/// Whether `code` contains `word` starting and (if it ends in an identifier
/// character) ending at identifier boundaries.
fn has_word(code: &str, word: &str) -> bool {
    find_words(code, word).next().is_some()
}

/// Byte offsets of the occurrences of `word` at identifier boundaries.
fn find_words<'a>(code: &'a str, word: &'a str) -> impl Iterator<Item = usize> + 'a {
    code.match_indices(word).map(|(i, _)| i).filter(move |&i| {
        let before = code[..i].chars().next_back();
        let after = code[i + word.len()..].chars().next();
        let head_ok = before.is_none_or(|b| !is_ident(b) || !word.starts_with(is_ident));
        let tail_ok = !word.ends_with(is_ident) || after.is_none_or(|a| !is_ident(a));
        head_ok && tail_ok
    })
}

/// What follows an `unsafe` keyword.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UnsafeKind {
    Block,
    Fn,
    Impl,
    Trait,
    /// `unsafe extern "C" {` and anything else: treated like a block.
    Other,
}

/// The `unsafe` keywords of a code line and what each introduces. Looks ahead into the
/// following code lines when the keyword ends a line.
fn unsafe_uses(code: &[String], line: usize) -> Vec<UnsafeKind> {
    let rest: String = code[line..code.len().min(line + 4)].join(" ");
    let first_len = code[line].len();
    find_words(&rest, "unsafe")
        .filter(|&i| i < first_len)
        .map(|i| {
            let after = rest[i + "unsafe".len()..].trim_start();
            let mut words = after
                .split(|ch: char| !is_ident(ch))
                .filter(|w| !w.is_empty());
            if after.starts_with('{') {
                UnsafeKind::Block
            } else {
                match words.next() {
                    Some("fn") => UnsafeKind::Fn,
                    Some("impl") => UnsafeKind::Impl,
                    Some("trait") => UnsafeKind::Trait,
                    Some("extern") => {
                        // `unsafe extern "C" fn` is a function; `unsafe extern {` a block.
                        let tail = after.trim_start_matches("extern").trim_start();
                        let tail = tail
                            .trim_start_matches(|ch: char| ch == '"' || is_ident(ch) || ch == ' ');
                        if tail.starts_with('{') {
                            UnsafeKind::Other
                        } else {
                            UnsafeKind::Fn
                        }
                    }
                    _ => UnsafeKind::Other,
                }
            }
        })
        .collect()
}

/// Whether the `unsafe` on `line` is justified: `SAFETY:` in a comment on the line,
/// within `SAFETY_WINDOW` lines above, or in the comment block directly above (over
/// attributes); for functions and traits, a `# Safety` doc section also counts.
fn justified(raw: &[&str], line: usize, kind: UnsafeKind) -> bool {
    let comment_of = |l: &str| l.find("//").map(|i| l[i..].to_owned()).unwrap_or_default();
    if comment_of(raw[line]).contains("SAFETY:") {
        return true;
    }
    let lo = line.saturating_sub(SAFETY_WINDOW);
    if raw[lo..line]
        .iter()
        .any(|l| comment_of(l).contains("SAFETY:"))
    {
        return true;
    }
    let mut i = line;
    while i > 0 {
        i -= 1;
        let t = raw[i].trim_start();
        let is_comment = t.starts_with("//");
        let is_attr = t.starts_with("#[") || t.starts_with("#![");
        if !(is_comment || is_attr) {
            break;
        }
        if t.contains("SAFETY:") {
            return true;
        }
        if matches!(kind, UnsafeKind::Fn | UnsafeKind::Trait)
            && t.starts_with("///")
            && t.trim_start_matches('/').trim() == "# Safety"
        {
            return true;
        }
    }
    false
}

/// Offenders of the sans-I/O rule in one file: (line number, token, line).
fn engine_offenders(src: &str) -> Vec<(usize, &'static str, String)> {
    let raw: Vec<&str> = src.lines().collect();
    let mut out = vec![];
    for (n, code) in code_lines(src).iter().enumerate() {
        if raw.get(n).is_some_and(|l| l.trim_start().starts_with("//")) {
            continue;
        }
        for tok in ENGINE_FORBIDDEN {
            if has_word(code, tok) {
                out.push((n + 1, tok, raw.get(n).unwrap_or(&"").trim().to_owned()));
            }
        }
    }
    out
}

/// Undocumented `unsafe` in one file: (line number, kind, line).
fn unsafe_offenders(src: &str) -> (usize, Vec<(usize, UnsafeKind, String)>) {
    let raw: Vec<&str> = src.lines().collect();
    let code = code_lines(src);
    let mut seen = 0;
    let mut out = vec![];
    for n in 0..code.len().min(raw.len()) {
        for kind in unsafe_uses(&code, n) {
            seen += 1;
            if !justified(&raw, n, kind) {
                out.push((n + 1, kind, raw[n].trim().to_owned()));
            }
        }
    }
    (seen, out)
}

/// Whether the file opens with a `//!` module doc (the first non-blank line).
fn has_module_doc(src: &str) -> bool {
    src.lines()
        .find(|l| !l.trim().is_empty())
        .is_some_and(|l| l.trim_start().starts_with("//!"))
}

#[test]
fn spdk_module_crate_has_no_unsafe() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("spdk-module/src");
    let files = rust_files(&dir);
    assert!(!files.is_empty(), "no files under spdk-module/src");
    let mut bad = vec![];
    for f in &files {
        let src = read(f);
        if !has_module_doc(&src) {
            bad.push(format!("{}: no //! header", rel(f)));
        }
        for (n, line) in code_lines(&src).iter().enumerate() {
            for word in ["unsafe", "no_mangle", "link_section", "export_name"] {
                if has_word(line, word) {
                    bad.push(format!(
                        "{}:{}: `{word}` in: {}",
                        rel(f),
                        n + 1,
                        line.trim()
                    ));
                }
            }
        }
    }
    println!("spdk-module: checked {} files", files.len());
    assert!(bad.is_empty(), "spdk-module/src:\n{}", bad.join("\n"));
}

#[test]
fn engine_is_sans_io() {
    let files = rust_files(&src_dir().join("engine"));
    assert!(!files.is_empty(), "no files under src/engine");
    let mut bad = vec![];
    for f in &files {
        for (n, tok, line) in engine_offenders(&read(f)) {
            bad.push(format!("{}:{n}: `{tok}` in: {line}", rel(f)));
        }
    }
    println!(
        "sans-I/O: checked {} files under src/engine for {:?}",
        files.len(),
        ENGINE_FORBIDDEN
    );
    for b in &bad {
        println!("  {b}");
    }
    assert!(
        bad.is_empty(),
        "{} forbidden uses in src/engine:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

#[test]
fn unsafe_is_documented() {
    let files = rust_files(&src_dir());
    let mut bad = vec![];
    let mut seen = 0;
    for f in &files {
        let (n, offenders) = unsafe_offenders(&read(f));
        seen += n;
        for (line, kind, text) in offenders {
            bad.push(format!(
                "{}:{line}: {kind:?} without SAFETY: {text}",
                rel(f)
            ));
        }
    }
    println!(
        "unsafe: checked {} files under src, {seen} unsafe blocks/fns/impls, {} undocumented",
        files.len(),
        bad.len()
    );
    for b in &bad {
        println!("  {b}");
    }
    assert!(bad.is_empty(), "undocumented unsafe:\n{}", bad.join("\n"));
}

#[test]
fn files_have_module_docs() {
    let files = rust_files(&src_dir());
    let bad: Vec<String> = files
        .iter()
        .filter(|f| !has_module_doc(&read(f)))
        .map(|f| rel(f))
        .collect();
    println!(
        "module docs: checked {} files under src for a leading //! paragraph",
        files.len()
    );
    for b in &bad {
        println!("  missing: {b}");
    }
    assert!(
        bad.is_empty(),
        "files without a leading //! doc:\n{}",
        bad.join("\n")
    );
}

#[test]
fn files_are_short() {
    let files = rust_files(&src_dir());
    let mut sizes: Vec<(usize, String)> = files
        .iter()
        .map(|f| {
            let src = read(f);
            let n = src
                .lines()
                .position(|l| l.starts_with("#[cfg(test)]"))
                .unwrap_or(src.lines().count());
            (n, rel(f))
        })
        .collect();
    sizes.sort_by(|a, b| b.cmp(a));
    let bad: Vec<String> = sizes
        .iter()
        .filter(|(n, _)| *n > MAX_LINES)
        .map(|(n, f)| format!("{f}: {n} lines"))
        .collect();
    println!(
        "length: checked {} files under src against {MAX_LINES} lines; longest: {}",
        files.len(),
        sizes
            .iter()
            .take(3)
            .map(|(n, f)| format!("{f} ({n})"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for b in &bad {
        println!("  too long: {b}");
    }
    assert!(
        bad.is_empty(),
        "files over {MAX_LINES} lines:\n{}",
        bad.join("\n")
    );
}

/// Paths a layer must not name, by folder under `src/` (outside test modules).
const LAYER_RULES: [(&str, &[&str]); 5] = [
    (
        "engine",
        &["crate::runtime", "crate::env", "crate::frontend"],
    ),
    ("runtime", &["crate::env", "crate::frontend"]),
    ("env", &["crate::frontend"]),
    ("env/spdk", &["env::posix"]),
    ("frontend", &["crate::runtime::attach"]),
];

/// Folders whose files must not import each other in a cycle (`env/spdk` is checked
/// whether or not this build has the feature: the check reads the sources).
const ACYCLIC: [&str; 8] = [
    "env/spdk",
    "engine",
    "runtime",
    "env/medium",
    "env/posix",
    "env/posix/volume",
    "env/posix/backing",
    "frontend/nbd",
];

/// The lines of `src` before its test module, comments and literals blanked.
fn non_test_code(src: &str) -> Vec<String> {
    let code = code_lines(src);
    let end = src
        .lines()
        .position(|l| l.starts_with("#[cfg(test)]"))
        .unwrap_or(code.len());
    code.into_iter().take(end).collect()
}

#[test]
fn layers_point_one_way() {
    let mut bad = vec![];
    let mut checked = 0;
    for (dir, forbidden) in LAYER_RULES {
        let files = rust_files(&src_dir().join(dir));
        assert!(
            !files.is_empty() || dir == "env/spdk",
            "no files under src/{dir}"
        );
        for f in &files {
            checked += 1;
            for (n, line) in non_test_code(&read(f)).iter().enumerate() {
                for path in forbidden {
                    if line.contains(path) {
                        bad.push(format!(
                            "{}:{}: src/{dir} names `{path}`: {}",
                            rel(f),
                            n + 1,
                            line.trim()
                        ));
                    }
                }
            }
        }
    }
    // The runtime core is sans-I/O, as the engine.
    for f in rust_files(&src_dir().join("runtime")) {
        for (n, tok, line) in engine_offenders(&non_test_code(&read(&f)).join("\n")) {
            bad.push(format!(
                "{}:{n}: `{tok}` in the runtime core: {line}",
                rel(&f)
            ));
        }
    }
    println!(
        "layers: checked {checked} files against {} rules",
        LAYER_RULES.len()
    );
    for b in &bad {
        println!("  {b}");
    }
    assert!(bad.is_empty(), "layer violations:\n{}", bad.join("\n"));
}

/// The sibling modules a file imports: `super::x`, `super::{x, y::z}`, or
/// `crate::<dir path>::x` for the folder `dir` (module names as in `sibs`).
fn sibling_imports(code: &[String], dir: &str, sibs: &[String]) -> Vec<String> {
    let own = format!("crate::{}::", dir.replace('/', "::"));
    let mut out = vec![];
    for line in code {
        let mut rest: Vec<&str> = vec![];
        for pre in ["super::", own.as_str()] {
            let mut at = 0;
            while let Some(i) = line[at..].find(pre) {
                rest.push(&line[at + i + pre.len()..]);
                at += i + pre.len();
            }
        }
        for r in rest {
            let group = r
                .strip_prefix('{')
                .map(|g| g.split('}').next().unwrap_or(""));
            let names: Vec<&str> = match group {
                Some(g) => g
                    .split(',')
                    .map(|x| x.trim().split("::").next().unwrap_or(""))
                    .collect(),
                None => vec![r
                    .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .next()
                    .unwrap_or("")],
            };
            for n in names {
                if sibs.iter().any(|s| s == n) && !out.iter().any(|o| o == n) {
                    out.push(n.to_string());
                }
            }
        }
    }
    out
}

#[test]
fn no_import_cycles() {
    let mut bad = vec![];
    for dir in ACYCLIC {
        let path = src_dir().join(dir);
        // The folder's own files (not its subfolders): module name -> file.
        let mut files: Vec<(String, PathBuf)> = std::fs::read_dir(&path)
            .unwrap_or_else(|e| panic!("src/{dir}: {e}"))
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "rs"))
            .map(|p| (p.file_stem().unwrap().to_string_lossy().into_owned(), p))
            .filter(|(m, _)| m != "mod" && m != "tests" && !m.ends_with("_tests"))
            .collect();
        files.sort();
        let sibs: Vec<String> = files.iter().map(|(m, _)| m.clone()).collect();
        let edges: Vec<Vec<String>> = files
            .iter()
            .map(|(m, f)| {
                let mut e = sibling_imports(&non_test_code(&read(f)), dir, &sibs);
                e.retain(|x| x != m);
                e
            })
            .collect();
        // Depth-first search for a back edge.
        fn visit(
            i: usize,
            edges: &[Vec<String>],
            sibs: &[String],
            state: &mut [u8],
            path: &mut Vec<usize>,
        ) -> Option<Vec<usize>> {
            state[i] = 1;
            path.push(i);
            for e in &edges[i] {
                let j = sibs.iter().position(|s| s == e).expect("a sibling");
                if state[j] == 1 {
                    let k = path.iter().position(|&x| x == j).unwrap();
                    return Some(path[k..].to_vec());
                }
                if state[j] == 0 {
                    if let Some(c) = visit(j, edges, sibs, state, path) {
                        return Some(c);
                    }
                }
            }
            path.pop();
            state[i] = 2;
            None
        }
        let mut state = vec![0u8; sibs.len()];
        for i in 0..sibs.len() {
            if state[i] == 0 {
                if let Some(c) = visit(i, &edges, &sibs, &mut state, &mut vec![]) {
                    let names: Vec<&str> = c.iter().map(|&k| sibs[k].as_str()).collect();
                    bad.push(format!("src/{dir}: {} -> {}", names.join(" -> "), names[0]));
                    break;
                }
            }
        }
        println!(
            "cycles: src/{dir}: {} files, {} imports",
            sibs.len(),
            edges.iter().map(Vec::len).sum::<usize>()
        );
    }
    assert!(bad.is_empty(), "import cycles:\n{}", bad.join("\n"));
}

#[test]
fn cycle_checker_self_test() {
    let sibs: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
    let code = vec![
        "use super::{a, b::X};".to_string(),
        "use crate::engine::c::Y; let z = super::a::f();".to_string(),
    ];
    assert_eq!(sibling_imports(&code, "engine", &sibs), vec!["a", "b", "c"]);
}

/// The checkers themselves, on synthetic sources.
#[test]
fn checkers_self_test() {
    // Comments, strings, raw strings, chars and identifiers containing a token.
    let ok = "//! doc\n#![forbid(unsafe_code)]\n// unsafe here\nlet s = \"std::fs unsafe\";\n\
              let r = r#\"Instant \"quoted\" \"#; let c = '\"'; let l: &'a str = x; /* unsafe\n \
              std::thread */ let instant_ok = my_unsafe;\n";
    assert_eq!(engine_offenders(ok), vec![], "{:?}", code_lines(ok));
    let bad =
        "//! doc\nuse std::fs::File;\nlet t = Instant::now(); unsafe { x() }\nlibc::close(1);\n";
    let found: Vec<_> = engine_offenders(bad)
        .into_iter()
        .map(|(n, t, _)| (n, t))
        .collect();
    assert_eq!(
        found,
        vec![(2, "std::fs"), (3, "unsafe"), (3, "Instant"), (4, "libc::")]
    );

    let src = "\
//! doc
fn a() {
    // SAFETY: fine.
    let x = unsafe { f() };
    let a = 1;
    let b = 2;
    let c = 3;
    let y = unsafe { g() };
}
/// Does things.
///
/// # Safety
/// The caller must.
#[inline]
pub unsafe fn h() {}
pub unsafe fn i() {}
// SAFETY: Send is fine: the pointer is owned.
unsafe impl Send for X {}
struct Y;
struct Z;
struct W;
unsafe impl Sync for X {}
// SAFETY: a long
// explanation
// over
// several
// lines.
let z = unsafe {
    k()
};
let w = unsafe { l() }; // SAFETY: trailing.
";
    let (seen, bad) = unsafe_offenders(src);
    let bad: Vec<_> = bad.into_iter().map(|(n, k, _)| (n, k)).collect();
    assert_eq!(seen, 8);
    assert_eq!(
        bad,
        vec![
            (8, UnsafeKind::Block),
            (16, UnsafeKind::Fn),
            (22, UnsafeKind::Impl)
        ]
    );
    let (_, ext) = unsafe_offenders("//! d\npub unsafe extern \"C\" fn f() {}\n");
    assert_eq!(ext.len(), 1);
    assert_eq!(ext[0].1, UnsafeKind::Fn);

    assert!(has_module_doc("\n//! Role.\nuse x;\n"));
    assert!(!has_module_doc("// Copyright\n//! Role.\n"));
    assert!(!has_module_doc("use x;\n"));
}
