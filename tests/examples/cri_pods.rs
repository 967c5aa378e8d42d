//! Starts N pods at once through a containerd's CRI socket, each a sandbox
//! and one busybox container (`sleep`), and prints how long each took from
//! RunPodSandbox to its container started; then stops and removes them.
//! bench/ctr runs it against husk's and runc's runtime handlers.
//!
//! Usage: cri_pods SOCKET HANDLER N
//! Output: one line per pod `pod <i> <seconds>`, then
//! `pods=<N> handler=<h> p50=<s> p99=<s> max=<s> wall=<s>`. With
//! CRI_PODS_HOLD=1 it then waits for a line on stdin before stopping the
//! pods (the caller measures them running).

use std::time::{Duration, Instant};

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;

#[path = "../cri/client.rs"]
mod cri;
use cri::{connect, pod_config};
use tonic::transport::Channel;

/// One pod: sandbox, container created and started. Returns its id and
/// the time it took.
async fn start_pod(
    mut rt: RuntimeServiceClient<Channel>,
    handler: String,
    i: usize,
) -> Result<(String, Duration), String> {
    let t = Instant::now();
    let config = pod_config(&format!("{handler}-{i}"), "bench");
    let pod = rt
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.clone(),
        })
        .await
        .map_err(|e| format!("pod {i}: RunPodSandbox: {e}"))?
        .into_inner()
        .pod_sandbox_id;
    let c = rt
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: "sleep".into(),
                    attempt: 0,
                }),
                image: Some(ImageSpec {
                    image: "husk.local/busybox:latest".into(),
                    ..Default::default()
                }),
                args: vec!["sleep".into(), "3600".into()],
                linux: Some(LinuxContainerConfig::default()),
                ..Default::default()
            }),
            sandbox_config: Some(config),
        })
        .await
        .map_err(|e| format!("pod {i}: CreateContainer: {e}"))?
        .into_inner()
        .container_id;
    rt.start_container(StartContainerRequest { container_id: c })
        .await
        .map_err(|e| format!("pod {i}: StartContainer: {e}"))?;
    Ok((pod, t.elapsed()))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: cri_pods SOCKET HANDLER N");
        std::process::exit(2);
    }
    let n: usize = args[3].parse().expect("N");
    let rt = match connect(args[1].clone().into()).await {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cri_pods: {e}");
            std::process::exit(1);
        }
    };
    let wall = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| tokio::spawn(start_pod(rt.clone(), args[2].clone(), i)))
        .collect();
    let mut times = Vec::new();
    let mut pods = Vec::new();
    let mut failed = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await {
            Ok(Ok((pod, d))) => {
                println!("pod {i} {:.3}", d.as_secs_f64());
                times.push(d.as_secs_f64());
                pods.push(pod);
            }
            Ok(Err(e)) => failed.push(e),
            Err(e) => failed.push(format!("pod {i}: {e}")),
        }
    }
    let wall = wall.elapsed().as_secs_f64();
    if failed.is_empty() {
        times.sort_by(f64::total_cmp);
        let pct =
            |p: f64| times[((p * times.len() as f64).ceil() as usize).clamp(1, times.len()) - 1];
        println!(
            "pods={n} handler={} p50={:.3} p99={:.3} max={:.3} wall={wall:.3}",
            args[2],
            pct(0.50),
            pct(0.99),
            times[times.len() - 1]
        );
        if std::env::var_os("CRI_PODS_HOLD").is_some() {
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
        }
    }
    // Pods a failed start left are found by listing.
    let mut rt2 = rt.clone();
    if let Ok(list) = rt2.list_pod_sandbox(ListPodSandboxRequest::default()).await {
        for p in list.into_inner().items {
            if !pods.contains(&p.id) {
                pods.push(p.id);
            }
        }
    }
    for pod in &pods {
        let mut rt = rt.clone();
        let _ = rt
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await;
        let _ = rt
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await;
    }
    if !failed.is_empty() {
        for f in &failed {
            eprintln!("cri_pods: {f}");
        }
        std::process::exit(1);
    }
}
