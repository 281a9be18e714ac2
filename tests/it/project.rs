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
