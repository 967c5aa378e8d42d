//! Commands on containers that exist: exec, kill, stop, rm, ps,
//! inspect, logs.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use husk_protocol::agent::SignalProcessRequest;
use husk_runtime::container::record::{Record, Records, Status};
use husk_runtime::guest::{ctx, rpc_message, AgentConn, Io};
use husk_runtime::net::ports::docker_ports;

use crate::error::{Failure, HUSK_ERROR};
use crate::run::random_id;
use crate::tty::{forward_stdin, Terminal};

/// The agent of a running container's sandbox.
pub(crate) fn agent_of(id: &str) -> Result<(Record, AgentConn)> {
    let r = records()?.get(id)?;
    if r.status != Status::Running {
        bail!("container {} is not running", r.id);
    }
    let agent = husk_runtime::sandbox::connect_running(
        &husk_runtime::default_run_dir(),
        &r.id,
        Duration::from_secs(5),
    )
    .with_context(|| format!("reaching container {}", r.id))?;
    Ok((r, agent))
}

pub(crate) fn exec(
    interactive: bool,
    tty: bool,
    container: &str,
    command: Vec<String>,
) -> Result<u8, Failure> {
    let (r, agent) = agent_of(container)?;
    let exec_id = format!("exec-{}", random_id()?);
    let mut env = r.env.clone();
    if tty && !env.iter().any(|e| e.starts_with("TERM=")) {
        env.push("TERM=xterm".into());
    }
    let process = serde_json::json!({
        "args": command, "cwd": r.cwd, "env": env, "terminal": tty,
        "user": {"uid": 0, "gid": 0},
    });
    let io = Io {
        stdin: interactive,
        stdout: true,
        stderr: !tty,
    };
    let mut streams = match agent.exec(&r.id, &exec_id, &process, io) {
        Ok(s) => s,
        Err(e) => return Err(Failure::starting(e)),
    };
    let pipe = |from: Option<UnixStream>, mut to: Box<dyn Write + Send>| {
        std::thread::spawn(move || {
            if let Some(mut from) = from {
                let _ = std::io::copy(&mut from, &mut to);
                let _ = to.flush();
            }
        })
    };
    let out = pipe(streams.stdout.take(), Box::new(std::io::stdout()));
    let err = pipe(streams.stderr.take(), Box::new(std::io::stderr()));
    let _raw = tty.then(|| Terminal::attach(&agent, &r.id, &exec_id));
    if let Some(input) = streams.stdin.take() {
        forward_stdin(input);
    }
    let status = agent.wait(&r.id, &exec_id)?;
    let _ = out.join();
    let _ = err.join();
    Ok(u8::try_from(status.status).unwrap_or(HUSK_ERROR))
}

/// A signal by name (`TERM`, `SIGTERM`) or number.
pub(crate) fn parse_signal(s: &str) -> Result<u32> {
    if let Ok(n) = s.parse::<u32>() {
        return Ok(n);
    }
    let name = s.trim_start_matches("SIG").to_ascii_uppercase();
    Ok(match name.as_str() {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "KILL" => 9,
        "USR1" => 10,
        "USR2" => 12,
        "TERM" => 15,
        "STOP" => 19,
        "CONT" => 18,
        _ => bail!("unknown signal {s:?}"),
    })
}

pub(crate) fn signal(container: &str, sig: u32) -> Result<Record> {
    let (r, agent) = agent_of(container)?;
    let req = SignalProcessRequest {
        container_id: r.id.clone(),
        signal: sig,
        ..Default::default()
    };
    agent
        .containers
        .signal_process(ctx(Duration::from_secs(30)), &req)
        .map_err(|e| anyhow::anyhow!("signalling {}: {}", r.id, rpc_message(&e)))?;
    Ok(r)
}

/// Waits until `id`'s record says exited (its husk finished).
pub(crate) fn wait_exited(id: &str, timeout: Duration) -> Result<bool> {
    let rs = records()?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match rs.get(id) {
            Ok(r) if r.status != Status::Exited => {}
            _ => return Ok(true),
        }
        if std::time::Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(crate) fn stop(time: u64, containers: &[String]) -> Result<()> {
    for c in containers {
        let r = records()?.get(c)?;
        if r.status == Status::Running {
            signal(&r.id, 15)?;
            if !wait_exited(&r.id, Duration::from_secs(time))? {
                let _ = signal(&r.id, 9);
                wait_exited(&r.id, Duration::from_secs(60))?;
            }
        }
        println!("{c}");
    }
    Ok(())
}

pub(crate) fn rm(force: bool, containers: &[String]) -> Result<()> {
    let rs = records()?;
    for c in containers {
        let r = rs.get(c)?;
        if r.status == Status::Running {
            if !force {
                bail!("container {} is running: stop it first, or rm -f", r.id);
            }
            let _ = signal(&r.id, 9);
            if !wait_exited(&r.id, Duration::from_secs(60))? {
                bail!("container {} did not stop", r.id);
            }
        }
        // Its husk may have removed it already (--rm).
        if rs.get(&r.id).is_ok() {
            rs.remove(&r.id)?;
        }
        println!("{c}");
    }
    Ok(())
}

pub(crate) fn ps(all: bool) -> Result<()> {
    println!(
        "{:<14} {:<28} {:<22} {:<20} {:<24} NAMES",
        "CONTAINER ID", "IMAGE", "COMMAND", "STATUS", "PORTS"
    );
    for r in records()?.list()? {
        if !all && r.status != Status::Running {
            continue;
        }
        let status = match (r.status, r.exit_code) {
            (Status::Running, _) => format!(
                "Up {} s",
                husk_runtime::container::record::now().saturating_sub(r.created)
            ),
            (Status::Created, _) => "Created".into(),
            (Status::Exited, Some(c)) => format!("Exited ({c})"),
            (Status::Exited, None) => "Exited (failed)".into(),
        };
        let mut cmd = format!("{:?}", r.command.join(" "));
        if cmd.len() > 22 {
            cmd.truncate(19);
            cmd.push_str("...");
        }
        let short: String = r.id.chars().take(12).collect();
        let ports = match (&r.network, r.status) {
            (Some(n), Status::Running) => n
                .ports
                .iter()
                .map(|p| {
                    format!(
                        "{}->{}/{}",
                        std::net::SocketAddr::new(p.host_ip, p.host_port),
                        p.container_port,
                        p.protocol
                    )
                })
                .collect::<Vec<_>>()
                .join(", "),
            _ => String::new(),
        };
        println!(
            "{short:<14} {:<28} {cmd:<22} {status:<20} {ports:<24} {}",
            r.image, r.id
        );
    }
    Ok(())
}

pub(crate) fn inspect(containers: &[String]) -> Result<()> {
    let rs = records()?;
    let mut out = Vec::new();
    for c in containers {
        let r = rs.get(c)?;
        let status = match r.status {
            Status::Created => "created",
            Status::Running => "running",
            Status::Exited => "exited",
        };
        out.push(serde_json::json!({
            "Id": r.id,
            "Name": format!("/{}", r.id),
            "Created": r.created,
            "Path": r.command.first(),
            "Args": r.command.get(1..).unwrap_or_default(),
            "Image": r.image,
            "State": {
                "Status": status,
                "Running": r.status == Status::Running,
                "ExitCode": r.exit_code.unwrap_or(match (&r.error, r.failure_code) {
                    (None, _) => 0,
                    (Some(_), code) => code.unwrap_or(HUSK_ERROR).into(),
                }),
                "OOMKilled": r.oom_killed,
                "Error": r.error.clone().unwrap_or_default(),
                "Pid": if r.status == Status::Running { r.owner_pid } else { 0 },
            },
            "Config": {"Env": r.env, "WorkingDir": r.cwd, "Cmd": r.command},
            "Mounts": r.volumes.iter().map(|(name, dst, ro)| if name.starts_with('/') {
                serde_json::json!({
                    "Type": "bind", "Source": name, "Destination": dst, "RW": !ro,
                    "Propagation": "rprivate",
                })
            } else {
                serde_json::json!({
                    "Type": "volume", "Name": name, "Destination": dst, "RW": !ro,
                    "Driver": "local",
                })
            }).collect::<Vec<_>>(),
            "NetworkSettings": match &r.network {
                Some(n) if r.status == Status::Running => serde_json::json!({
                    "IPAddress": n.ip, "IPPrefixLen": n.prefix, "Gateway": n.gateway,
                    "MacAddress": n.mac, "Ports": docker_ports(&n.ports),
                    "Networks": {"bridge": {"IPAddress": n.ip, "IPPrefixLen": n.prefix,
                        "Gateway": n.gateway, "MacAddress": n.mac}},
                }),
                // Docker empties these once a container stops.
                _ => serde_json::json!({"IPAddress": "", "Gateway": "", "MacAddress": "",
                    "Ports": {}, "Networks": {}}),
            },
            "LogPath": rs.log_path(&r.id),
            "HostConfig": {"AutoRemove": r.auto_remove},
        }));
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

pub(crate) fn logs(follow: bool, container: &str) -> Result<()> {
    let rs = records()?;
    let r = rs.get(container)?;
    let path = rs.log_path(&r.id);
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    let mut at = husk_runtime::container::record::replay(&path, 0, &mut out, &mut err)?;
    if !follow {
        return Ok(());
    }
    loop {
        let running = rs
            .get(&r.id)
            .map(|x| x.status == Status::Running)
            .unwrap_or(false);
        std::thread::sleep(Duration::from_millis(200));
        at = husk_runtime::container::record::replay(&path, at, &mut out, &mut err)?;
        out.flush()?;
        if !running {
            break;
        }
    }
    Ok(())
}

pub(crate) fn records() -> Result<Records> {
    Ok(Records::open(
        &husk_runtime::default_data_dir().join("containers"),
    )?)
}
