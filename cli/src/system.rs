//! `husk info` and what every command checks first.

use anyhow::{bail, Result};
use husk_runtime::container::record::Status;
use husk_runtime::image::{default_store_dir, ImageStore};
use husk_runtime::Runtime;

use crate::container::records;

pub(crate) fn check_kvm() -> Result<()> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => Ok(()),
        Err(e) => bail!("/dev/kvm: {e}: husk runs each container in a KVM virtual machine"),
    }
}

pub(crate) fn info() -> Result<()> {
    let rt = Runtime::locate()?;
    let all = records()?.list()?;
    let running = all.iter().filter(|r| r.status == Status::Running).count();
    let images = ImageStore::open(&default_store_dir())?.list()?.len();
    let kvm = match check_kvm() {
        Ok(()) => "usable".to_string(),
        Err(e) => format!("{e:#}"),
    };
    println!("Containers: {}", all.len());
    println!(" Running: {running}");
    println!(" Stopped: {}", all.len() - running);
    println!("Images: {images}");
    println!("Server Version: husk {}", env!("CARGO_PKG_VERSION"));
    println!("Isolation: one KVM microVM per container (husk-vmm)");
    println!(" /dev/kvm: {kvm}");
    println!(
        " VMM confinement: {}",
        if rt.confine {
            format!(
                "namespaces (mnt, pid, ipc), chroot, uid {}, cgroup husk/<id>",
                husk_runtime::vmm::jail::vmm_uid()
            )
        } else {
            "off (not root, or HUSK_CONFINE=0)".into()
        }
    );
    println!(" Kernel: {}", rt.kernel.display());
    println!(" Guest image: {}", rt.guest_image.display());
    println!(" husk-vmm: {}", rt.vmm.display());
    println!(
        "Network: bridge {} {}/{} (NAT), none",
        rt.network.bridge, rt.network.subnet, rt.network.prefix
    );
    println!("Root Dir: {}", husk_runtime::default_data_dir().display());
    println!("Run Dir: {}", rt.run_dir.display());
    println!("Templates: {}", rt.cache_dir.join("templates").display());
    Ok(())
}
