//! The host halves of a pod, without a VM: shares added to a running
//! virtiofsd, and a CNI-style network namespace taken over with a tap and
//! tc redirects.

use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use husk_runtime::net::podnet::PodNet;
use husk_runtime::storage::shared::{HostShare, SharedFs};
use husk_tests::NetNs;

fn mountinfo_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default()
}

#[test]
fn shares_are_added_to_and_removed_from_a_running_virtiofsd() {
    if let Some(why) = husk_tests::root_unavailable() {
        return husk_tests::skip(
            "shares_are_added_to_and_removed_from_a_running_virtiofsd",
            &why,
        );
    }
    let virtiofsd = husk_runtime::storage::shared::default_virtiofsd();
    if !virtiofsd.exists() {
        return husk_tests::skip(
            "shares_are_added_to_and_removed_from_a_running_virtiofsd",
            "no virtiofsd (qemu-system-common)",
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first");
    let second = dir.path().join("second");
    let third = dir.path().join("third");
    for (d, f) in [(&first, "one"), (&second, "two"), (&third, "three")] {
        std::fs::create_dir(d).unwrap();
        std::fs::write(d.join(f), f).unwrap();
    }
    let sandbox = dir.path().join("sandbox");
    std::fs::create_dir(&sandbox).unwrap();
    let mut fs = SharedFs::start(
        &virtiofsd,
        &sandbox,
        &[HostShare {
            source: first.clone(),
            read_only: false,
        }],
    )
    .unwrap();
    let pid = fs.pid();

    let i = fs
        .add(&HostShare {
            source: second.clone(),
            read_only: false,
        })
        .unwrap();
    assert_eq!(i, 1);
    let j = fs
        .add(&HostShare {
            source: third.clone(),
            read_only: true,
        })
        .unwrap();
    assert_eq!(j, 2);
    // What virtiofsd serves: its root is the shared directory.
    let root = format!("/proc/{pid}/root");
    assert_eq!(
        std::fs::read_to_string(format!("{root}/b0/one")).unwrap(),
        "one"
    );
    assert_eq!(
        std::fs::read_to_string(format!("{root}/b1/two")).unwrap(),
        "two"
    );
    assert_eq!(
        std::fs::read_to_string(format!("{root}/b2/three")).unwrap(),
        "three"
    );
    // The added read-only share refuses writes in virtiofsd's view; the
    // read-write one takes them and the host sees them.
    let e = std::fs::write(format!("{root}/b2/x"), "x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    std::fs::write(format!("{root}/b1/new"), "from the share").unwrap();
    assert_eq!(
        std::fs::read_to_string(second.join("new")).unwrap(),
        "from the share"
    );
    // Nothing of it on the host's mount table (other tests may mount
    // their own things meanwhile: only this directory counts).
    let host = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let here = dir.path().to_str().unwrap();
    assert!(!host.contains(here), "{host}");

    fs.remove(1).unwrap();
    assert!(
        !mountinfo_of(pid).contains(" /b1 "),
        "{}",
        mountinfo_of(pid)
    );
    assert!(!sandbox.join("shared/b1").exists());
    assert!(Path::new(&format!("{root}/b2/three")).exists());
    // The next share gets a new name, never b1 again.
    let k = fs
        .add(&HostShare {
            source: second.clone(),
            read_only: false,
        })
        .unwrap();
    assert_eq!(k, 3);
    // A missing source is refused and leaves no entry.
    let e = fs
        .add(&HostShare {
            source: dir.path().join("missing"),
            read_only: false,
        })
        .unwrap_err();
    assert!(format!("{e:#}").contains("missing"), "{e:#}");
    drop(fs);
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_cni_namespace_is_taken_over_with_a_tap_and_tc_redirects() {
    if let Some(why) = husk_tests::root_unavailable() {
        return husk_tests::skip(
            "a_cni_namespace_is_taken_over_with_a_tap_and_tc_redirects",
            &why,
        );
    }
    // What CNI's bridge plugin leaves: a veth named eth0 in the pod's
    // namespace with an address and a default route.
    let ns = NetNs::new("podnet").unwrap();
    let host_end = format!("hv{}", std::process::id() % 100000);
    ip(&[
        "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
    ]);
    let del = scopeguard(&host_end);
    ns.exec(&[
        "ip",
        "link",
        "set",
        "eth0",
        "address",
        "0a:58:0a:58:00:07",
        "mtu",
        "1450",
        "up",
    ])
    .unwrap();
    ns.exec(&["ip", "addr", "add", "10.88.0.7/16", "dev", "eth0"])
        .unwrap();
    ns.exec(&["ip", "route", "add", "default", "via", "10.88.0.1"])
        .unwrap();
    ns.exec(&[
        "ip",
        "route",
        "add",
        "192.168.50.0/24",
        "via",
        "10.88.0.254",
    ])
    .unwrap();

    let path = Path::new("/var/run/netns").join(&ns.name);
    let (pod, tap) = PodNet::attach(&path).unwrap();
    let g = &pod.guest;
    assert_eq!(g.veth, "eth0");
    assert_eq!(g.mac, "0a:58:0a:58:00:07");
    assert_eq!(g.mtu, 1450);
    assert_eq!(g.addresses, vec![("10.88.0.7".parse().unwrap(), 16)]);
    let mut routes = g.routes.clone();
    routes.sort();
    assert_eq!(
        routes,
        vec![
            (None, Some("10.88.0.1".parse().unwrap())),
            (
                Some(("192.168.50.0".parse().unwrap(), 24)),
                Some("10.88.0.254".parse().unwrap())
            ),
        ]
    );
    // The tap is in the pod's namespace, not the host's, up, with the
    // veth's MTU, and each side redirects to the other.
    let links = String::from_utf8(ns.exec(&["ip", "-o", "link"]).unwrap().stdout).unwrap();
    assert!(links.contains(&format!("{}:", tap.name)), "{links}");
    assert!(links.contains("mtu 1450"), "{links}");
    assert!(!ip(&["-o", "link"]).contains(&format!("{}:", tap.name)));
    for (dev, to) in [("eth0", tap.name.as_str()), (tap.name.as_str(), "eth0")] {
        let f = String::from_utf8(
            ns.exec(&["tc", "filter", "show", "dev", dev, "ingress"])
                .unwrap()
                .stdout,
        )
        .unwrap();
        // "protocol all": a filter for another protocol number would
        // match nothing.
        assert!(f.contains("protocol all"), "{dev}: {f}");
        assert!(
            f.contains("mirred") && f.contains(&format!("to device {to}")),
            "{dev}: {f}"
        );
    }
    // Traffic really crosses: the host end asks for the pod's address and
    // the ARP request comes out of the tap (the VM's side), not answered
    // by the namespace's own stack.
    ip(&["addr", "add", "10.88.0.1/16", "dev", &host_end]);
    ip(&["link", "set", &host_end, "up"]);
    let mut ping = Command::new("ping")
        .args(["-c", "3", "-W", "1", "10.88.0.7"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // (IPv6 neighbour discovery of the host end comes through too.)
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let frame = read_frame(&tap.file, left)
            .unwrap_or_else(|| panic!("no ARP request out of the tap; frames: {seen:02x?}"));
        let arp = frame.len() >= 42 && frame[12..14] == [0x08, 0x06];
        if arp && frame[38..42] == [10, 88, 0, 7] {
            break;
        }
        seen.push(frame);
    }
    let _ = ping.kill();
    let _ = ping.wait();
    let neigh = ip(&["neigh", "show", "10.88.0.7"]);
    assert!(
        !neigh.contains("0a:58:0a:58:00:07"),
        "the namespace answered: {neigh}"
    );

    // Stopping gives the veth back as it was; the tap goes with its fd.
    drop(pod);
    drop(tap);
    let q = String::from_utf8(
        ns.exec(&["tc", "qdisc", "show", "dev", "eth0"])
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(!q.contains("ingress"), "{q}");
    let links = String::from_utf8(ns.exec(&["ip", "-o", "link"]).unwrap().stdout).unwrap();
    assert!(!links.contains("husk-"), "{links}");
    drop(del);

    // A namespace without an interface is refused by name.
    let empty = NetNs::new("podnet-empty").unwrap();
    let e = PodNet::attach(&Path::new("/var/run/netns").join(&empty.name))
        .err()
        .unwrap();
    assert!(format!("{e:#}").contains("did CNI run"), "{e:#}");
}

/// The first frame readable from the tap within `timeout`.
fn read_frame(tap: &std::fs::File, timeout: Duration) -> Option<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd {
        fd: tap.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd that outlives the call.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
    if n <= 0 {
        return None;
    }
    let mut buf = vec![0u8; 2048];
    let n = (&*tap).read(&mut buf).ok()?;
    buf.truncate(n);
    Some(buf)
}

/// Deletes the host end of the veth (and with it the pair) on drop.
fn scopeguard(name: &str) -> impl Drop + '_ {
    struct Del<'a>(&'a str);
    impl Drop for Del<'_> {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["link", "del", self.0]).status();
        }
    }
    Del(name)
}
