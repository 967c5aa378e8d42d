//! The guest root image: reproducible, and refuses what cannot run as the
//! guest's init.

use std::process::Command;

use husk_tests::{guest_init_binary, repo_root};
use sha2::{Digest, Sha256};

fn build(out: &std::path::Path, init: &std::path::Path) -> std::process::Output {
    Command::new(repo_root().join("images/build-rootfs.sh"))
        .arg(out)
        .arg(init)
        .output()
        .expect("running images/build-rootfs.sh")
}

#[test]
fn root_image_is_reproducible() {
    let init = guest_init_binary().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.erofs");
    let b = dir.path().join("b.erofs");
    for p in [&a, &b] {
        let o = build(p, &init);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        // Different build times must not show in the bytes.
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    let ha = Sha256::digest(std::fs::read(&a).unwrap());
    let hb = Sha256::digest(std::fs::read(&b).unwrap());
    assert_eq!(ha, hb, "two builds of the root image differ");
    // It is an erofs image (superblock magic at offset 1024).
    let bytes = std::fs::read(&a).unwrap();
    assert_eq!(&bytes[1024..1028], &0xE0F5_E1E2u32.to_le_bytes());
}

#[test]
fn dynamic_init_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.erofs");
    // /bin/ls is dynamically linked on Debian; the guest has no libc.
    let o = build(&out, std::path::Path::new("/bin/ls"));
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("dynamically linked"), "{err}");
    assert!(!out.exists(), "a refused build left an image behind");
}
