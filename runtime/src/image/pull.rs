//! Registry pulls with oci-client: the manifest (the linux/amd64 one of an
//! index), the config and each layer are downloaded into a staging OCI
//! layout beside the store, then imported as a local archive is — every
//! blob checked against its digest and size, every layer against its
//! diff_id. oci-client checks each blob's digest as it streams too. A
//! corrupt or cut download fails with the digest named and leaves the
//! store as it was; blobs the store has are not fetched again.
//!
//! Registries on loopback (localhost, 127.0.0.0/8, ::1) are spoken to over
//! plain HTTP, as Docker does; `$HUSK_INSECURE_REGISTRIES` (comma-separated
//! host:port) adds others.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use crate::image::{ImageError, Result};
use crate::util::{shown, IoContext};
use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::{
    IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE,
    OCI_IMAGE_MEDIA_TYPE,
};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use oci_spec::image::{ImageIndex, ImageManifest};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWrite;

use crate::image::{digest_hex, normalize, ImageRecord, ImageStore};

/// What a pull reports as it goes (for progress bars).
#[derive(Clone, Debug)]
pub enum PullEvent {
    /// The manifest is resolved: the image's digest and its layers
    /// (digest, size).
    Resolved {
        digest: String,
        layers: Vec<(String, u64)>,
    },
    /// The store has this layer already.
    Exists { digest: String },
    /// `bytes` more of a layer arrived.
    Progress { digest: String, bytes: u64 },
    /// A layer is complete and its digest checked.
    Done { digest: String },
}

/// Layers downloaded at once (Docker's default).
const CONCURRENT_LAYERS: usize = 3;

fn registry_is_insecure(registry: &str) -> bool {
    let host = match registry.rsplit_once(':') {
        // "[::1]:5000" and "host:5000"; a bare IPv6 address has no port.
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => registry,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let listed = std::env::var("HUSK_INSECURE_REGISTRIES")
        .unwrap_or_default()
        .split(',')
        .any(|r| !r.is_empty() && r.trim() == registry);
    listed
        || host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// An AsyncWrite that reports how much passed through it.
struct Counting<W> {
    inner: W,
    report: Arc<dyn Fn(u64) + Send + Sync>,
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Counting<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            (self.report)(*n as u64);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl ImageStore {
    /// Pulls `reference` from its registry into the store.
    pub fn pull(
        &self,
        reference: &str,
        events: Arc<dyn Fn(PullEvent) + Send + Sync>,
    ) -> Result<ImageRecord> {
        let name = normalize(reference);
        let r: Reference = name.parse().map_err(|e: oci_client::ParseError| {
            ImageError::BadReference(reference.into(), e.to_string())
        })?;
        let staging = self.staging("pull-")?;
        let dir = staging.path().to_path_buf();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .at(|| "starting the pull's runtime")?;
        rt.block_on(self.fetch(&r, &name, &dir, events))
            .map_err(|e| ImageError::Pull {
                name: name.clone(),
                source: Box::new(e),
            })?;
        let mut records = self.import_staged(&dir, &name)?;
        records
            .pop()
            .ok_or_else(|| ImageError::Unsupported(format!("pulling {name}: nothing was imported")))
    }

    /// Writes `r`'s manifest, config and layers as an OCI layout in `dir`:
    /// the manifest resolved (through an index to linux/amd64) and checked,
    /// the blobs fetched (or linked from the store), the layout's index.
    async fn fetch(
        &self,
        r: &Reference,
        name: &str,
        dir: &Path,
        events: Arc<dyn Fn(PullEvent) + Send + Sync>,
    ) -> Result<()> {
        // ring as rustls's crypto: installed once per process (a second
        // install reports the first, which is as good).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let protocol = if registry_is_insecure(r.resolve_registry()) {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        };
        let client = Client::new(ClientConfig {
            protocol,
            ..Default::default()
        });
        let (body, manifest, digest) = resolve_manifest(&client, r, name).await?;
        let blobs = dir.join("blobs/sha256");
        tokio::fs::create_dir_all(&blobs)
            .await
            .at(|| shown(&blobs))?;
        let mpath = blobs.join(digest_hex(&digest)?);
        tokio::fs::write(&mpath, &body).await.at(|| shown(&mpath))?;
        events(PullEvent::Resolved {
            digest: digest.clone(),
            layers: manifest
                .layers()
                .iter()
                .map(|l| (l.digest().to_string(), l.size()))
                .collect(),
        });
        self.fetch_blobs(&client, r, &manifest, &blobs, events)
            .await?;
        write_layout(dir, name, &manifest, &digest, body.len()).await
    }

    /// The config and every layer into `blobs`, CONCURRENT_LAYERS at a time;
    /// one the store has is linked, not fetched.
    async fn fetch_blobs(
        &self,
        client: &Client,
        r: &Reference,
        manifest: &ImageManifest,
        blobs: &Path,
        events: Arc<dyn Fn(PullEvent) + Send + Sync>,
    ) -> Result<()> {
        let mut wanted: Vec<(String, bool)> = vec![(manifest.config().digest().to_string(), false)];
        wanted.extend(
            manifest
                .layers()
                .iter()
                .map(|l| (l.digest().to_string(), true)),
        );
        let fetches = wanted.into_iter().map(|(d, is_layer)| {
            let events = events.clone();
            let path = digest_hex(&d).map(|h| blobs.join(h));
            async move {
                let path = path?;
                if let Some(have) = self.has_blob(&d) {
                    // Same filesystem: a link, not a copy.
                    std::fs::hard_link(&have, &path)
                        .or_else(|_| std::fs::copy(&have, &path).map(|_| ()))
                        .at(|| shown(&path))?;
                    if is_layer {
                        events(PullEvent::Exists { digest: d });
                    }
                    return Ok(());
                }
                let file = tokio::fs::File::create(&path).await.at(|| shown(&path))?;
                let report = {
                    let (events, d) = (events.clone(), d.clone());
                    Arc::new(move |n| {
                        if is_layer {
                            events(PullEvent::Progress {
                                digest: d.clone(),
                                bytes: n,
                            })
                        }
                    })
                };
                client
                    .pull_blob(
                        r,
                        d.as_str(),
                        Counting {
                            inner: file,
                            report,
                        },
                    )
                    .await
                    .map_err(|e| ImageError::Registry {
                        what: format!("blob {d}"),
                        message: e.to_string(),
                    })?;
                if is_layer {
                    events(PullEvent::Done { digest: d });
                }
                Ok(())
            }
        });
        let results: Vec<Result<()>> = futures_util::stream::iter(fetches)
            .buffer_unordered(CONCURRENT_LAYERS)
            .collect()
            .await;
        results.into_iter().collect()
    }
}

/// `r`'s image manifest: its bytes, parsed, and its digest (checked against
/// the reference's). An index leads to its linux/amd64 manifest, whose
/// bytes are checked against the digest the index gives.
async fn resolve_manifest(
    client: &Client,
    r: &Reference,
    name: &str,
) -> Result<(Vec<u8>, ImageManifest, String)> {
    let auth = RegistryAuth::Anonymous;
    let accept = [
        OCI_IMAGE_MEDIA_TYPE,
        IMAGE_MANIFEST_MEDIA_TYPE,
        OCI_IMAGE_INDEX_MEDIA_TYPE,
        IMAGE_MANIFEST_LIST_MEDIA_TYPE,
    ];
    let json = |what: &str| {
        let what = what.to_string();
        move |source| ImageError::Json { what, source }
    };
    let (mut body, _) = client
        .pull_manifest_raw(r, &auth, &accept)
        .await
        .map_err(|e| ImageError::Registry {
            what: format!("manifest from {}", r.resolve_registry()),
            message: e.to_string(),
        })?;
    let top: serde_json::Value =
        serde_json::from_slice(&body).map_err(json("the registry's manifest is not JSON"))?;
    if top.get("manifests").is_some() {
        let index: ImageIndex = serde_json::from_slice(&body).map_err(json("image index"))?;
        let m = index
            .manifests()
            .iter()
            .find(|m| {
                m.platform().as_ref().is_some_and(|p| {
                    p.os().to_string() == "linux" && p.architecture().to_string() == "amd64"
                })
            })
            .ok_or_else(|| ImageError::Unsupported(format!("{name} has no linux/amd64 image")))?;
        let by_digest = r.clone_with_digest(m.digest().to_string());
        let (b, _) = client
            .pull_manifest_raw(&by_digest, &auth, &accept)
            .await
            .map_err(|e| ImageError::Registry {
                what: format!("manifest {}", m.digest()),
                message: e.to_string(),
            })?;
        let got = format!("sha256:{:x}", Sha256::digest(&b));
        if got != m.digest().to_string() {
            return Err(ImageError::Corrupt(format!(
                "manifest {} is corrupt: its contents hash to {got}",
                m.digest()
            )));
        }
        body = b;
    }
    let manifest: ImageManifest =
        serde_json::from_slice(&body).map_err(json("the image manifest"))?;
    let digest = format!("sha256:{:x}", Sha256::digest(&body));
    if let Some(want) = r.digest() {
        if want != digest {
            return Err(ImageError::Corrupt(format!(
                "manifest of {name} hashes to {digest}, not the {want} asked for"
            )));
        }
    }
    Ok((body.to_vec(), manifest, digest))
}

/// The OCI layout's marker and index, naming the manifest `name`.
async fn write_layout(
    dir: &Path,
    name: &str,
    manifest: &ImageManifest,
    digest: &str,
    size: usize,
) -> Result<()> {
    tokio::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)
        .await
        .at(|| shown(dir))?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": manifest.media_type().as_ref().map(|m| m.to_string()).unwrap_or_else(|| OCI_IMAGE_MEDIA_TYPE.into()),
            "digest": digest,
            "size": size,
            "annotations": {"org.opencontainers.image.ref.name": name},
        }],
    });
    tokio::fs::write(dir.join("index.json"), index.to_string())
        .await
        .at(|| shown(dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries_are_plain_http() {
        for r in [
            "localhost:5000",
            "127.0.0.1:5000",
            "[::1]:5000",
            "127.1.2.3",
        ] {
            assert!(registry_is_insecure(r), "{r}");
        }
        for r in ["registry-1.docker.io", "ghcr.io", "10.0.0.1:5000"] {
            assert!(!registry_is_insecure(r), "{r}");
        }
    }
}
