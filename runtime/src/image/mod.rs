//! The image store: OCI images imported from OCI-layout or docker-archive
//! tarballs, kept as content-addressed blobs, and turned into one read-only
//! erofs root image per image (its layers applied in order, whiteouts
//! honoured) that a sandbox gets as a drive.
//!
//! Layout under the store root (`/var/lib/husk/images` by default):
//! `blobs/sha256/<hex>` (layers, configs, manifests), `images.json` (name →
//! record), `rootfs/<config hex>.erofs`. Every blob is checked against its
//! digest before it enters the store, and a layer's uncompressed contents
//! against the config's diff_id; a failed import leaves the store as it was.

pub mod pull;

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::util::{shown, IoContext, IoError};

/// The image store: imports, pulls, root images.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("image {0:?} not found (husk image import FILE, husk image ls)")]
    NotFound(String),
    #[error("{0:?} is not an image reference: {1}")]
    BadReference(String, String),
    /// A digest husk cannot use to name a file (only sha256 is).
    #[error("digest {0:?}: not a sha256 digest")]
    BadDigest(String),
    /// A blob, layer or manifest that does not match what names it, or an
    /// archive that is not whole.
    #[error("{0}")]
    Corrupt(String),
    /// Well formed, and not something husk takes (a media type, an
    /// archive format, a platform).
    #[error("{0}")]
    Unsupported(String),
    #[error("{what}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{what}")]
    Spec {
        what: String,
        #[source]
        source: oci_spec::OciSpecError,
    },
    #[error("mkfs.erofs for {image}: {stderr}")]
    Mkfs { image: String, stderr: String },
    /// The registry refused or failed a request.
    #[error("{what}: {message}")]
    Registry { what: String, message: String },
    #[error("importing {what}")]
    Import {
        what: String,
        #[source]
        source: Box<ImageError>,
    },
    #[error("{image}: layer {digest}")]
    Layer {
        image: String,
        digest: String,
        #[source]
        source: Box<ImageError>,
    },
    #[error("pulling {name}")]
    Pull {
        name: String,
        #[source]
        source: Box<ImageError>,
    },
}

pub type Result<T> = std::result::Result<T, ImageError>;

fn json(what: impl FnOnce() -> String) -> impl FnOnce(serde_json::Error) -> ImageError {
    move |source| ImageError::Json {
        what: what(),
        source,
    }
}

fn spec(what: impl FnOnce() -> String) -> impl FnOnce(oci_spec::OciSpecError) -> ImageError {
    move |source| ImageError::Spec {
        what: what(),
        source,
    }
}

/// One image in the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The reference it was imported as: `registry/repo:tag`.
    pub name: String,
    /// `sha256:<hex>` of its config: the image id, as Docker's.
    pub config: String,
    /// Layer blobs, lowest first, with their media types.
    pub layers: Vec<Layer>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    pub digest: String,
    /// The uncompressed tar's digest (the config's diff_id).
    pub diff_id: String,
    pub gzip: bool,
}

impl ImageRecord {
    /// The short id `docker images` shows.
    pub fn short_id(&self) -> &str {
        let hex = self.config.trim_start_matches("sha256:");
        &hex[..hex.len().min(12)]
    }
}

pub struct ImageStore {
    root: PathBuf,
}

/// `<data dir>/images` (see `crate::config::default_data_dir`).
pub fn default_store_dir() -> PathBuf {
    crate::config::default_data_dir().join("images")
}

/// `name` with a `:latest` tag if it has neither tag nor digest.
pub fn normalize(name: &str) -> String {
    let last = name.rsplit('/').next().unwrap_or(name);
    if last.contains(':') || name.contains('@') {
        name.to_string()
    } else {
        format!("{name}:latest")
    }
}

fn sha256_hex(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
}

/// The digest of a file's contents, streamed.
fn file_digest(path: &Path) -> Result<String> {
    let mut f = File::open(path).at(|| shown(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).at(|| shown(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("sha256:{:x}", h.finalize()))
}

/// The hex part of a sha256 digest, checked (it names files).
pub(crate) fn digest_hex(digest: &str) -> Result<&str> {
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| ImageError::BadDigest(digest.into()))?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ImageError::BadDigest(digest.into()));
    }
    Ok(hex)
}

/// A path inside an archive, made relative and checked not to climb out.
fn archive_path(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir => {}
            _ => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

impl ImageStore {
    pub fn open(root: &Path) -> Result<ImageStore> {
        for d in ["blobs/sha256", "rootfs", "tmp"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p).at(|| shown(&p))?;
        }
        Ok(ImageStore {
            root: root.to_path_buf(),
        })
    }

    fn blob(&self, digest: &str) -> Result<PathBuf> {
        Ok(self.root.join("blobs/sha256").join(digest_hex(digest)?))
    }

    fn index(&self) -> Result<BTreeMap<String, ImageRecord>> {
        let p = self.root.join("images.json");
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).map_err(json(|| shown(&p))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Ok(Err(e).at(|| shown(&p))?),
        }
    }

    fn write_index(&self, index: &BTreeMap<String, ImageRecord>) -> Result<()> {
        let p = self.root.join("images.json");
        let tmp = self.root.join("images.json.tmp");
        let bytes = serde_json::to_vec_pretty(index).map_err(json(|| shown(&p)))?;
        std::fs::write(&tmp, bytes).at(|| shown(&tmp))?;
        Ok(std::fs::rename(&tmp, &p).at(|| shown(&p))?)
    }

    pub fn list(&self) -> Result<Vec<ImageRecord>> {
        Ok(self.index()?.into_values().collect())
    }

    /// The image `reference` names: a name (`:latest` implied), or an id
    /// (prefix of the config digest, at least 4 hex digits).
    pub fn get(&self, reference: &str) -> Result<ImageRecord> {
        let index = self.index()?;
        if let Some(r) = index.get(&normalize(reference)) {
            return Ok(r.clone());
        }
        let id = reference.trim_start_matches("sha256:");
        if id.len() >= 4 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
            let found: Vec<_> = index
                .values()
                .filter(|r| r.config.trim_start_matches("sha256:").starts_with(id))
                .collect();
            if let Some(r) = found.first() {
                return Ok((*r).clone());
            }
        }
        Err(ImageError::NotFound(reference.into()))
    }

    /// Removes the name; blobs and the root image go with the last name of
    /// an image.
    pub fn remove(&self, reference: &str) -> Result<ImageRecord> {
        let rec = self.get(reference)?;
        let mut index = self.index()?;
        index.remove(&rec.name);
        self.write_index(&index)?;
        if !index.values().any(|r| r.config == rec.config) {
            let _ = std::fs::remove_file(self.rootfs_path(&rec)?);
            let used: HashSet<&str> = index
                .values()
                .flat_map(|r| r.layers.iter().map(|l| l.digest.as_str()))
                .collect();
            for l in &rec.layers {
                if !used.contains(l.digest.as_str()) {
                    let _ = std::fs::remove_file(self.blob(&l.digest)?);
                }
            }
            let _ = std::fs::remove_file(self.blob(&rec.config)?);
        }
        Ok(rec)
    }

    pub fn config(&self, rec: &ImageRecord) -> Result<ImageConfiguration> {
        let p = self.blob(&rec.config)?;
        ImageConfiguration::from_file(&p)
            .map_err(spec(|| format!("config of {} ({})", rec.name, p.display())))
    }

    fn rootfs_path(&self, rec: &ImageRecord) -> Result<PathBuf> {
        Ok(self
            .root
            .join("rootfs")
            .join(format!("{}.erofs", digest_hex(&rec.config)?)))
    }

    /// Imports every image in an OCI-layout or docker-archive tarball.
    pub fn import(&self, archive: &Path) -> Result<Vec<ImageRecord>> {
        let staging = tempfile::Builder::new()
            .prefix("import-")
            .tempdir_in(self.root.join("tmp"))
            .at(|| shown(&self.root.join("tmp")))?;
        extract_plain(archive, staging.path()).map_err(|e| ImageError::Import {
            what: archive.display().to_string(),
            source: Box::new(e),
        })?;
        self.import_staged(staging.path(), &archive.display().to_string())
    }

    /// A directory under the store for staging blobs (same filesystem, so
    /// checked blobs move in by rename).
    pub(crate) fn staging(&self, prefix: &str) -> Result<tempfile::TempDir> {
        Ok(tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(self.root.join("tmp"))
            .at(|| shown(&self.root.join("tmp")))?)
    }

    /// The stored blob `digest`, if the store has it.
    pub(crate) fn has_blob(&self, digest: &str) -> Option<PathBuf> {
        self.blob(digest).ok().filter(|p| p.is_file())
    }

    /// Checks the OCI layout or docker-archive unpacked in `s` (`what`
    /// names it in errors) and adds its images to the store.
    pub(crate) fn import_staged(&self, s: &Path, what: &str) -> Result<Vec<ImageRecord>> {
        let found = if s.join("index.json").is_file() && s.join("oci-layout").is_file() {
            self.stage_oci(s)
        } else if s.join("manifest.json").is_file() {
            self.stage_docker(s)
        } else {
            Err(ImageError::Unsupported(format!(
                "{what}: neither an OCI layout (oci-layout, index.json) nor a docker-archive (manifest.json)"
            )))
        }
        .map_err(|e| ImageError::Import {
            what: what.into(),
            source: Box::new(e),
        })?;
        if found.is_empty() {
            return Err(ImageError::Unsupported(format!(
                "{what}: no named image in it"
            )));
        }
        // Everything checked: move blobs in (content-addressed, so an
        // existing one is the same), then name the images.
        for (_, blobs) in &found {
            for (digest, path) in blobs {
                let dst = self.blob(digest)?;
                if !dst.exists() {
                    std::fs::rename(path, &dst)
                        .or_else(|_| std::fs::copy(path, &dst).map(|_| ()))
                        .at(|| shown(&dst))?;
                }
            }
        }
        let mut index = self.index()?;
        let records: Vec<ImageRecord> = found.into_iter().map(|(r, _)| r).collect();
        for r in &records {
            index.insert(r.name.clone(), r.clone());
        }
        self.write_index(&index)?;
        Ok(records)
    }

    /// Checks an OCI layout: each manifest, config and layer blob against
    /// its descriptor's digest and size.
    #[allow(clippy::type_complexity)]
    fn stage_oci(&self, s: &Path) -> Result<Vec<(ImageRecord, Vec<(String, PathBuf)>)>> {
        let index =
            ImageIndex::from_file(s.join("index.json")).map_err(spec(|| "index.json".into()))?;
        let blob = |digest: &str, size: u64| -> Result<PathBuf> {
            let p = s.join("blobs/sha256").join(digest_hex(digest)?);
            let len = std::fs::metadata(&p)
                .at(|| format!("blob {digest} is missing"))?
                .len();
            if len != size {
                return Err(ImageError::Corrupt(format!(
                    "blob {digest} is {len} bytes, its descriptor says {size} (truncated?)"
                )));
            }
            let got = file_digest(&p)?;
            if got != digest {
                return Err(ImageError::Corrupt(format!(
                    "blob {digest} is corrupt: its contents hash to {got}"
                )));
            }
            Ok(p)
        };
        let mut out = Vec::new();
        for m in index.manifests() {
            let annotations = m.annotations().clone().unwrap_or_default();
            let Some(name) = annotations
                .get("io.containerd.image.name")
                .or_else(|| annotations.get("org.opencontainers.image.ref.name"))
            else {
                continue;
            };
            let mpath = blob(m.digest().as_ref(), m.size())?;
            let manifest = ImageManifest::from_file(&mpath)
                .map_err(spec(|| format!("manifest {}", m.digest())))?;
            let cd = manifest.config();
            let cpath = blob(cd.digest().as_ref(), cd.size())?;
            let config = ImageConfiguration::from_file(&cpath)
                .map_err(spec(|| format!("config {}", cd.digest())))?;
            let diff_ids = config.rootfs().diff_ids();
            if diff_ids.len() != manifest.layers().len() {
                return Err(ImageError::Corrupt(format!(
                    "manifest {} has {} layers, its config {} diff_ids",
                    m.digest(),
                    manifest.layers().len(),
                    diff_ids.len()
                )));
            }
            let mut blobs = vec![
                (m.digest().to_string(), mpath),
                (cd.digest().to_string(), cpath),
            ];
            let mut layers = Vec::new();
            for (l, diff_id) in manifest.layers().iter().zip(diff_ids) {
                let media = l.media_type().to_string();
                let gzip = media.ends_with("gzip");
                if !(gzip || media.ends_with(".tar") || media.ends_with("tar")) {
                    return Err(ImageError::Unsupported(format!(
                        "layer {}: media type {media} is not supported",
                        l.digest()
                    )));
                }
                let p = blob(l.digest().as_ref(), l.size())?;
                blobs.push((l.digest().to_string(), p));
                layers.push(Layer {
                    digest: l.digest().to_string(),
                    diff_id: diff_id.clone(),
                    gzip,
                });
            }
            out.push((
                ImageRecord {
                    name: normalize(name),
                    config: cd.digest().to_string(),
                    layers,
                },
                blobs,
            ));
        }
        Ok(out)
    }

    /// Checks a docker-archive: each layer tar against the config's
    /// diff_ids (its digests are of the uncompressed tars).
    #[allow(clippy::type_complexity)]
    fn stage_docker(&self, s: &Path) -> Result<Vec<(ImageRecord, Vec<(String, PathBuf)>)>> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Entry {
            config: String,
            #[serde(default)]
            repo_tags: Option<Vec<String>>,
            layers: Vec<String>,
        }
        let text = std::fs::read(s.join("manifest.json")).at(|| "manifest.json")?;
        let entries: Vec<Entry> =
            serde_json::from_slice(&text).map_err(json(|| "manifest.json".into()))?;
        let inside = |rel: &str| -> Result<PathBuf> {
            let p = archive_path(Path::new(rel)).ok_or_else(|| {
                ImageError::Corrupt(format!("manifest.json names {rel:?} outside the archive"))
            })?;
            Ok(s.join(p))
        };
        let mut out = Vec::new();
        for e in entries {
            let cpath = inside(&e.config)?;
            let config_bytes =
                std::fs::read(&cpath).at(|| format!("config {} is missing", e.config))?;
            let config_digest = format!("sha256:{}", sha256_hex(&config_bytes));
            let config: ImageConfiguration = serde_json::from_slice(&config_bytes)
                .map_err(json(|| format!("config {}", e.config)))?;
            let diff_ids = config.rootfs().diff_ids();
            if diff_ids.len() != e.layers.len() {
                return Err(ImageError::Corrupt(format!(
                    "{} lists {} layers, its config {} diff_ids",
                    e.config,
                    e.layers.len(),
                    diff_ids.len()
                )));
            }
            let mut blobs = vec![(config_digest.clone(), cpath)];
            let mut layers = Vec::new();
            for (l, diff_id) in e.layers.iter().zip(diff_ids) {
                let p = inside(l)?;
                let got = file_digest(&p).map_err(|e| {
                    ImageError::Corrupt(format!("layer {l} is missing: {}", crate::util::chain(&e)))
                })?;
                let gzip = is_gzip(&p)?;
                let uncompressed = if gzip {
                    gunzip_digest(&p)?
                } else {
                    got.clone()
                };
                if &uncompressed != diff_id {
                    return Err(ImageError::Corrupt(format!(
                        "layer {l} is corrupt: it hashes to {uncompressed}, the config says {diff_id}"
                    )));
                }
                blobs.push((got.clone(), p));
                layers.push(Layer {
                    digest: got,
                    diff_id: diff_id.clone(),
                    gzip,
                });
            }
            for name in e.repo_tags.unwrap_or_default() {
                out.push((
                    ImageRecord {
                        name: normalize(&name),
                        config: config_digest.clone(),
                        layers: layers.clone(),
                    },
                    blobs.clone(),
                ));
            }
        }
        Ok(out)
    }

    /// The image's read-only root image (erofs), built on first use: the
    /// layers applied in order, whiteouts honoured, each layer's contents
    /// checked against its diff_id as it is read.
    /// Applies the image's layers, in order, to the empty directory
    /// `tree`: whiteouts remove, and nothing is written outside `tree`
    /// (a layer is input husk does not control).
    pub fn unpack(&self, rec: &ImageRecord, tree: &Path) -> Result<()> {
        for l in &rec.layers {
            apply_layer(&self.blob(&l.digest)?, l, tree).map_err(|e| ImageError::Layer {
                image: rec.name.clone(),
                digest: l.digest.clone(),
                source: Box::new(e),
            })?;
        }
        Ok(())
    }

    pub fn rootfs(&self, rec: &ImageRecord) -> Result<PathBuf> {
        let out = self.rootfs_path(rec)?;
        if out.exists() {
            return Ok(out);
        }
        let work = tempfile::Builder::new()
            .prefix("rootfs-")
            .tempdir_in(self.root.join("tmp"))
            .at(|| shown(&self.root.join("tmp")))?;
        let tree = work.path().join("tree");
        std::fs::create_dir(&tree).at(|| shown(&tree))?;
        self.unpack(rec, &tree)?;
        let img = work.path().join("rootfs.erofs");
        let o = Command::new("mkfs.erofs")
            .arg("--quiet")
            .arg(&img)
            .arg(&tree)
            .output()
            .at(|| "running mkfs.erofs (apt install erofs-utils)")?;
        if !o.status.success() {
            return Err(ImageError::Mkfs {
                image: rec.name.clone(),
                stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
            });
        }
        std::fs::rename(&img, &out).at(|| shown(&out))?;
        Ok(out)
    }
}

fn is_gzip(p: &Path) -> Result<bool> {
    let mut magic = [0u8; 2];
    let n = File::open(p)
        .and_then(|mut f| f.read(&mut magic))
        .at(|| shown(p))?;
    Ok(n == 2 && magic == [0x1f, 0x8b])
}

fn gunzip_digest(p: &Path) -> Result<String> {
    let mut r = flate2::read::GzDecoder::new(BufReader::new(File::open(p).at(|| shown(p))?));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = r.read(&mut buf).at(|| format!("gunzip {}", p.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("sha256:{:x}", h.finalize()))
}

/// Extracts an archive's regular files and directories (an image tarball
/// has nothing else) under `dst`, refusing paths that climb out.
fn extract_plain(archive: &Path, dst: &Path) -> Result<()> {
    let f = File::open(archive).at(|| shown(archive))?;
    let mut a = tar::Archive::new(BufReader::new(f));
    let broken = || format!("{}: truncated or not a tar archive", archive.display());
    for entry in a.entries().at(broken)? {
        let mut entry = entry.at(broken)?;
        let path = entry.path().at(broken)?.into_owned();
        let Some(rel) = archive_path(&path) else {
            continue;
        };
        let target = dst.join(&rel);
        match entry.header().entry_type() {
            tar::EntryType::Directory => std::fs::create_dir_all(&target).at(|| shown(&target))?,
            tar::EntryType::Regular => {
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).at(|| shown(parent))?;
                }
                let mut out = File::create(&target).at(|| shown(&target))?;
                let n = std::io::copy(&mut entry, &mut out)
                    .at(|| format!("{}: truncated", rel.display()))?;
                if n != entry.header().size().at(broken)? {
                    return Err(ImageError::Corrupt(format!("{}: truncated", rel.display())));
                }
                out.flush().at(|| shown(&target))?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// Hashes what is read through it.
struct Hashing<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// Applies one layer onto `tree`: whiteouts delete what lower layers put
/// there (`.wh.NAME`, and `.wh..wh..opq` for a whole directory's lower
/// contents), everything else is unpacked with owners and modes.
fn apply_layer(blob: &Path, layer: &Layer, tree: &Path) -> Result<()> {
    let file = BufReader::new(File::open(blob).at(|| shown(blob))?);
    let reader: Box<dyn Read> = if layer.gzip {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut hashing = Hashing {
        inner: reader,
        hash: Sha256::new(),
    };
    {
        let mut a = tar::Archive::new(&mut hashing);
        a.set_preserve_permissions(true);
        a.set_preserve_ownerships(true);
        a.set_overwrite(true);
        a.set_unpack_xattrs(false);
        // What this layer created: an opaque marker keeps it.
        let mut mine: HashSet<PathBuf> = HashSet::new();
        let broken = || "layer tar is truncated or corrupt";
        for entry in a.entries().at(broken)? {
            let mut entry = entry.at(broken)?;
            let Some(rel) = archive_path(&entry.path().at(broken)?) else {
                continue;
            };
            let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let parent = rel.parent().unwrap_or(Path::new(""));
            // What this entry removes is found with its directories
            // resolved inside the tree: a layer's symlinks are followed
            // only within the image (as tar's unpack_in and containerd
            // do), never to the host's files.
            if name == ".wh..wh..opq" {
                let Some(dir) = resolve_in(tree, &rel)? else {
                    continue;
                };
                let dir = dir.parent().unwrap_or(tree);
                if let Ok(children) = std::fs::read_dir(dir) {
                    for c in children.flatten() {
                        if !mine.contains(&parent.join(c.file_name())) {
                            remove_any(&c.path())?;
                        }
                    }
                }
                continue;
            }
            if let Some(hidden) = name.strip_prefix(".wh.") {
                if let Some(gone) = resolve_in(tree, &parent.join(hidden))? {
                    remove_any(&gone)?;
                }
                continue;
            }
            // A file replacing a directory (or the reverse) from below.
            if let Some(target) = resolve_in(tree, &rel)? {
                if let Ok(m) = std::fs::symlink_metadata(&target) {
                    let is_dir = entry.header().entry_type() == tar::EntryType::Directory;
                    if !(is_dir && m.is_dir()) {
                        remove_any(&target)?;
                    }
                }
            }
            entry
                .unpack_in(tree)
                .at(|| format!("unpacking {}", rel.display()))?;
            mine.insert(rel);
        }
    }
    // The rest of the stream (tar padding) counts toward the digest.
    std::io::copy(&mut hashing, &mut std::io::sink()).at(|| "layer tar is truncated or corrupt")?;
    let got = format!("sha256:{:x}", hashing.hash.finalize());
    if got != layer.diff_id {
        return Err(ImageError::Corrupt(format!(
            "contents hash to {got}, the config says {} (corrupt layer)",
            layer.diff_id
        )));
    }
    Ok(())
}

/// `tree/rel` with the directories above it resolved: None when one of
/// them does not exist, an error when they lead outside `tree` (through a
/// symlink the layer made). The last component is not followed.
fn resolve_in(tree: &Path, rel: &Path) -> Result<Option<PathBuf>> {
    let root = tree.canonicalize().at(|| shown(tree))?;
    let parent = rel.parent().unwrap_or(Path::new(""));
    let Ok(dir) = tree.join(parent).canonicalize() else {
        return Ok(None);
    };
    if !dir.starts_with(&root) {
        return Err(ImageError::Corrupt(format!(
            "layer entry {}: its directory leads outside the image (through a symlink to {})",
            rel.display(),
            dir.display()
        )));
    }
    Ok(Some(match rel.file_name() {
        Some(n) => dir.join(n),
        None => dir,
    }))
}

fn remove_any(p: &Path) -> Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p).at(|| shown(p))?,
        Ok(_) => std::fs::remove_file(p).at(|| shown(p))?,
        Err(_) => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_paths() {
        assert_eq!(normalize("busybox"), "busybox:latest");
        assert_eq!(
            normalize("husk.local:5000/busybox"),
            "husk.local:5000/busybox:latest"
        );
        assert_eq!(normalize("a/b:1"), "a/b:1");
        assert!(archive_path(Path::new("../x")).is_none());
        assert_eq!(archive_path(Path::new("./a/b")).unwrap(), Path::new("a/b"));
        assert!(digest_hex("sha256:../../etc").is_err());
    }

    fn layer_tar(entries: &[(&str, Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, content) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            match content {
                Some(c) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(c.len() as u64);
                    h.set_mode(0o644);
                    b.append_data(&mut h, path, c.as_bytes()).unwrap();
                }
                None => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    h.set_mode(0o755);
                    b.append_data(&mut h, path, &[][..]).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn layers_apply_with_whiteouts() {
        let d = tempfile::tempdir().unwrap();
        let tree = d.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        let lower = layer_tar(&[
            ("etc/", None),
            ("etc/a", Some("a")),
            ("etc/b", Some("b")),
            ("opt/", None),
            ("opt/old", Some("old")),
        ]);
        let upper = layer_tar(&[
            ("etc/.wh.a", Some("")),
            ("opt/", None),
            ("opt/new", Some("new")),
            ("opt/.wh..wh..opq", Some("")),
        ]);
        for (i, t) in [lower, upper].iter().enumerate() {
            let p = d.path().join(format!("l{i}"));
            std::fs::write(&p, t).unwrap();
            let l = Layer {
                digest: String::new(),
                diff_id: format!("sha256:{}", sha256_hex(t)),
                gzip: false,
            };
            apply_layer(&p, &l, &tree).unwrap();
        }
        assert!(!tree.join("etc/a").exists());
        assert_eq!(std::fs::read_to_string(tree.join("etc/b")).unwrap(), "b");
        assert!(!tree.join("opt/old").exists(), "opaque dir hides lower");
        assert_eq!(
            std::fs::read_to_string(tree.join("opt/new")).unwrap(),
            "new"
        );
        // A layer whose contents do not match its diff_id is refused.
        let p = d.path().join("l0");
        let bad = Layer {
            digest: String::new(),
            diff_id: format!("sha256:{}", "0".repeat(64)),
            gzip: false,
        };
        let e = apply_layer(&p, &bad, &tree).unwrap_err();
        assert!(matches!(e, ImageError::Corrupt(_)), "{e:?}");
    }

    /// A layer that plants a symlink to a host directory and then names
    /// paths through it (a whiteout, an opaque marker, a file replacing
    /// what is "there") must not touch the host.
    #[test]
    fn a_layer_cannot_reach_through_its_own_symlinks() {
        let d = tempfile::tempdir().unwrap();
        let host = d.path().join("host");
        std::fs::create_dir(&host).unwrap();
        for f in ["victim", "other", "replaced"] {
            std::fs::write(host.join(f), f).unwrap();
        }
        let tree = d.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        h.set_uid(0);
        h.set_gid(0);
        b.append_link(&mut h, "evil", &host).unwrap();
        let file = |b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            b.append_data(&mut h, path, data).unwrap();
        };
        file(&mut b, "evil/.wh.victim", b"");
        file(&mut b, "evil/.wh..wh..opq", b"");
        file(&mut b, "evil/replaced", b"from the image");
        let t = b.into_inner().unwrap();
        let p = d.path().join("layer");
        std::fs::write(&p, &t).unwrap();
        let l = Layer {
            digest: String::new(),
            diff_id: format!("sha256:{}", sha256_hex(&t)),
            gzip: false,
        };
        let r = apply_layer(&p, &l, &tree);
        for f in ["victim", "other", "replaced"] {
            assert_eq!(
                std::fs::read_to_string(host.join(f)).ok().as_deref(),
                Some(f),
                "host file {f} touched through the layer's symlink ({r:?})"
            );
        }
        let e = crate::util::chain(&r.expect_err("the layer is refused"));
        assert!(e.contains("leads outside the image"), "{e}");

        // A symlink within the image (merged /usr: lib -> usr/lib) is
        // followed, as Docker does.
        let tree = d.path().join("tree2");
        std::fs::create_dir_all(tree.join("usr/lib")).unwrap();
        std::fs::write(tree.join("usr/lib/old.so"), "old").unwrap();
        std::os::unix::fs::symlink("usr/lib", tree.join("lib")).unwrap();
        let t = layer_tar(&[("lib/.wh.old.so", Some(""))]);
        std::fs::write(&p, &t).unwrap();
        let l = Layer {
            digest: String::new(),
            diff_id: format!("sha256:{}", sha256_hex(&t)),
            gzip: false,
        };
        apply_layer(&p, &l, &tree).unwrap();
        assert!(!tree.join("usr/lib/old.so").exists());
    }
}
