//! The layers of `src/` point one way: every file has a rank, and a file may use only files of a
//! lower rank (see ARCHITECTURE.md). Read from the source text of `use crate::...` paths.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Ranks, most specific prefix first; a file may import only strictly lower ranks.
const RANKS: &[(&str, u32)] = &[
    ("alloc_probe", 0),
    ("protocol", 0),
    ("config", 0),
    ("files", 0),
    ("quota", 1),
    ("framing", 1),
    ("metrics", 1),
    ("auth", 1),
    ("error", 2),
    ("cli", 3),
    ("db::sqlite", 10),
    ("db::pg", 11),
    ("db::store", 12),
    ("db::row_store", 12),
    ("db::pg_store", 13),
    ("db::pg_rows", 13),
    ("db::outbox", 14),
    ("db", 15),
    ("realtime::history", 20),
    ("realtime::rate_limit", 20),
    ("realtime::frames", 20),
    ("realtime::registry", 20),
    ("realtime::ack_buffer", 21),
    ("realtime::redis", 21),
    ("realtime::outbox", 22),
    ("realtime::room", 23),
    ("realtime::broker", 24),
    ("realtime::presence", 25),
    ("jobs::progress", 30),
    ("jobs::csv", 30),
    ("jobs::webhooks", 30),
    ("jobs::zone", 31),
    ("jobs::job", 32),
    ("jobs::external", 32),
    ("jobs::export", 32),
    ("jobs::downloads", 30),
    ("jobs::scheduler", 33),
    ("jobs::lookup", 34),
    ("jobs", 39),
    ("realtime::session", 40),
    ("realtime::echo", 40),
    ("realtime", 41),
    ("http::shared", 50),
    ("http::extract", 51),
    ("http", 54),
    ("http::ws", 52),
    ("http::admin", 52),
    ("http::jobs", 52),
    ("http::upload", 52),
    ("http::tus", 53),
    ("http::exports", 52),
    ("http::workers", 52),
    ("http::webhooks", 52),
];

fn rank(module: &str) -> Option<u32> {
    RANKS
        .iter()
        .filter(|(prefix, _)| module == *prefix || module.starts_with(&format!("{prefix}::")))
        .max_by_key(|(prefix, _)| prefix.len())
        .map(|(_, r)| *r)
}

/// `src/a/b.rs` → `a::b`; `src/a/mod.rs` → `a`.
fn module_of(path: &Path, src: &Path) -> String {
    let rel = path.strip_prefix(src).unwrap().with_extension("");
    let parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().to_string()).collect();
    let parts: Vec<&str> = parts.iter().map(String::as_str).filter(|p| *p != "mod").collect();
    parts.join("::")
}

/// Every `crate::a::b` path in the file's code (test modules at the end are left out), brace groups
/// of a `use` expanded one level.
fn imports(text: &str) -> Vec<String> {
    let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or(text);
    // Comments may name anything; only code counts.
    let code: String = code.lines().filter(|l| !l.trim_start().starts_with("//")).map(|l| format!("{l}\n")).collect();
    let code = code.as_str();
    let mut out = Vec::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        let path: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':').collect();
        let path = path.trim_end_matches(':').to_string();
        let after = &rest[path.len()..].trim_start_matches(':');
        if after.starts_with('{') {
            let group = &after[1..after.find('}').unwrap_or(after.len())];
            for item in group.split(',') {
                let item = item.trim().split("::").next().unwrap_or("").split(' ').next().unwrap_or("");
                if !item.is_empty() && item != "self" {
                    out.push(format!("{path}::{item}"));
                }
            }
        }
        out.push(path);
    }
    out
}

/// The back edges among `files`: (file, imported module, their ranks).
fn back_edges(files: &BTreeMap<String, String>) -> Vec<String> {
    let mut bad = Vec::new();
    for (module, text) in files {
        if module == "lib" || module == "main" {
            continue;
        }
        let Some(mine) = rank(module) else {
            bad.push(format!("{module} has no rank in RANKS"));
            continue;
        };
        for import in imports(text) {
            // The longest prefix of the import that is one of the files.
            let segments: Vec<&str> = import.split("::").collect();
            let target = (1..=segments.len()).rev().map(|n| segments[..n].join("::")).find(|m| files.contains_key(m));
            let Some(target) = target else { continue };
            if target == *module {
                continue;
            }
            match rank(&target) {
                Some(theirs) if theirs < mine => {}
                theirs => bad.push(format!("{module} (rank {mine}) uses {target} (rank {theirs:?})")),
            }
        }
    }
    bad
}

fn source_files() -> BTreeMap<String, String> {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.insert(module_of(&path, &src), std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    files
}

#[test]
fn no_layer_imports_one_above_it() {
    let files = source_files();
    assert!(files.contains_key("realtime::session") && files.contains_key("db::row_store"), "{:?}", files.keys());
    let bad = back_edges(&files);
    assert!(bad.is_empty(), "dependencies that point up:\n{}", bad.join("\n"));
}

#[test]
fn a_back_edge_is_found() {
    let mut files = source_files();
    let mut add = |module: &str, line: &str| {
        let text = files.get_mut(module).unwrap();
        text.insert_str(0, line);
    };
    add("realtime::room", "use crate::realtime::session::Session;\n");
    add("db::store", "use crate::db::row_store::{RowStore, Row};\n");
    add("jobs::job", "use crate::jobs::scheduler::Scheduler;\n");
    add("realtime::broker", "fn f() { crate::http::routes; }\n");
    let bad = back_edges(&files);
    for (from, to) in [
        ("realtime::room", "realtime::session"),
        ("db::store", "db::row_store"),
        ("jobs::job", "jobs::scheduler"),
        ("realtime::broker", "http"),
    ] {
        assert!(
            bad.iter().any(|b| b.starts_with(&format!("{from} ")) && b.contains(&format!("uses {to} "))),
            "{bad:?}"
        );
    }
}
