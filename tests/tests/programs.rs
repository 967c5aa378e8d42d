//! The external programs the tests, benchmarks and runtime start are all
//! listed in `tests/src/programs.rs`, each with a package setup.sh installs,
//! and all installed. No KVM, no root: these read files and PATH.

use std::collections::BTreeSet;
use std::path::Path;

use husk_tests::programs::{require, ESSENTIAL, PROGRAMS};
use husk_tests::repo_root;

/// Every file under `dir` (recursively) whose name passes `keep`, skipping
/// build output.
fn files(dir: &Path, keep: &dyn Fn(&Path) -> bool, out: &mut Vec<std::path::PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name == "target" || name.starts_with('.') || name == "__pycache__" {
            continue;
        }
        if p.is_dir() {
            files(&p, keep, out);
        } else if keep(&p) {
            out.push(p);
        }
    }
}

/// The string literals that follow `marker` in `text`, e.g. the program of
/// every `Command::new("...")`.
fn literals_after(text: &str, marker: &str) -> Vec<String> {
    text.match_indices(marker)
        .filter_map(|(i, _)| {
            let rest = &text[i + marker.len()..];
            let end = rest.find('"')?;
            Some(rest[..end].to_string())
        })
        .collect()
}

/// The programs the sources start by a literal name.
fn started_programs() -> BTreeSet<String> {
    let root = repo_root();
    let mut rust = Vec::new();
    files(
        &root,
        &|p| p.extension().is_some_and(|e| e == "rs"),
        &mut rust,
    );
    let mut found = BTreeSet::new();
    for f in &rust {
        let text = std::fs::read_to_string(f).unwrap();
        for marker in ["Command::new(\"", "require(\""] {
            found.extend(literals_after(&text, marker));
        }
    }
    // The benchmarks and scripts/guest-profile are Python: subprocess
    // calls with a literal argv[0].
    let mut py = Vec::new();
    files(&root.join("bench"), &|_| true, &mut py);
    py.push(root.join("scripts/guest-profile"));
    for f in &py {
        let text = std::fs::read_to_string(f).unwrap();
        for marker in [
            "subprocess.run([\"",
            "subprocess.Popen([\"",
            "subprocess.check_output([\"",
        ] {
            found.extend(literals_after(&text, marker));
        }
    }
    // Literals that name no program (the markers quoted in comments).
    // /proc/self/exe is the running binary itself (huskd's and husk's log
    // copier and adopter), which no package provides.
    found.retain(|p| {
        p.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '/')
            && !p.contains(' ')
            && p != "/proc/self/exe"
    });
    found
}

/// The packages scripts/setup.sh installs (its `packages=( ... )` array).
fn setup_packages() -> BTreeSet<String> {
    let text = std::fs::read_to_string(repo_root().join("scripts/setup.sh")).unwrap();
    let start = text
        .find("packages=(")
        .expect("setup.sh has a packages array");
    let body = &text[start + "packages=(".len()..];
    let body = &body[..body.find("\n)").expect("the array ends")];
    body.lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .flat_map(|l| l.split_whitespace())
        .map(String::from)
        .collect()
}

#[test]
fn every_program_started_is_listed_with_its_package() {
    let listed: BTreeSet<&str> = PROGRAMS.iter().map(|(p, _)| *p).collect();
    let unlisted: Vec<String> = started_programs()
        .into_iter()
        .filter(|p| !listed.contains(p.as_str()))
        .collect();
    assert!(
        unlisted.is_empty(),
        "programs started by the sources but missing from tests/src/programs.rs \
         (add each with the Debian package that provides it, and that package to \
         scripts/setup.sh): {unlisted:?}"
    );
}

#[test]
fn setup_installs_every_listed_package() {
    let installed = setup_packages();
    let missing: Vec<String> = PROGRAMS
        .iter()
        .filter(|(_, pkg)| !ESSENTIAL.contains(pkg) && !installed.contains(*pkg))
        .map(|(prog, pkg)| format!("{prog} ({pkg})"))
        .collect();
    assert!(
        missing.is_empty(),
        "scripts/setup.sh does not install the packages of: {missing:?}"
    );
}

#[test]
fn every_listed_program_is_installed() {
    let missing: Vec<String> = PROGRAMS
        .iter()
        .filter_map(|(p, _)| require(p).err().map(|e| e.to_string()))
        .collect();
    assert!(missing.is_empty(), "{}", missing.join("\n"));
}

#[test]
fn the_scan_finds_programs() {
    // A scan that found nothing would pass the first test vacuously.
    let found = started_programs();
    for p in ["ip", "containerd", "etcdctl", "skopeo", "strace"] {
        assert!(found.contains(p), "the scan missed {p}: {found:?}");
    }
}
