//! The control API: HTTP/1.1 with JSON bodies on a Unix socket, with
//! Firecracker's resources and error shape (`{"fault_message": "..."}`).
//!
//! | request | |
//! |---|---|
//! | `GET /` | instance info: state `Not started`, `Running`, `Paused`, `Stopped` |
//! | `GET|PUT /machine-config` | vCPUs, memory, CPU template, host profile |
//! | `PUT /boot-source` | kernel, boot args, initrd |
//! | `PUT /drives/{drive_id}` | a virtio-blk drive |
//! | `PATCH /drives/{drive_id}` | `{"drive_id", "path_on_host"}`: another file behind a running VM's drive (not the root) |
//! | `PUT /network-interfaces/{iface_id}` | virtio-net on a tap |
//! | `PUT /filesystems/{fs_id}` | virtio-fs on a vhost-user backend (tag, socket) |
//! | `PUT /vsock` | hybrid vsock (guest CID, Unix socket path) |
//! | `PUT /entropy` | virtio-rng |
//! | `PUT /serial` | console output |
//! | `GET /vm/config` | the whole configuration |
//! | `PUT /actions` | `InstanceStart`, `Pause`, `Resume`, `SendCtrlAltDel` |
//! | `PATCH /vm` | `{"state": "Paused"|"Resumed"}` (Firecracker's form) |
//! | `GET /metrics` | counters as JSON |
//! | `PUT /snapshot/create` | `{"snapshot_path", "mem_file_path"}` of a paused VM |
//! | `PUT /snapshot/load` | `{"snapshot_path", "mem_file_path", "resume_vm", "vsock_uds_path", "serial", "drives", "network_interfaces", "filesystems"}`, instead of configuring and starting |
//!
//! Configuration requests are only accepted before `InstanceStart`, a
//! drive's `PATCH` only after it. Bodies
//! over 64 KiB are refused; every body is parsed with unknown fields denied.

use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};

use husk_vmm_api::{
    Action, ActionType, Fault, InstanceInfo, InstanceState, VmState, VmStateChange,
};
use serde::de::DeserializeOwned;
use tiny_http::{Method, Request, Response, Server};

use crate::builder::{self, RunningVm};
use crate::config::{
    BootSource, Drive, EntropyConfig, FsConfig, MachineConfig, NetConfig, PartialDrive,
    SerialConfig, VmConfig, VsockConfig,
};
use crate::metrics::{inc, METRICS};
use crate::snapshot::{CreateRequest, LoadRequest};

const MAX_BODY: usize = 64 * 1024;

/// What the VMM is: configuring, or running a VM.
#[derive(Default)]
pub struct Inner {
    boot_source: Option<BootSource>,
    machine: MachineConfig,
    drives: Vec<Drive>,
    network_interfaces: Vec<NetConfig>,
    vsock: Option<VsockConfig>,
    entropy: Option<EntropyConfig>,
    filesystems: Vec<FsConfig>,
    serial: SerialConfig,
    running: Option<Arc<RunningVm>>,
}

/// Shared by the API thread and the main thread (which waits for the VM).
#[derive(Default)]
pub struct Controller {
    inner: Mutex<Inner>,
    started: Condvar,
}

#[derive(Debug)]
pub struct ApiError {
    status: u16,
    message: String,
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError {
        status: 400,
        message: message.into(),
    }
}

type Reply = Result<Option<serde_json::Value>, ApiError>;

impl Controller {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The configuration assembled so far.
    pub fn config(&self) -> Result<VmConfig, String> {
        let i = self.lock();
        let boot_source = i
            .boot_source
            .clone()
            .ok_or("no boot source configured (PUT /boot-source)")?;
        Ok(VmConfig {
            boot_source,
            machine_config: i.machine.clone(),
            drives: i.drives.clone(),
            network_interfaces: i.network_interfaces.clone(),
            vsock: i.vsock.clone(),
            entropy: i.entropy.clone(),
            filesystems: i.filesystems.clone(),
            serial: i.serial.clone(),
        })
    }

    /// Takes a whole configuration (from `--config-file`).
    pub fn set_config(&self, c: VmConfig) {
        let mut i = self.lock();
        i.boot_source = Some(c.boot_source);
        i.machine = c.machine_config;
        i.drives = c.drives;
        i.network_interfaces = c.network_interfaces;
        i.vsock = c.vsock;
        i.entropy = c.entropy;
        i.filesystems = c.filesystems;
        i.serial = c.serial;
    }

    /// Builds and starts the VM from the configuration.
    pub fn start(&self) -> Result<(), String> {
        if self.lock().running.is_some() {
            return Err("the instance is already started".into());
        }
        let config = self.config()?;
        let vmm = builder::build(&config).map_err(|e| format!("{e:#}"))?;
        let running = vmm.start().map_err(|e| format!("{e:#}"))?;
        self.lock().running = Some(Arc::new(running));
        self.started.notify_all();
        Ok(())
    }

    /// Restores a VM from a snapshot instead of configuring and booting one.
    pub fn load(&self, req: &LoadRequest) -> Result<(), String> {
        if self.lock().running.is_some() {
            return Err("the instance is already started".into());
        }
        let vmm = builder::restore(req).map_err(|e| format!("{e:#}"))?;
        let running = vmm
            .start_paused(!req.resume_vm)
            .map_err(|e| format!("{e:#}"))?;
        self.lock().running = Some(Arc::new(running));
        self.started.notify_all();
        Ok(())
    }

    /// Blocks until a VM has been started; returns it.
    pub fn wait_started(&self) -> Arc<RunningVm> {
        let mut i = self.lock();
        loop {
            if let Some(r) = &i.running {
                return r.clone();
            }
            i = self.started.wait(i).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn running(&self) -> Result<Arc<RunningVm>, ApiError> {
        self.lock()
            .running
            .clone()
            .ok_or_else(|| bad("the instance is not started"))
    }

    fn configuring(&self) -> Result<std::sync::MutexGuard<'_, Inner>, ApiError> {
        let i = self.lock();
        if i.running.is_some() {
            return Err(bad("the configuration cannot change after InstanceStart"));
        }
        Ok(i)
    }

    fn state(&self) -> InstanceState {
        match &self.lock().running {
            None => InstanceState::NotStarted,
            Some(r) if r.stopped().is_some() => InstanceState::Stopped,
            Some(r) if r.paused() => InstanceState::Paused,
            Some(_) => InstanceState::Running,
        }
    }

    fn action(&self, a: ActionType) -> Reply {
        match a {
            ActionType::InstanceStart => self.start().map(|_| None).map_err(bad),
            ActionType::Pause => {
                let r = self.running()?;
                r.pause().map(|_| None).map_err(|e| bad(format!("{e:#}")))
            }
            ActionType::Resume => {
                self.running()?.resume();
                Ok(None)
            }
            ActionType::SendCtrlAltDel => Err(bad(
                "SendCtrlAltDel needs a keyboard controller driver in the guest; husk's guest \
                 kernel has none (reboot=k only resets): stop the guest through its agent",
            )),
        }
    }

    /// Routes one request. `body` is already size-checked.
    pub fn handle(&self, method: &Method, url: &str, body: &[u8]) -> Reply {
        let path = url.split('?').next().unwrap_or("");
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (method, parts.as_slice()) {
            (Method::Get, [""]) => json(&InstanceInfo {
                id: "husk-vmm".into(),
                state: self.state(),
                vmm_version: env!("CARGO_PKG_VERSION").into(),
                app_name: "husk-vmm".into(),
            }),
            (Method::Get, ["machine-config"]) => json(&self.lock().machine),
            (Method::Put, ["machine-config"]) => {
                let m: MachineConfig = parse(body)?;
                self.configuring()?.machine = m;
                Ok(None)
            }
            (Method::Put, ["boot-source"]) => {
                let b: BootSource = parse(body)?;
                self.configuring()?.boot_source = Some(b);
                Ok(None)
            }
            (Method::Put, ["drives", id]) => {
                let d: Drive = parse(body)?;
                check_id("drive_id", id, &d.drive_id)?;
                upsert(&mut self.configuring()?.drives, d, |d| &d.drive_id)
            }
            (Method::Patch, ["drives", id]) => {
                let d: PartialDrive = parse(body)?;
                check_id("drive_id", id, &d.drive_id)?;
                self.running()?
                    .patch_drive(&d.drive_id, &d.path_on_host)
                    .map(|_| None)
                    .map_err(|e| bad(format!("{e:#}")))
            }
            (Method::Put, ["network-interfaces", id]) => {
                let n: NetConfig = parse(body)?;
                check_id("iface_id", id, &n.iface_id)?;
                upsert(&mut self.configuring()?.network_interfaces, n, |n| {
                    &n.iface_id
                })
            }
            (Method::Put, ["filesystems", id]) => {
                let f: FsConfig = parse(body)?;
                check_id("fs_id", id, &f.fs_id)?;
                upsert(&mut self.configuring()?.filesystems, f, |f| &f.fs_id)
            }
            (Method::Put, ["vsock"]) => {
                let v: VsockConfig = parse(body)?;
                self.configuring()?.vsock = Some(v);
                Ok(None)
            }
            (Method::Put, ["entropy"]) => {
                let e: EntropyConfig = parse(body)?;
                self.configuring()?.entropy = Some(e);
                Ok(None)
            }
            (Method::Put, ["serial"]) => {
                let s: SerialConfig = parse(body)?;
                self.configuring()?.serial = s;
                Ok(None)
            }
            (Method::Get, ["vm", "config"]) => json(&self.config().map_err(bad)?),
            (Method::Put, ["actions"]) => {
                let a: Action = parse(body)?;
                self.action(a.action_type)
            }
            (Method::Patch, ["vm"]) => {
                let s: VmStateChange = parse(body)?;
                self.action(match s.state {
                    VmState::Paused => ActionType::Pause,
                    VmState::Resumed => ActionType::Resume,
                })
            }
            (Method::Put, ["snapshot", "create"]) => {
                let req: CreateRequest = parse(body)?;
                self.running()?
                    .snapshot(&req)
                    .map(|_| None)
                    .map_err(|e| bad(format!("{e:#}")))
            }
            (Method::Put, ["snapshot", "load"]) => {
                let req: LoadRequest = parse(body)?;
                self.load(&req).map(|_| None).map_err(bad)
            }
            (Method::Get, ["metrics"]) => {
                let mut m = METRICS.json();
                if let Some(r) = &self.lock().running {
                    m["uptime_ms"] = serde_json::json!(r.uptime().as_millis() as u64);
                }
                Ok(Some(m))
            }
            _ => Err(ApiError {
                status: 404,
                message: format!("no resource {method} {path}"),
            }),
        }
    }
}

/// `PUT /<collection>/{id}`: the body's id must be the path's.
fn check_id(field: &str, path_id: &str, body_id: &str) -> Result<(), ApiError> {
    if body_id != path_id {
        return Err(bad(format!(
            "{field} {body_id:?} in the body does not match {path_id:?} in the path"
        )));
    }
    Ok(())
}

/// Replaces the entry with `item`'s id, or adds it.
fn upsert<T>(list: &mut Vec<T>, item: T, id: impl Fn(&T) -> &String) -> Reply {
    list.retain(|x| id(x) != id(&item));
    list.push(item);
    Ok(None)
}

fn json<T: serde::Serialize>(v: &T) -> Reply {
    serde_json::to_value(v)
        .map(Some)
        .map_err(|e| bad(e.to_string()))
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| bad(format!("bad request body: {e}")))
}

fn respond(req: Request, reply: Reply) {
    let r = match reply {
        Ok(None) => Response::from_data(Vec::new()).with_status_code(204),
        Ok(Some(v)) => Response::from_data(serde_json::to_vec(&v).unwrap_or_default())
            .with_status_code(200)
            .with_header(json_header()),
        Err(e) => {
            inc(&METRICS.api.errors);
            Response::from_data(
                serde_json::to_vec(&Fault {
                    fault_message: e.message,
                })
                .unwrap_or_default(),
            )
            .with_status_code(e.status)
            .with_header(json_header())
        }
    };
    if let Err(e) = req.respond(r) {
        tracing::debug!("api: responding: {e}");
    }
}

fn json_header() -> tiny_http::Header {
    tiny_http::Header::from_bytes("Content-Type", "application/json")
        .expect("static header is valid")
}

/// Serves the API on `path` until the process exits.
pub fn serve(path: &Path, ctl: Arc<Controller>) -> std::io::Result<std::thread::JoinHandle<()>> {
    let _ = std::fs::remove_file(path);
    let server = Server::http_unix(path).map_err(std::io::Error::other)?;
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for mut req in server.incoming_requests() {
                inc(&METRICS.api.requests);
                let mut body = Vec::new();
                let read = req
                    .as_reader()
                    .take(MAX_BODY as u64 + 1)
                    .read_to_end(&mut body);
                let reply = match read {
                    Err(e) => Err(bad(format!("reading request body: {e}"))),
                    Ok(_) if body.len() > MAX_BODY => Err(ApiError {
                        status: 413,
                        message: format!("request body over {MAX_BODY} bytes"),
                    }),
                    Ok(_) => ctl.handle(req.method(), req.url(), &body),
                };
                respond(req, reply);
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_requests_build_a_config() {
        let c = Controller::default();
        assert!(c.config().is_err());
        c.handle(
            &Method::Put,
            "/boot-source",
            br#"{"kernel_image_path": "/k", "boot_args": "console=ttyS0"}"#,
        )
        .unwrap();
        c.handle(
            &Method::Put,
            "/machine-config",
            br#"{"vcpu_count": 2, "mem_size_mib": 256}"#,
        )
        .unwrap();
        c.handle(
            &Method::Put,
            "/drives/rootfs",
            br#"{"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true, "is_read_only": true}"#,
        )
        .unwrap();
        let cfg = c.config().unwrap();
        assert_eq!(cfg.machine_config.vcpu_count, 2);
        assert_eq!(cfg.drives.len(), 1);
        let info = c.handle(&Method::Get, "/", b"").unwrap().unwrap();
        assert_eq!(info["state"], "Not started");
    }

    #[test]
    fn bad_requests_name_the_problem() {
        let c = Controller::default();
        let cases: [(&Method, &str, &[u8], &str); 8] = [
            (&Method::Put, "/boot-source", b"{", "bad request body"),
            (
                &Method::Put,
                "/machine-config",
                br#"{"vcpu_count": 1, "mem_size_mib": 1, "x": 1}"#,
                "unknown field",
            ),
            (
                &Method::Put,
                "/drives/a",
                br#"{"drive_id": "b", "path_on_host": "/r"}"#,
                "does not match",
            ),
            (
                &Method::Put,
                "/actions",
                br#"{"action_type": "Explode"}"#,
                "unknown variant `Explode`, expected one of `InstanceStart`",
            ),
            (
                &Method::Put,
                "/actions",
                br#"{"action_type": "Pause"}"#,
                "not started",
            ),
            (
                &Method::Patch,
                "/drives/ro1",
                br#"{"drive_id": "ro1", "path_on_host": "/r"}"#,
                "not started",
            ),
            (
                &Method::Patch,
                "/drives/ro1",
                br#"{"drive_id": "ro2", "path_on_host": "/r"}"#,
                "does not match",
            ),
            (&Method::Get, "/nothing", b"", "no resource"),
        ];
        for (m, url, body, want) in cases {
            let e = c.handle(m, url, body).unwrap_err();
            assert!(e.message.contains(want), "{url}: {}", e.message);
        }
        // InstanceStart without a boot source: a clear error, nothing started.
        let e = c
            .handle(
                &Method::Put,
                "/actions",
                br#"{"action_type": "InstanceStart"}"#,
            )
            .unwrap_err();
        assert!(e.message.contains("boot source"), "{}", e.message);
    }
}
