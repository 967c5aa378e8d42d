//! Build small OCI images offline, reproducibly.
//!
//! Each layer is a directory turned into an uncompressed tar with fixed owners
//! and times and entries in sorted order, so the same inputs always give the
//! same digests. The image is written two ways: an OCI image layout archive
//! (what `ctr image import`, `skopeo oci-archive:` and `umoci` read) and a
//! docker-archive (what `docker load` writes and `ctr image import` also reads).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, DescriptorBuilder, ImageConfigurationBuilder,
    ImageIndexBuilder, ImageManifestBuilder, MediaType, Os, RootFsBuilder, Sha256Digest,
};
use sha2::{Digest, Sha256};

/// What goes into one image.
#[derive(Debug, Clone, Default)]
pub struct ImageSpec {
    /// Full reference, e.g. `husk.local/busybox:latest`.
    pub name: String,
    /// Layer directories, lowest first.
    pub layers: Vec<PathBuf>,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub env: Vec<String>,
    pub workdir: Option<String>,
    /// `80/tcp` style entries.
    pub exposed_ports: Vec<String>,
}

/// The two archive forms of one image, plus its digests for callers to report.
#[derive(Debug)]
pub struct BuiltImage {
    pub oci_archive: Vec<u8>,
    pub docker_archive: Vec<u8>,
    pub manifest_digest: String,
    pub config_digest: String,
}

struct Blob {
    hex: String,
    bytes: Vec<u8>,
}

impl Blob {
    fn new(bytes: Vec<u8>) -> Self {
        let hex = hex(&Sha256::digest(&bytes));
        Blob { hex, bytes }
    }
    fn digest(&self) -> String {
        format!("sha256:{}", self.hex)
    }
    fn descriptor(&self, media_type: MediaType) -> Result<Descriptor> {
        let digest: Sha256Digest = self.hex.parse().context("sha256 digest")?;
        Ok(DescriptorBuilder::default()
            .media_type(media_type)
            .digest(digest)
            .size(self.bytes.len() as u64)
            .build()?)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Serialises with sorted object keys (serde_json's default map is a BTreeMap),
/// so HashMaps inside oci-spec types cannot reorder the output.
fn canonical_json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>> {
    let v = serde_json::to_value(value)?;
    Ok(serde_json::to_vec(&v)?)
}

fn split_reference(name: &str) -> Result<(&str, &str)> {
    // The tag is after the last ':' that comes after the last '/' (a registry
    // host may carry a port).
    let slash = name.rfind('/').map_or(0, |i| i + 1);
    match name[slash..].rfind(':') {
        Some(i) if i + 1 < name[slash..].len() => Ok((&name[..slash + i], &name[slash + i + 1..])),
        _ => bail!("image name {name:?} needs an explicit tag (name:tag)"),
    }
}

/// A reproducible tar of `dir`: sorted entries, owner root, mtime 0.
pub fn layer_tar(dir: &Path) -> Result<Vec<u8>> {
    if !dir.is_dir() {
        bail!("layer directory {} does not exist", dir.display());
    }
    let mut builder = tar::Builder::new(Vec::new());
    builder.mode(tar::HeaderMode::Deterministic);
    builder.follow_symlinks(false);
    let walk = walkdir::WalkDir::new(dir)
        .min_depth(1)
        .follow_links(false)
        .sort_by_file_name();
    for entry in walk {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        let rel = entry
            .path()
            .strip_prefix(dir)
            .expect("walkdir yields paths under its root");
        let meta = entry
            .path()
            .symlink_metadata()
            .with_context(|| format!("stat {}", entry.path().display()))?;
        let mut header = tar::Header::new_gnu();
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mode(meta.permissions().mode() & 0o7777);
        let ft = meta.file_type();
        if ft.is_dir() {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            builder.append_data(&mut header, rel, std::io::empty())?;
        } else if ft.is_symlink() {
            let target = fs::read_link(entry.path())?;
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            builder.append_link(&mut header, rel, &target)?;
        } else if ft.is_file() {
            let data = fs::read(entry.path())
                .with_context(|| format!("reading {}", entry.path().display()))?;
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(data.len() as u64);
            builder.append_data(&mut header, rel, data.as_slice())?;
        } else {
            bail!(
                "{}: unsupported file type (mode {:o}) in a layer",
                entry.path().display(),
                meta.mode()
            );
        }
    }
    Ok(builder.into_inner()?)
}

/// An archive of named in-memory files, written in the order given.
fn archive(files: &[(String, &[u8])]) -> Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut dirs_done = std::collections::BTreeSet::new();
    for (name, data) in files {
        // Parent directories first, as `docker save` writes them.
        let mut parent = Path::new(name).parent();
        let mut parents = Vec::new();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            parents.push(p.to_path_buf());
            parent = p.parent();
        }
        for p in parents.into_iter().rev() {
            if dirs_done.insert(p.clone()) {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_mtime(0);
                h.set_size(0);
                builder.append_data(&mut h, &p, std::io::empty())?;
            }
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_size(data.len() as u64);
        builder.append_data(&mut h, name, *data)?;
    }
    Ok(builder.into_inner()?)
}

/// Builds both archive forms of `spec`.
pub fn build(spec: &ImageSpec) -> Result<BuiltImage> {
    let (repo, tag) = split_reference(&spec.name)?;
    if spec.layers.is_empty() {
        bail!("image {} has no layers", spec.name);
    }
    let layers = spec
        .layers
        .iter()
        .map(|d| layer_tar(d).map(Blob::new))
        .collect::<Result<Vec<_>>>()?;

    let mut config = ConfigBuilder::default();
    if let Some(e) = &spec.entrypoint {
        config = config.entrypoint(e.clone());
    }
    if let Some(c) = &spec.cmd {
        config = config.cmd(c.clone());
    }
    if !spec.env.is_empty() {
        config = config.env(spec.env.clone());
    }
    if let Some(w) = &spec.workdir {
        config = config.working_dir(w.clone());
    }
    if !spec.exposed_ports.is_empty() {
        config = config.exposed_ports(spec.exposed_ports.clone());
    }
    let rootfs = RootFsBuilder::default()
        .typ("layers")
        .diff_ids(layers.iter().map(Blob::digest).collect::<Vec<_>>())
        .build()?;
    let image_config = ImageConfigurationBuilder::default()
        .created("1970-01-01T00:00:00Z")
        .architecture(Arch::Amd64)
        .os(Os::Linux)
        .config(config.build()?)
        .rootfs(rootfs)
        .build()?;
    let config_blob = Blob::new(canonical_json(&image_config)?);

    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(config_blob.descriptor(MediaType::ImageConfig)?)
        .layers(
            layers
                .iter()
                .map(|l| l.descriptor(MediaType::ImageLayer))
                .collect::<Result<Vec<_>>>()?,
        )
        .build()?;
    let manifest_blob = Blob::new(canonical_json(&manifest)?);

    let mut manifest_desc = manifest_blob.descriptor(MediaType::ImageManifest)?;
    manifest_desc.set_annotations(Some(
        [
            // containerd names the imported image from this one...
            ("io.containerd.image.name".to_string(), spec.name.clone()),
            // ...skopeo and umoci select by this one (the tag).
            (
                "org.opencontainers.image.ref.name".to_string(),
                tag.to_string(),
            ),
        ]
        .into_iter()
        .collect(),
    ));
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![manifest_desc])
        .build()?;
    let index_json = canonical_json(&index)?;

    // OCI image layout archive.
    let mut files: Vec<(String, &[u8])> = vec![
        (
            "oci-layout".into(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.as_slice(),
        ),
        ("index.json".into(), &index_json),
    ];
    let mut blobs: BTreeMap<String, &[u8]> = BTreeMap::new();
    for b in layers.iter().chain([&config_blob, &manifest_blob]) {
        blobs.insert(format!("blobs/sha256/{}", b.hex), &b.bytes);
    }
    files.extend(blobs);
    let oci_archive = archive(&files)?;

    // docker-archive (`docker save` format, v1.2 manifest.json).
    let docker_manifest = serde_json::json!([{
        "Config": format!("{}.json", config_blob.hex),
        "RepoTags": [spec.name],
        "Layers": layers.iter().map(|l| format!("{}/layer.tar", l.hex)).collect::<Vec<_>>(),
    }]);
    let top = &layers.last().expect("checked non-empty above").hex;
    let repositories = serde_json::json!({ repo: { tag: top } });
    let docker_manifest = serde_json::to_vec(&docker_manifest)?;
    let repositories = serde_json::to_vec(&repositories)?;
    let mut dfiles: Vec<(String, &[u8])> = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for l in &layers {
        // The same layer twice in one image is stored once.
        if seen.insert(&l.hex) {
            dfiles.push((format!("{}/VERSION", l.hex), b"1.0".as_slice()));
            dfiles.push((format!("{}/layer.tar", l.hex), &l.bytes));
        }
    }
    dfiles.push((format!("{}.json", config_blob.hex), &config_blob.bytes));
    dfiles.push(("manifest.json".into(), &docker_manifest));
    dfiles.push(("repositories".into(), &repositories));
    let docker_archive = archive(&dfiles)?;

    Ok(BuiltImage {
        oci_archive,
        docker_archive,
        manifest_digest: manifest_blob.digest(),
        config_digest: config_blob.digest(),
    })
}

/// Writes `data` to `path` through a temporary file, so a crash never leaves a
/// truncated archive under the final name.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    let mut f = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dir: &Path) {
        fs::create_dir_all(dir.join("bin")).unwrap();
        fs::write(dir.join("bin/tool"), b"#!/bin/sh\necho hi\n").unwrap();
        fs::set_permissions(dir.join("bin/tool"), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("tool", dir.join("bin/alias")).unwrap();
        fs::create_dir_all(dir.join("tmp")).unwrap();
        fs::set_permissions(dir.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    }

    fn spec(layer: &Path) -> ImageSpec {
        ImageSpec {
            name: "husk.local/t:1".into(),
            layers: vec![layer.to_path_buf()],
            cmd: Some(vec!["/bin/tool".into()]),
            env: vec!["PATH=/bin".into()],
            exposed_ports: vec!["80/tcp".into()],
            ..Default::default()
        }
    }

    #[test]
    fn same_inputs_same_bytes() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        sample(a.path());
        sample(b.path());
        // Different mtimes on disk must not matter.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        fs::write(b.path().join("bin/tool"), b"#!/bin/sh\necho hi\n").unwrap();
        let x = build(&spec(a.path())).unwrap();
        let y = build(&spec(b.path())).unwrap();
        assert_eq!(x.oci_archive, y.oci_archive);
        assert_eq!(x.docker_archive, y.docker_archive);
        assert_eq!(x.manifest_digest, y.manifest_digest);
    }

    #[test]
    fn layer_keeps_modes_links_and_order() {
        let d = tempfile::tempdir().unwrap();
        sample(d.path());
        let tar = layer_tar(d.path()).unwrap();
        let mut ar = tar::Archive::new(tar.as_slice());
        let got: Vec<(String, u32, Option<String>)> = ar
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    e.path().unwrap().to_string_lossy().into_owned(),
                    h.mode().unwrap(),
                    e.link_name()
                        .unwrap()
                        .map(|l| l.to_string_lossy().into_owned()),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("bin".into(), 0o755, None),
                ("bin/alias".into(), 0o777, Some("tool".into())),
                ("bin/tool".into(), 0o755, None),
                ("tmp".into(), 0o1777, None),
            ]
        );
    }

    #[test]
    fn config_and_manifest_parse_as_oci() {
        let d = tempfile::tempdir().unwrap();
        sample(d.path());
        let img = build(&spec(d.path())).unwrap();
        let mut ar = tar::Archive::new(img.oci_archive.as_slice());
        let mut files = BTreeMap::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let p = e.path().unwrap().to_string_lossy().into_owned();
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut v).unwrap();
            files.insert(p, v);
        }
        let index: oci_spec::image::ImageIndex =
            serde_json::from_slice(&files["index.json"]).unwrap();
        let mdesc = &index.manifests()[0];
        let mpath = format!("blobs/sha256/{}", mdesc.digest().digest());
        let manifest: oci_spec::image::ImageManifest =
            serde_json::from_slice(&files[&mpath]).unwrap();
        let cpath = format!("blobs/sha256/{}", manifest.config().digest().digest());
        let config: oci_spec::image::ImageConfiguration =
            serde_json::from_slice(&files[&cpath]).unwrap();
        assert_eq!(
            config.config().as_ref().unwrap().cmd().as_ref().unwrap(),
            &vec!["/bin/tool".to_string()]
        );
        // Every blob's name is its content's digest.
        for (name, data) in &files {
            if let Some(h) = name.strip_prefix("blobs/sha256/") {
                assert_eq!(hex(&Sha256::digest(data)), h);
            }
        }
    }

    #[test]
    fn reference_needs_a_tag() {
        assert_eq!(split_reference("a/b:c").unwrap(), ("a/b", "c"));
        assert_eq!(
            split_reference("host:5000/b:c").unwrap(),
            ("host:5000/b", "c")
        );
        assert!(split_reference("host:5000/b").is_err());
        assert!(split_reference("b:").is_err());
    }

    #[test]
    fn missing_layer_dir_is_a_clear_error() {
        let err = layer_tar(Path::new("/nonexistent/layer")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/layer"), "{err}");
    }
}
