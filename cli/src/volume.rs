//! `husk volume`.

use anyhow::Result;
use clap::Subcommand;
use husk_runtime::storage::volume::VolumeStore;

#[derive(Subcommand)]
pub(crate) enum VolumeCmd {
    /// Create a volume (an ext4 file system, 1 GiB, sparse).
    Create { name: String },
    /// List volumes.
    Ls,
    /// Show a volume as JSON.
    Inspect { name: String },
    /// Remove volumes (not while a sandbox uses one).
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

pub(crate) fn volumes() -> Result<VolumeStore> {
    Ok(VolumeStore::open(
        &husk_runtime::default_data_dir().join("volumes"),
    )?)
}

pub(crate) fn volume(cmd: VolumeCmd) -> Result<()> {
    let store = volumes()?;
    match cmd {
        VolumeCmd::Create { name } => {
            store.create(&name, husk_runtime::storage::volume::DEFAULT_SIZE)?;
            println!("{name}");
        }
        VolumeCmd::Ls => {
            println!("{:<8} VOLUME NAME", "DRIVER");
            for v in store.list()? {
                println!("{:<8} {}", "local", v.name);
            }
        }
        VolumeCmd::Inspect { name } => {
            let v = store.get(&name)?;
            let info = serde_json::json!([{
                "Name": v.name, "Driver": "local", "Mountpoint": v.disk,
                "Options": {"size": v.size.to_string(), "type": "ext4"},
            }]);
            println!("{}", serde_json::to_string_pretty(&info)?);
        }
        VolumeCmd::Rm { names } => {
            for n in names {
                store.remove(&n)?;
                println!("{n}");
            }
        }
    }
    Ok(())
}
