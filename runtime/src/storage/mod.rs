//! What a sandbox's containers store and see: named volumes (ext4 images
//! on the read-write drive slots) and host paths shared over virtio-fs.

pub mod shared;
pub mod volume;
