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

/// `husk bare-exec IMAGE CMD…`: a sandbox for the image, one fork+exec of
/// CMD in its root with no container, and the sandbox gone. The exit code
/// is the command's.
pub(crate) fn bare_exec(image: &str, command: &[String], warm: bool) -> Result<u8> {
    use husk_runtime::container::lifecycle::ContainerSpec;
    check_kvm()?;
    let rt = Runtime::locate()?;
    let store = ImageStore::open(&default_store_dir())?;
    let image = store.get(image)?;
    let id = format!("bare-{}", crate::run::random_id()?);
    let mut spec = ContainerSpec::new(&id, image);
    // No container is made: nothing to park.
    spec.boot = husk_runtime::Boot::Template;
    let mut starting = spec
        .plan(Some(&store))?
        .acquire(Some(&store), None)?
        .start(&rt)?;
    let b = starting.bare_exec(command, warm)?;
    println!(
        "bare-exec: status={} host-s={:.4} guest-s={:.4} setup-s={:.4}",
        b.status,
        b.host.as_secs_f64(),
        b.guest.as_secs_f64(),
        b.setup.as_secs_f64()
    );
    // Nothing of the sandbox is kept: no clean shutdown needed.
    drop(starting);
    Ok(u8::try_from(b.status).unwrap_or(255))
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
