//! `husk image` and `husk pull`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use husk_runtime::image::{default_store_dir, ImageStore};

#[derive(Subcommand)]
pub(crate) enum ImageCmd {
    /// Pull an image from a registry (linux/amd64).
    Pull { reference: String },
    /// Import images from an OCI-layout or docker-archive tarball.
    Import { file: PathBuf },
    /// List images.
    Ls,
    /// Remove images.
    Rm {
        #[arg(required = true)]
        images: Vec<String>,
    },
}

/// Pulls `reference` with a progress bar per layer (on a terminal).
pub(crate) fn pull(
    store: &ImageStore,
    reference: &str,
) -> Result<husk_runtime::image::ImageRecord> {
    use husk_runtime::image::pull::PullEvent;
    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    let multi = MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::stderr());
    let bars: Arc<Mutex<HashMap<String, ProgressBar>>> = Arc::default();
    let style = ProgressStyle::with_template("{prefix}: {msg} [{bar:30}] {bytes}/{total_bytes}")
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    let short = |d: &str| {
        d.trim_start_matches("sha256:")
            .chars()
            .take(12)
            .collect::<String>()
    };
    let events = {
        let bars = bars.clone();
        let reference = reference.to_string();
        Arc::new(move |e: PullEvent| {
            let Ok(mut bars) = bars.lock() else { return };
            match e {
                PullEvent::Resolved { digest, layers } => {
                    let _ = multi.println(format!("{reference}: resolved to {digest}"));
                    for (d, size) in layers {
                        let b = multi.add(ProgressBar::new(size));
                        b.set_style(style.clone());
                        b.set_prefix(short(&d));
                        b.set_message("Waiting");
                        bars.insert(d, b);
                    }
                }
                PullEvent::Exists { digest } => {
                    if let Some(b) = bars.get(&digest) {
                        b.finish_with_message("Already exists");
                    }
                }
                PullEvent::Progress { digest, bytes } => {
                    if let Some(b) = bars.get(&digest) {
                        b.set_message("Downloading");
                        b.inc(bytes);
                    }
                }
                PullEvent::Done { digest } => {
                    if let Some(b) = bars.get(&digest) {
                        b.finish_with_message("Pull complete");
                    }
                }
            }
        })
    };
    let r = store.pull(reference, events);
    for b in bars
        .lock()
        .map(|b| b.values().cloned().collect::<Vec<_>>())
        .unwrap_or_default()
    {
        if !b.is_finished() {
            b.abandon_with_message("Failed");
        }
    }
    Ok(r?)
}

pub(crate) fn image(cmd: ImageCmd) -> Result<()> {
    let store = ImageStore::open(&default_store_dir())?;
    match cmd {
        ImageCmd::Pull { reference } => {
            let r = pull(&store, &reference)?;
            println!("Status: Downloaded image for {}", r.name);
            println!("{}", r.name);
        }
        ImageCmd::Import { file } => {
            for r in store.import(&file)? {
                println!("Loaded image: {} ({})", r.name, r.short_id());
            }
        }
        ImageCmd::Ls => {
            println!(
                "{:<40} {:<14} {:>7}",
                "REPOSITORY:TAG", "IMAGE ID", "LAYERS"
            );
            for r in store.list()? {
                println!("{:<40} {:<14} {:>7}", r.name, r.short_id(), r.layers.len());
            }
        }
        ImageCmd::Rm { images } => {
            for i in images {
                let r = store.remove(&i)?;
                println!("Untagged: {}", r.name);
            }
        }
    }
    Ok(())
}
