//! husk-vmm's control API as a typed client: each call sends one of
//! husk-vmm-api's bodies over HTTP/1.1 (hyper) on the VMM's Unix socket and
//! reads the status and body properly; a refusal carries the VMM's
//! `fault_message`.
//!
//! Calls are blocking: the runtime's sandbox code is synchronous and runs on
//! callers' threads, some of them inside a tokio runtime. Each call runs on
//! a scoped thread of its own with a current-thread runtime (as the netlink
//! calls do), so it blocks no executor and needs none. A sandbox makes two
//! or three calls in its life.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use husk_vmm_api::{
    CreateRequest, Fault, InstanceInfo, LoadRequest, PartialDrive, VmState, VmStateChange,
};
use hyper::{Method, Request, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

/// Largest answer read: the VMM's bodies are a few KiB (metrics, config).
/// Bounded, because a compromised VMM is as hostile as its guest.
const MAX_ANSWER: usize = 1 << 20;

/// The socket file appears at bind(), a moment before listen(): a refused
/// connection is retried for this long.
const CONNECT_RETRY: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum VmmApiError {
    #[error("husk-vmm API socket {path}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{method} {path}")]
    Http {
        method: Method,
        path: String,
        source: hyper::Error,
    },
    #[error("{method} {path}: no answer within {timeout:?}")]
    Timeout {
        method: Method,
        path: String,
        timeout: Duration,
    },
    #[error("{method} {path}: husk-vmm refused it ({status}): {message}")]
    Refused {
        method: Method,
        path: String,
        status: StatusCode,
        message: String,
    },
    #[error("{method} {path}: unreadable answer: {reason}")]
    Answer {
        method: Method,
        path: String,
        reason: String,
    },
    #[error("starting the API client's I/O")]
    Io(#[source] std::io::Error),
}

/// A client of one husk-vmm's API socket.
#[derive(Clone, Debug)]
pub struct VmmClient {
    socket: PathBuf,
    timeout: Duration,
}

impl VmmClient {
    /// Requests time out after `timeout` (a snapshot load of a large guest
    /// copies its memory: give it minutes, not seconds).
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> VmmClient {
        VmmClient {
            socket: socket.into(),
            timeout,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `PUT /snapshot/load`: restore a VM instead of booting one.
    pub fn load_snapshot(&self, req: &LoadRequest) -> Result<(), VmmApiError> {
        self.send(Method::PUT, "/snapshot/load", Some(req))
    }

    /// `PUT /snapshot/create` of a paused VM.
    pub fn create_snapshot(&self, req: &CreateRequest) -> Result<(), VmmApiError> {
        self.send(Method::PUT, "/snapshot/create", Some(req))
    }

    /// `PATCH /drives/{id}` of a running VM: `path` backs the drive now.
    pub fn patch_drive(&self, drive_id: &str, path: &Path) -> Result<(), VmmApiError> {
        let body = PartialDrive {
            drive_id: drive_id.into(),
            path_on_host: path.into(),
        };
        self.send(Method::PATCH, &format!("/drives/{drive_id}"), Some(&body))
    }

    /// `PATCH /vm` to pause or resume the vCPUs.
    pub fn set_state(&self, state: VmState) -> Result<(), VmmApiError> {
        self.send(Method::PATCH, "/vm", Some(&VmStateChange { state }))
    }

    /// `GET /`.
    pub fn instance_info(&self) -> Result<InstanceInfo, VmmApiError> {
        self.get("/")
    }

    /// A request whose answer is empty (204) or ignored.
    pub fn send<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<(), VmmApiError> {
        self.call(method, path, body).map(drop)
    }

    /// `GET path`, its JSON answer decoded.
    pub fn get<R: DeserializeOwned>(&self, path: &str) -> Result<R, VmmApiError> {
        let body = self.call::<()>(Method::GET, path, None)?;
        serde_json::from_slice(&body).map_err(|e| VmmApiError::Answer {
            method: Method::GET,
            path: path.into(),
            reason: e.to_string(),
        })
    }

    /// One request; the answer's body when its status is a success.
    fn call<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<Bytes, VmmApiError> {
        let body = match body {
            // Serializing our own types cannot fail (no maps with non-string
            // keys, no failing Serialize impls); say so if it ever does.
            Some(b) => serde_json::to_vec(b).map_err(|e| VmmApiError::Answer {
                method: method.clone(),
                path: path.into(),
                reason: format!("encoding the request: {e}"),
            })?,
            None => Vec::new(),
        };
        let (status, answer) = std::thread::scope(|s| {
            s.spawn(|| self.exchange(method.clone(), path, body))
                .join()
                .unwrap_or_else(|_| {
                    Err(VmmApiError::Io(std::io::Error::other(
                        "the API client's thread panicked",
                    )))
                })
        })?;
        if status.is_success() {
            return Ok(answer);
        }
        // Firecracker's error shape; an answer without it is shown as is.
        let message = serde_json::from_slice::<Fault>(&answer)
            .map(|f| f.fault_message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&answer).into_owned());
        Err(VmmApiError::Refused {
            method,
            path: path.into(),
            status,
            message,
        })
    }

    /// Runs one exchange on this thread's own runtime.
    fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes), VmmApiError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(VmmApiError::Io)?;
        let timeout = self.timeout;
        rt.block_on(async {
            match tokio::time::timeout(timeout, self.exchange_async(method.clone(), path, body))
                .await
            {
                Ok(r) => r,
                Err(_) => Err(VmmApiError::Timeout {
                    method,
                    path: path.into(),
                    timeout,
                }),
            }
        })
    }

    async fn exchange_async(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes), VmmApiError> {
        let http = |source| VmmApiError::Http {
            method: method.clone(),
            path: path.into(),
            source,
        };
        let stream = self.connect().await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(http)?;
        // The connection's I/O runs beside the request on this runtime.
        let conn = tokio::spawn(conn);
        let req = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| VmmApiError::Answer {
                method: method.clone(),
                path: path.into(),
                reason: format!("building the request: {e}"),
            })?;
        let resp = sender.send_request(req).await.map_err(http)?;
        let status = resp.status();
        let answer = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| VmmApiError::Answer {
                method: method.clone(),
                path: path.into(),
                reason: e.to_string(),
            })?
            .to_bytes();
        conn.abort();
        Ok((status, answer))
    }

    async fn connect(&self) -> Result<tokio::net::UnixStream, VmmApiError> {
        let deadline = tokio::time::Instant::now() + CONNECT_RETRY;
        loop {
            match tokio::net::UnixStream::connect(&self.socket).await {
                Ok(s) => return Ok(s),
                Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(source) => {
                    return Err(VmmApiError::Connect {
                        path: self.socket.clone(),
                        source,
                    })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A one-shot server on a Unix socket: reads one request (headers and a
    /// Content-Length body), answers `reply`, returns what it read.
    fn serve_once(reply: Vec<u8>) -> (tempfile::TempDir, std::thread::JoinHandle<String>) {
        let dir = tempfile::tempdir().unwrap();
        let l = std::os::unix::net::UnixListener::bind(dir.path().join("api.sock")).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut req = Vec::new();
            let mut b = [0u8; 4096];
            loop {
                let n = s.read(&mut b).unwrap();
                req.extend_from_slice(&b[..n]);
                let text = String::from_utf8_lossy(&req).to_string();
                if let Some(h) = text.find("\r\n\r\n") {
                    let len: usize = text
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    if req.len() >= h + 4 + len {
                        break;
                    }
                }
                if n == 0 {
                    break;
                }
            }
            s.write_all(&reply).unwrap();
            String::from_utf8_lossy(&req).into_owned()
        });
        (dir, t)
    }

    fn client(dir: &tempfile::TempDir) -> VmmClient {
        VmmClient::new(dir.path().join("api.sock"), Duration::from_secs(10))
    }

    #[test]
    fn a_typed_body_goes_out_and_no_content_is_success() {
        let (dir, t) = serve_once(b"HTTP/1.1 204 No Content\r\n\r\n".to_vec());
        client(&dir).set_state(VmState::Paused).unwrap();
        let req = t.join().unwrap();
        assert!(req.starts_with("PATCH /vm HTTP/1.1\r\n"), "{req}");
        assert!(req.ends_with(r#"{"state":"Paused"}"#), "{req}");
    }

    #[test]
    fn a_refusal_carries_the_vmms_fault_message() {
        let body = r#"{"fault_message": "snapshot: no such file"}"#;
        let (dir, t) = serve_once(
            format!(
                "HTTP/1.1 400 Bad Request\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        );
        let e = client(&dir)
            .create_snapshot(&CreateRequest {
                snapshot_path: "/s".into(),
                mem_file_path: "/m".into(),
            })
            .unwrap_err();
        t.join().unwrap();
        match &e {
            VmmApiError::Refused {
                status, message, ..
            } => {
                assert_eq!(*status, StatusCode::BAD_REQUEST);
                assert_eq!(message, "snapshot: no such file");
            }
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().contains("PUT /snapshot/create"), "{e}");
    }

    #[test]
    fn garbage_and_oversized_answers_are_errors_not_statuses() {
        let (dir, t) = serve_once(b"SPLAT\r\n\r\n".to_vec());
        let e = client(&dir).instance_info().unwrap_err();
        t.join().unwrap();
        assert!(matches!(e, VmmApiError::Http { .. }), "{e:?}");

        let big = MAX_ANSWER + 1;
        let mut reply = format!("HTTP/1.1 200 OK\r\nContent-Length: {big}\r\n\r\n").into_bytes();
        reply.resize(reply.len() + big, b'x');
        let (dir, t) = serve_once(reply);
        let e = client(&dir).instance_info().unwrap_err();
        let _ = t.join();
        assert!(matches!(e, VmmApiError::Answer { .. }), "{e:?}");
    }

    #[test]
    fn no_server_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let c = VmmClient::new(dir.path().join("none.sock"), Duration::from_secs(30));
        // The connect retry (for a socket bound but not yet listening) ends.
        let e = c.instance_info().unwrap_err();
        assert!(e.to_string().contains("none.sock"), "{e}");
    }
}
