//! Images given to a running sandbox: a read-only drive slot left to its
//! empty placeholder at start is backed by an image's erofs through the
//! VMM's `PATCH /drives` (Firecracker's placeholder pattern: virtio-mmio
//! has no hotplug). The guest mounts it only afterwards (the agent waits
//! for the device's new capacity).
//!
//! A slot keeps its file for the VM's life: the guest's page cache of a
//! device is not invalidated when its backing changes, so a slot given
//! one image and later another would serve the first one's blocks. A
//! second container of an image the sandbox has takes the same slot.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::machine::{slot_device, slot_id, RO_SLOTS};
use super::{Result, SandboxError};
use crate::util::{shown, IoContext};
use crate::vmm::VmmClient;

/// A PATCH reopens one file: seconds would mean a stuck VMM.
const PATCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The sandbox's patched slots and the directory their files are linked
/// into.
#[derive(Debug)]
pub(crate) struct HotDrives {
    /// `<cache dir>/drives/<sandbox id>`: a hard link to each patched
    /// slot's file. On the cache's file system (where the images are), so
    /// linking is instant, and the VMM's jail shows this directory, not
    /// the whole cache. A link also keeps the image alive when the
    /// layer cache evicts it.
    dir: PathBuf,
    /// The first read-only slot the sandbox's start left empty.
    first_free: usize,
    /// (device, inode) of the image behind each patched slot, in order
    /// from `first_free`.
    given: Vec<(u64, u64)>,
}

impl HotDrives {
    /// The directory of sandbox `id`'s patched drives under `cache_dir`.
    pub(crate) fn dir_of(cache_dir: &Path, id: &str) -> PathBuf {
        cache_dir.join("drives").join(id)
    }

    /// An empty directory for sandbox `id` (one left by a sandbox of the
    /// same id that died is emptied), whose start took `taken` read-only
    /// slots.
    pub(crate) fn prepare(cache_dir: &Path, id: &str, taken: usize) -> Result<HotDrives> {
        let dir = Self::dir_of(cache_dir, id);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).at(|| shown(&dir))?;
        }
        std::fs::create_dir_all(&dir).at(|| shown(&dir))?;
        Ok(HotDrives {
            dir,
            first_free: taken,
            given: Vec::new(),
        })
    }

    /// A sandbox found again (its holder restarted): which slots it
    /// patched is not known, so none is given again.
    pub(crate) fn found(cache_dir: &Path, id: &str) -> HotDrives {
        HotDrives {
            dir: Self::dir_of(cache_dir, id),
            first_free: RO_SLOTS,
            given: Vec::new(),
        }
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The guest device backed by `image`: the slot that already has it,
    /// else the next empty one, patched through the VMM's API at `api`.
    pub(crate) fn attach(&mut self, api: &Path, image: &Path) -> Result<String> {
        let meta = std::fs::metadata(image).at(|| shown(image))?;
        let identity = (meta.dev(), meta.ino());
        if let Some(i) = self.given.iter().position(|g| *g == identity) {
            return Ok(slot_device(true, self.first_free + i));
        }
        let slot = self.first_free + self.given.len();
        if slot >= RO_SLOTS {
            return Err(SandboxError::Drives(format!(
                "no free read-only drive slot for {}: a sandbox has {RO_SLOTS}, and {} are taken \
                 (a slot keeps its image for the VM's life)",
                image.display(),
                slot
            )));
        }
        let id = slot_id(true, slot);
        let link = self.dir.join(format!("{id}.erofs"));
        let _ = std::fs::remove_file(&link);
        if let Err(e) = std::fs::hard_link(image, &link) {
            // Another file system than the cache's: a copy is as good,
            // only slower.
            if e.raw_os_error() != Some(libc::EXDEV) {
                return Err(Err::<(), _>(e)
                    .at(|| format!("linking {} to {}", image.display(), link.display()))
                    .unwrap_err()
                    .into());
            }
            std::fs::copy(image, &link)
                .at(|| format!("copying {} to {}", image.display(), link.display()))?;
        }
        let patched = VmmClient::new(api, PATCH_TIMEOUT).patch_drive(&id, &link);
        if let Err(source) = patched {
            let _ = std::fs::remove_file(&link);
            return Err(SandboxError::Patch { drive: id, source });
        }
        self.given.push(identity);
        Ok(slot_device(true, slot))
    }

    /// Removes the directory (the sandbox is gone).
    pub(crate) fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_past_the_start_are_counted_and_bounded() {
        let cache = tempfile::tempdir().unwrap();
        let mut h = HotDrives::prepare(cache.path(), "pod", RO_SLOTS).unwrap();
        assert!(h.dir().is_dir());
        let image = cache.path().join("a.erofs");
        std::fs::write(&image, [0u8; 512]).unwrap();
        // Every slot was taken at start: refused before any API call.
        let e = h.attach(&cache.path().join("no.sock"), &image).unwrap_err();
        assert!(
            e.to_string().contains("no free read-only drive slot"),
            "{e}"
        );
        // A VMM that does not answer: the link is undone, the slot free.
        let mut h = HotDrives::prepare(cache.path(), "pod", 1).unwrap();
        let e = h.attach(&cache.path().join("no.sock"), &image).unwrap_err();
        assert!(
            crate::util::chain(&e).contains("ro1"),
            "{}",
            crate::util::chain(&e)
        );
        assert_eq!(std::fs::read_dir(h.dir()).unwrap().count(), 0);
        assert!(h.given.is_empty());
        h.remove();
        assert!(!h.dir().exists());
    }
}
