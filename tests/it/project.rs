//! Checks on the project's own files: what they declare is true.

use std::path::{Path, PathBuf};

/// `(major, minor)` of a `rust-version = "1.89"` line in a manifest's
/// `[package]` section.
fn rust_version(manifest: &str) -> Option<(u32, u32)> {
    let mut in_package = false;
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_package = line == "[package]";
            continue;
        }
        if !in_package {
            continue;
        }
        let Some(value) = line.strip_prefix("rust-version") else {
            continue;
        };
        let value = value
            .trim_start()
            .strip_prefix('=')?
            .trim()
            .trim_matches('"');
        let mut parts = value.split('.').map(|p| p.parse::<u32>().ok());
        return Some((parts.next()??, parts.next().flatten().unwrap_or(0)));
    }
    None
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(&std::env::var_os("HOME").unwrap_or_default()).join(".cargo"))
}

/// Cargo.toml's `rust-version` is no lower than what any crate pinned in
/// Cargo.lock declares it needs (read from the crates cargo downloaded).
#[test]
fn declared_rust_version_covers_the_lock_file() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let declared = rust_version(&std::fs::read_to_string(root.join("Cargo.toml")).unwrap())
        .expect("Cargo.toml declares rust-version");
    let lock = std::fs::read_to_string(root.join("Cargo.lock")).unwrap();
    let registries: Vec<PathBuf> = std::fs::read_dir(cargo_home().join("registry/src"))
        .map(|dirs| dirs.flatten().map(|d| d.path()).collect())
        .unwrap_or_default();
    let mut needed = (0, 0);
    let mut checked = 0;
    for package in lock.split("[[package]]").skip(1) {
        let field = |name: &str| {
            package.lines().find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|v| v.trim().strip_prefix('='))
                    .map(|v| v.trim().trim_matches('"').to_string())
            })
        };
        let (Some(name), Some(version), Some(_)) =
            (field("name "), field("version "), field("source "))
        else {
            continue; // our own crate
        };
        for registry in &registries {
            let manifest = registry.join(format!("{name}-{version}/Cargo.toml"));
            if let Ok(text) = std::fs::read_to_string(&manifest) {
                checked += 1;
                if let Some(v) = rust_version(&text) {
                    if v > needed {
                        needed = v;
                        eprintln!("{name} {version} needs Rust {}.{}", v.0, v.1);
                    }
                }
                break;
            }
        }
    }
    assert!(
        checked > 50,
        "only {checked} locked crates found under {:?}",
        cargo_home()
    );
    assert!(
        declared >= needed,
        "Cargo.toml says rust-version {}.{}, but the locked crates need {}.{}",
        declared.0,
        declared.1,
        needed.0,
        needed.1
    );
}

/// Every source file under `src/`, by its module path (`relay::mover`;
/// `relay` for `relay/mod.rs`), with its text up to its unit tests and
/// without comment lines.
fn modules() -> std::collections::BTreeMap<String, String> {
    fn walk(dir: &std::path::Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    files
        .into_iter()
        .map(|path| {
            let relative = path.strip_prefix(&src).unwrap().with_extension("");
            let mut module = relative.to_string_lossy().replace('/', "::");
            if let Some(parent) = module.strip_suffix("::mod") {
                module = parent.to_string();
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
            let code: Vec<&str> = code
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect();
            (module, code.join("\n"))
        })
        .collect()
}

/// The modules `code` (of `module`) names through `crate::` or `super::`
/// paths, each resolved to the longest module path that exists.
fn imports(
    module: &str,
    code: &str,
    known: &std::collections::BTreeMap<String, String>,
) -> std::collections::BTreeSet<String> {
    let mut found = std::collections::BTreeSet::new();
    // `super::` of `a::b` (a/b.rs or a/b/mod.rs alike) is `a`.
    let parent = module
        .rsplit_once("::")
        .map_or("", |(parent, _)| parent)
        .to_string();
    for (prefix, base) in [("crate::", String::new()), ("super::", parent)] {
        for (at, _) in code.match_indices(prefix) {
            let rest: String = code[at + prefix.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            let full = if base.is_empty() {
                rest
            } else {
                format!("{base}::{rest}")
            };
            let parts: Vec<&str> = full.split("::").filter(|p| !p.is_empty()).collect();
            let target = (1..=parts.len())
                .rev()
                .map(|n| parts[..n].join("::"))
                .find(|candidate| known.contains_key(candidate));
            if let Some(target) = target {
                // A module naming its own parent's items is not an import
                // of another file's concern (mod.rs is the module's face).
                if target != module && !module.starts_with(&format!("{target}::")) {
                    found.insert(target);
                }
            }
        }
    }
    found
}

/// Issue 27: no two source files import each other, directly or through
/// others (the four circles it named: http ↔ app::api, group::consumer ↔
/// group::membership, metrics ↔ relay/group, outbox ↔ relay).
#[test]
fn no_source_files_import_each_other_in_a_circle() {
    let modules = modules();
    let graph: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> = modules
        .iter()
        .map(|(module, code)| (module.clone(), imports(module, code, &modules)))
        .collect();
    // A depth-first search that reports the first circle it walks into.
    fn visit(
        module: &str,
        graph: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut std::collections::BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|m| m == module) {
            let mut circle = path[at..].to_vec();
            circle.push(module.to_string());
            return Some(circle);
        }
        if done.contains(module) {
            return None;
        }
        path.push(module.to_string());
        for next in graph.get(module).into_iter().flatten() {
            if let Some(circle) = visit(next, graph, path, done) {
                return Some(circle);
            }
        }
        path.pop();
        done.insert(module.to_string());
        None
    }
    let mut done = std::collections::BTreeSet::new();
    for module in graph.keys() {
        let circle = visit(module, &graph, &mut Vec::new(), &mut done);
        assert!(
            circle.is_none(),
            "an import circle: {}",
            circle.unwrap().join(" → ")
        );
    }
}

/// Issue 27: rooms of one concern each — no source file over 600 lines.
#[test]
fn no_source_file_is_over_600_lines() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let long: Vec<String> = modules()
        .keys()
        .filter_map(|module| {
            let base = src.join(module.replace("::", "/"));
            let path = if base.join("mod.rs").exists() {
                base.join("mod.rs")
            } else {
                base.with_extension("rs")
            };
            let lines = std::fs::read_to_string(&path).ok()?.lines().count();
            (lines > 600).then(|| format!("{} ({lines} lines)", path.display()))
        })
        .collect();
    assert!(long.is_empty(), "split by concern: {long:?}");
}
