//! The image importer (`husk image import`, and every pulled image once
//! staged) and the layer unpacker on hostile images: an archive's
//! index.json, manifest, config and layer tar are input husk does not
//! control. It must answer with images or an error, never panic, and never
//! touch a file outside the directory it unpacks into.
//!
//! Input: four parts split on 0xff bytes (index or docker manifest.json,
//! manifest, config, layer tar). So that the fuzzer gets past the digest
//! checks, `@L`/`@l` in the config and manifest stand for the layer's
//! digest/size, `@C`/`@c` in the manifest for the config's, `@M`/`@m` in
//! the index for the manifest's, and `@D` for the layer's diff_id. The
//! first byte picks the layout (bit 0: OCI or docker-archive) and how the
//! layer is given (bit 1: a tar, or lines that name its entries).
#![no_main]

use std::path::Path;

use husk_runtime::image::ImageStore;
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

fn hex(b: &[u8]) -> String {
    format!("{:x}", Sha256::digest(b))
}

fn fill(text: &[u8], subs: &[(&str, &str)]) -> Vec<u8> {
    let mut s = String::from_utf8_lossy(text).into_owned();
    for (k, v) in subs {
        s = s.replace(k, v);
    }
    s.into_bytes()
}

fn add(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    let _ = b.append_data(&mut h, path, data);
}

/// A layer tar from lines `f PATH DATA`, `d PATH`, `l PATH TARGET`,
/// `h PATH TARGET` (hard link): the fuzzer names entries and links freely
/// without having to get tar checksums right.
fn layer_from_lines(text: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for line in String::from_utf8_lossy(text).lines() {
        let mut w = line.splitn(3, ' ');
        let (Some(kind), Some(path)) = (w.next(), w.next()) else {
            continue;
        };
        let arg = w.next().unwrap_or("");
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o755);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(0);
        let _ = match kind {
            "f" => {
                h.set_size(arg.len() as u64);
                b.append_data(&mut h, path, arg.as_bytes())
            }
            "d" => {
                h.set_entry_type(tar::EntryType::Directory);
                b.append_data(&mut h, path, &[][..])
            }
            "l" => {
                h.set_entry_type(tar::EntryType::Symlink);
                b.append_link(&mut h, path, arg)
            }
            "h" => {
                h.set_entry_type(tar::EntryType::Link);
                b.append_link(&mut h, path, arg)
            }
            _ => continue,
        };
    }
    b.into_inner().unwrap_or_default()
}

fn archive(data: &[u8]) -> Option<Vec<u8>> {
    let (&mode, rest) = data.split_first()?;
    let mut parts = rest.splitn(4, |b| *b == 0xff);
    let (index, manifest, config, layer) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    // Bit 1 of the first byte: the layer is given as lines, else as tar.
    let built;
    let layer = if mode & 2 != 0 {
        built = layer_from_lines(layer);
        &built[..]
    } else {
        layer
    };
    let layer_hex = hex(layer);
    let layer_size = layer.len().to_string();
    // An uncompressed layer: its diff_id is its digest.
    let diff_id = format!("sha256:{layer_hex}");
    let config = fill(
        config,
        &[("@L", &diff_id), ("@l", &layer_size), ("@D", &diff_id)],
    );
    let config_hex = hex(&config);
    let mut b = tar::Builder::new(Vec::new());
    if mode % 2 == 0 {
        let manifest = fill(
            manifest,
            &[
                ("@L", &diff_id),
                ("@l", &layer_size),
                ("@C", &format!("sha256:{config_hex}")),
                ("@c", &config.len().to_string()),
            ],
        );
        let manifest_hex = hex(&manifest);
        let index = fill(
            index,
            &[
                ("@M", &format!("sha256:{manifest_hex}")),
                ("@m", &manifest.len().to_string()),
            ],
        );
        add(&mut b, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
        add(&mut b, "index.json", &index);
        add(&mut b, &format!("blobs/sha256/{manifest_hex}"), &manifest);
        add(&mut b, &format!("blobs/sha256/{config_hex}"), &config);
        add(&mut b, &format!("blobs/sha256/{layer_hex}"), layer);
    } else {
        let index = fill(
            index,
            &[
                ("@C", &format!("{config_hex}.json")),
                ("@L", &format!("{layer_hex}/layer.tar")),
            ],
        );
        add(&mut b, "manifest.json", &index);
        add(&mut b, &format!("{config_hex}.json"), &config);
        add(&mut b, &format!("{layer_hex}/layer.tar"), layer);
    }
    b.into_inner().ok()
}

/// Every file under `dir`, for the check that nothing outside the tree
/// changed.
fn listing(dir: &Path) -> Vec<(std::path::PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if m.is_dir() {
                stack.push(p.clone());
            }
            out.push((p, m.len()));
        }
    }
    out.sort();
    out
}

fuzz_target!(|data: &[u8]| {
    let Some(tar) = archive(data) else { return };
    let work = tempfile::tempdir().expect("a temporary directory");
    let outside = work.path().join("outside");
    std::fs::create_dir(&outside).expect("mkdir");
    std::fs::write(outside.join("keep"), b"keep").expect("write");
    let store_dir = work.path().join("store");
    let store = ImageStore::open(&store_dir).expect("a store");
    let file = work.path().join("image.tar");
    std::fs::write(&file, &tar).expect("write");
    let Ok(images) = store.import(&file) else { return };
    let before = listing(&outside);
    for rec in images {
        let tree = work.path().join("tree");
        let _ = std::fs::remove_dir_all(&tree);
        std::fs::create_dir(&tree).expect("mkdir");
        let _ = store.unpack(&rec, &tree);
        assert_eq!(listing(&outside), before, "unpacking {} changed files outside its tree", rec.name);
    }
});
