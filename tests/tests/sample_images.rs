//! Tier 4: the sample OCI images are valid OCI and import into a real
//! containerd (Debian's 1.6, started by the test with its own state).

use std::collections::BTreeMap;
use std::io::Read;
use std::process::Command;

use husk_tests::{root_unavailable, sample_image, skip, Containerd};
use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};
use sha2::{Digest, Sha256};

fn read_archive(path: &std::path::Path) -> BTreeMap<String, Vec<u8>> {
    let f = std::fs::File::open(path).unwrap();
    let mut ar = tar::Archive::new(f);
    let mut files = BTreeMap::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        if e.header().entry_type().is_dir() {
            continue;
        }
        let p = e.path().unwrap().to_string_lossy().into_owned();
        let mut v = Vec::new();
        e.read_to_end(&mut v).unwrap();
        files.insert(p, v);
    }
    files
}

fn blob<'a>(files: &'a BTreeMap<String, Vec<u8>>, digest: &str) -> &'a [u8] {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    let data = files
        .get(&format!("blobs/sha256/{hex}"))
        .unwrap_or_else(|| panic!("blob {digest} missing"));
    assert_eq!(
        format!("{:x}", Sha256::digest(data)),
        hex,
        "blob {digest} corrupt"
    );
    data
}

#[test]
fn oci_layouts_validate_and_unpack() {
    for (name, want_cmd) in [("busybox", "sh"), ("httpd", "httpd")] {
        let path = sample_image(&format!("{name}.oci.tar")).unwrap();
        let files = read_archive(&path);
        assert!(files.contains_key("oci-layout"), "{name}: no oci-layout");
        let index: ImageIndex = serde_json::from_slice(&files["index.json"]).unwrap();
        assert_eq!(index.manifests().len(), 1);
        let mdesc = &index.manifests()[0];
        let manifest: ImageManifest =
            serde_json::from_slice(blob(&files, mdesc.digest().as_ref())).unwrap();
        let config: ImageConfiguration =
            serde_json::from_slice(blob(&files, manifest.config().digest().as_ref())).unwrap();
        for (layer, diff_id) in manifest.layers().iter().zip(config.rootfs().diff_ids()) {
            blob(&files, layer.digest().as_ref());
            // Uncompressed layers: the diff id is the layer digest.
            assert_eq!(&layer.digest().to_string(), diff_id);
        }
        let cmd = config.config().as_ref().unwrap().cmd().clone().unwrap();
        assert_eq!(cmd[0], want_cmd, "{name}: cmd {cmd:?}");

        // umoci unpacks it into an OCI runtime bundle whose config is valid.
        let dir = tempfile::tempdir().unwrap();
        let layout = dir.path().join("layout");
        std::fs::create_dir(&layout).unwrap();
        let st = Command::new("tar")
            .arg("-xf")
            .arg(&path)
            .arg("-C")
            .arg(&layout)
            .status()
            .unwrap();
        assert!(st.success());
        let bundle = dir.path().join("bundle");
        let out = Command::new("umoci")
            .args(["unpack", "--rootless", "--image"])
            .arg(format!("{}:latest", layout.display()))
            .arg(&bundle)
            .output()
            .expect("running umoci (apt-get install umoci)");
        assert!(
            out.status.success(),
            "umoci unpack {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let spec = oci_spec::runtime::Spec::load(bundle.join("config.json")).unwrap();
        assert_eq!(
            spec.process().as_ref().unwrap().args().as_ref().unwrap()[0],
            want_cmd
        );
        let rootfs = bundle.join("rootfs");
        assert!(rootfs.join("bin/busybox").is_file());
        assert_eq!(
            std::fs::read_link(rootfs.join("bin/sh")).unwrap(),
            std::path::Path::new("busybox")
        );
        if name == "httpd" {
            assert!(rootfs.join("www/index.html").is_file());
        }

        // skopeo reads both archive forms.
        for r in [
            format!("oci-archive:{}", path.display()),
            format!(
                "docker-archive:{}",
                sample_image(&format!("{name}.tar")).unwrap().display()
            ),
        ] {
            let out = Command::new("skopeo")
                .args(["inspect", &r])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "skopeo inspect {r}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[test]
fn images_import_into_containerd() {
    if let Some(why) = root_unavailable() {
        skip("images_import_into_containerd", &why);
        return;
    }
    let c = Containerd::start().unwrap_or_else(|e| panic!("{e:#}"));
    for file in ["busybox.oci.tar", "httpd.tar"] {
        let p = sample_image(file).unwrap();
        c.ctr(&["images", "import", p.to_str().unwrap()])
            .unwrap_or_else(|e| panic!("{e:#}\n{}", c.log()));
    }
    let list = c.ctr(&["images", "ls", "-q"]).unwrap();
    for name in ["husk.local/busybox:latest", "husk.local/httpd:latest"] {
        assert!(list.lines().any(|l| l == name), "{name} not in:\n{list}");
    }
    // Every blob is present and the rootfs was unpacked into the snapshotter.
    let check = c.ctr(&["images", "check"]).unwrap();
    for line in check.lines().skip(1) {
        assert!(line.contains("complete"), "incomplete image: {line}");
    }
    let snaps = c.ctr(&["snapshots", "ls"]).unwrap();
    assert!(snaps.lines().count() >= 3, "layers not unpacked:\n{snaps}");
}
