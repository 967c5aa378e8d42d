//! Kubernetes' CRI, through a real containerd (Debian's 1.6, started by the
//! test with the CRI plugin, its own root, state, socket and CNI config),
//! running a pod with runtime handler `husk`: the pod's sandbox container
//! starts the microVM, its containers join it, CNI's pod IP is the VM's.
//! One pod serves every check (each VM start is slow here).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use husk_tests::containerd::{Cri, Options};
use husk_tests::{kvm_unavailable, root_unavailable, sample_image, skip, tail, Containerd};
use k8s_cri::v1::*;

#[path = "../cri/client.rs"]
mod cri;
use cri::{connect, pod_config};

const SUBNET: &str = "10.99.0.0/24";
const BRIDGE: &str = "huskcni0";

fn container_config(name: &str, image: &str, args: &[&str]) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        args: args.iter().map(|a| a.to_string()).collect(),
        linux: Some(LinuxContainerConfig::default()),
        ..Default::default()
    }
}

/// GET / from `ip:80`, retried until it answers (the server starts in the
/// guest after its container does).
fn http_get(ip: &str, within: Duration) -> Result<String, String> {
    let deadline = Instant::now() + within;
    loop {
        let r = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(
                &format!("{ip}:80").parse().unwrap(),
                Duration::from_secs(10),
            )?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            s.write_all(b"GET / HTTP/1.0\r\nHost: pod\r\n\r\n")?;
            let mut body = String::new();
            s.read_to_string(&mut body)?;
            Ok(body)
        })();
        match r {
            Ok(b) if b.contains("200") => return Ok(b),
            r if Instant::now() > deadline => return Err(format!("{r:?}")),
            _ => std::thread::sleep(Duration::from_secs(1)),
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn pgrep(pattern: &str) -> Vec<String> {
    let out = Command::new("pgrep")
        .args(["-af", pattern])
        .output()
        .unwrap();
    text(&out.stdout)
        .lines()
        .filter(|l| !l.contains("pgrep"))
        .map(String::from)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cri_pod_runs_in_one_husk_vm_with_the_cni_address() {
    let test = "a_cri_pod_runs_in_one_husk_vm_with_the_cni_address";
    if let Some(why) = kvm_unavailable().or_else(root_unavailable) {
        return skip(test, &why);
    }
    husk_tests::programs::require("/usr/lib/cni/bridge").unwrap_or_else(|e| panic!("{e:#}"));
    let c = Containerd::start_with(&Options {
        husk: true,
        debug: true,
        cri: Some(Cri {
            bridge: BRIDGE.into(),
            subnet: SUBNET.into(),
        }),
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
    for image in ["busybox.tar", "httpd.tar", "pause.tar"] {
        let archive = sample_image(image).unwrap();
        c.ctr(&["image", "import", archive.to_str().unwrap()])
            .unwrap_or_else(|e| panic!("{e:#}"));
    }
    let rt0 = connect(c.socket.clone()).await.unwrap();
    let mut rt = rt0.clone();
    let log = |what: &str| {
        format!(
            "{what}\n--- containerd log (tail) ---\n{}\n{}",
            tail(&c.log(), 20000),
            c.consoles(12000)
        )
    };

    // The pod: its VM takes over the namespace CNI set up.
    let config = pod_config("web", "default");
    let pod = rt
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: "husk".into(),
        })
        .await
        .unwrap_or_else(|e| panic!("{}", log(&format!("RunPodSandbox: {e}"))))
        .into_inner()
        .pod_sandbox_id;
    let status = rt
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(status.state, PodSandboxState::SandboxReady as i32);
    let ip = status.network.unwrap().ip;
    let addr: Ipv4Addr = ip.parse().unwrap_or_else(|_| panic!("pod IP {ip:?}"));
    assert_eq!(addr.octets()[..3], [10, 99, 0], "{ip} not from {SUBNET}");
    let vmms = pgrep(&c.husk_run().display().to_string());
    println!("pod {pod} at {ip}; VMM: {vmms:?}");

    // Two containers in the pod's VM: a web server, and a client reaching
    // it on localhost.
    let create = |name: &str, image: &str, args: &[&str], memory: i64| {
        let mut cfg = container_config(name, image, args);
        if memory > 0 {
            cfg.linux = Some(LinuxContainerConfig {
                resources: Some(LinuxContainerResources {
                    memory_limit_in_bytes: memory,
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        let req = CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(cfg),
            sandbox_config: Some(config.clone()),
        };
        let mut rt = rt0.clone();
        async move {
            let id = rt
                .create_container(req)
                .await
                .map_err(|e| format!("CreateContainer: {e}"))?
                .into_inner()
                .container_id;
            rt.start_container(StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .map_err(|e| format!("StartContainer: {e}"))?;
            Ok::<_, String>(id)
        }
    };
    let web = create("web", "husk.local/httpd:latest", &[], 0)
        .await
        .unwrap_or_else(|e| panic!("{}", log(&e)));
    let client = create("client", "husk.local/busybox:latest", &["sleep", "3600"], 0)
        .await
        .unwrap_or_else(|e| panic!("{}", log(&e)));
    let exec = |id: &str, cmd: &[&str]| {
        let req = ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|a| a.to_string()).collect(),
            timeout: 120,
        };
        let mut rt = rt0.clone();
        async move { rt.exec_sync(req).await.map(|r| r.into_inner()) }
    };
    // An exec that must get an answer: a failure shows containerd's log
    // and the guest consoles.
    let exec_ok = |id: &str, cmd: &[&str]| {
        let r = exec(id, cmd);
        let log = &log;
        async move {
            r.await
                .unwrap_or_else(|e| panic!("{}", log(&format!("ExecSync: {e}"))))
        }
    };
    let mut got = None;
    let mut last = None;
    for _ in 0..30 {
        let r = exec_ok(&client, &["wget", "-qO-", "http://127.0.0.1:80/"]).await;
        if r.exit_code == 0 {
            got = Some(text(&r.stdout));
            break;
        }
        last = Some(r);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let page = match got {
        Some(p) => p,
        None => {
            let web_status = rt
                .container_status(ContainerStatusRequest {
                    container_id: web.clone(),
                    verbose: false,
                })
                .await
                .map(|s| format!("{:?}", s.into_inner().status));
            let ps = exec(&client, &["ps", "-o", "pid,comm,args"]).await;
            let net = exec(&client, &["netstat", "-tln"]).await;
            panic!(
                "{}",
                log(&format!(
                    "the client never reached the web server on localhost: last wget {last:?}\n\
                     web: {web_status:?}\nclient's ps: {ps:?}\nclient's netstat: {net:?}"
                ))
            )
        }
    };
    assert!(page.contains("hello from a husk microVM"), "{page}");
    // Both in the VM (the guest's kernel, not the host's), one UTS
    // namespace (the pod's hostname), one network.
    let uname = exec_ok(&client, &["uname", "-r"]).await;
    let host_release = text(&Command::new("uname").arg("-r").output().unwrap().stdout);
    assert_ne!(text(&uname.stdout).trim(), host_release.trim());
    assert!(text(&uname.stdout).starts_with("6.12"), "{:?}", uname);
    for id in [&web, &client] {
        let h = exec_ok(id, &["hostname"]).await;
        assert_eq!(text(&h.stdout).trim(), "web", "{h:?}");
    }
    // The members' roots are their images' erofs on drives (an overlay in
    // the guest), not shares of containerd's mounts: the first one's on the
    // drive its VM was restored with, the next ones' in slots the running
    // VMM was given.
    for id in [&web, &client] {
        let m = exec_ok(id, &["cat", "/proc/mounts"]).await;
        let root = text(&m.stdout)
            .lines()
            .find(|l| l.split(' ').nth(1) == Some("/"))
            .map(String::from);
        assert!(
            root.as_deref()
                .is_some_and(|r| r.starts_with("overlay / overlay")
                    && r.contains("lowerdir=/run/husk/storage/image")),
            "{id}'s root: {root:?}\n{}",
            log("a member's root is not its image's drive")
        );
    }
    let a = exec_ok(&client, &["ip", "-4", "-o", "addr", "show", "eth0"]).await;
    assert!(text(&a.stdout).contains(&format!("{ip}/24")), "{a:?}");
    // An exec's exit code comes back.
    let r = exec_ok(&web, &["sh", "-c", "exit 7"]).await;
    assert_eq!(r.exit_code, 7);

    // The pod IP from the host, through CNI's bridge, the veth and the tc
    // redirect into the VM.
    let body = match http_get(&ip, Duration::from_secs(60)) {
        Ok(b) => b,
        Err(e) => {
            let mut why = format!("no answer from {ip}:80: {e}\n");
            for cmd in [
                &["netstat", "-tln"][..],
                &["ip", "route"],
                &["ip", "-s", "link"],
            ] {
                let r = exec(&client, cmd).await;
                why += &format!("guest {cmd:?}: {r:?}\n");
            }
            for ns in std::fs::read_dir("/var/run/netns").unwrap().flatten() {
                let name = ns.file_name().to_string_lossy().into_owned();
                for cmd in [
                    "ip -s link",
                    "tc -s filter show dev eth0 ingress",
                    "ip addr",
                ] {
                    let out = Command::new("sh")
                        .arg("-c")
                        .arg(format!("ip netns exec {name} {cmd}"))
                        .output()
                        .unwrap();
                    why += &format!("{name} {cmd}: {}{}\n", text(&out.stdout), text(&out.stderr));
                }
            }
            panic!("{}", log(&why));
        }
    };
    assert!(body.contains("hello from a husk microVM"), "{body}");

    // A container over its memory limit: OOM-killed in the guest, reported
    // by the agent, published as TaskOOM, shown by CRI as OOMKilled.
    let hog = create(
        "hog",
        "husk.local/busybox:latest",
        &["sh", "-c", "tail /dev/zero"],
        32 << 20,
    )
    .await
    .unwrap_or_else(|e| panic!("{}", log(&e)));
    let deadline = Instant::now() + Duration::from_secs(300);
    let st = loop {
        let st = rt
            .container_status(ContainerStatusRequest {
                container_id: hog.clone(),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap();
        if st.state == ContainerState::ContainerExited as i32 {
            break st;
        }
        assert!(Instant::now() < deadline, "{}", log("the hog never exited"));
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert_eq!(st.reason, "OOMKilled", "{st:?}");
    assert_eq!(st.exit_code, 137, "{st:?}");
    // The rest of the pod is unharmed.
    let r = exec_ok(&client, &["true"]).await;
    assert_eq!(r.exit_code, 0);
    // A removed container leaves the pod's VM.
    rt.remove_container(RemoveContainerRequest {
        container_id: hog.clone(),
    })
    .await
    .unwrap();

    // Stop and remove: nothing left of the pod.
    rt.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .unwrap_or_else(|e| panic!("{}", log(&format!("StopPodSandbox: {e}"))));
    rt.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .unwrap_or_else(|e| panic!("{}", log(&format!("RemovePodSandbox: {e}"))));
    let run_dir = c.husk_run();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let vmms = pgrep(&run_dir.display().to_string());
        let fsd = pgrep(&format!("virtiofsd.*{}", run_dir.display()));
        let dirs: Vec<_> = std::fs::read_dir(run_dir)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        let shim = pgrep(&format!("containerd-shim-husk-v2.*{pod}"));
        if vmms.is_empty() && fsd.is_empty() && dirs.is_empty() && shim.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}",
            log(&format!(
                "left behind: VMMs {vmms:?} virtiofsd {fsd:?} sandbox dirs {dirs:?} shim {shim:?}"
            ))
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let ours: Vec<_> = mounts
        .lines()
        .filter(|l| l.contains(&*c.dir().to_string_lossy()) && l.contains(&pod))
        .collect();
    assert!(ours.is_empty(), "mounts left: {ours:?}");
    let netns: Vec<_> = std::fs::read_dir("/var/run/netns")
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    println!("netns after: {netns:?}");
    let links = text(
        &Command::new("ip")
            .args(["-o", "link"])
            .output()
            .unwrap()
            .stdout,
    );
    assert!(!links.contains("husk-"), "a tap left on the host: {links}");
    let list = rt
        .list_pod_sandbox(ListPodSandboxRequest::default())
        .await
        .unwrap()
        .into_inner()
        .items;
    assert!(list.is_empty(), "{list:?}");
}
