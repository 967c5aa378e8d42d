//! A running container's control handle: signals, execs and a stop from
//! threads other than the one waiting for it, on an agent connection of
//! its own (a ttrpc call in flight does not hold up another connection's).

use std::sync::Arc;
use std::time::Duration;

use husk_protocol::agent::WaitProcessResponse;

use crate::container::Result;
use crate::guest::{AgentConn, Io, Streams};

/// Cheap to clone; every clone shares one connection.
#[derive(Clone)]
pub struct Control {
    agent: Arc<AgentConn>,
    id: String,
}

impl Control {
    pub(crate) fn new(agent: AgentConn, id: &str) -> Control {
        Control {
            agent: Arc::new(agent),
            id: id.to_string(),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// `sig` to every process of the container (`docker kill`).
    pub fn signal(&self, sig: i32) -> Result<()> {
        Ok(self.agent.signal(&self.id, "", sig as u32, true)?)
    }

    /// Runs `process` (OCI process JSON) in the container as `exec_id`.
    pub fn exec(&self, exec_id: &str, process: &serde_json::Value, io: Io) -> Result<Streams> {
        Ok(self.agent.exec(&self.id, exec_id, process, io)?)
    }

    /// Until exec `exec_id` exits.
    pub fn wait_exec(&self, exec_id: &str) -> Result<WaitProcessResponse> {
        Ok(self.agent.wait(&self.id, exec_id)?)
    }

    /// Runs `process` to its end within `timeout`: its exit status, or
    /// `None` if it was still running then (it is killed).
    pub fn exec_within(
        &self,
        exec_id: &str,
        process: &serde_json::Value,
        timeout: Duration,
    ) -> Result<Option<i32>> {
        self.exec(exec_id, process, Io::NONE)?;
        let (tx, rx) = std::sync::mpsc::channel();
        let (me, x) = (self.clone(), exec_id.to_string());
        std::thread::spawn(move || {
            let _ = tx.send(me.wait_exec(&x));
        });
        match rx.recv_timeout(timeout) {
            Ok(r) => Ok(Some(r?.status)),
            Err(_) => {
                let _ = self
                    .agent
                    .signal(&self.id, exec_id, libc::SIGKILL as u32, false);
                Ok(None)
            }
        }
    }

    /// `docker stop`: SIGTERM, and SIGKILL if it still runs after `grace`
    /// (`running` says whether it does: the caller's waiter knows). Errors
    /// are the caller's to log: a container that already exited refuses a
    /// signal.
    pub fn stop(
        &self,
        grace: Duration,
        running: impl Fn() -> bool,
    ) -> Vec<crate::container::ContainerError> {
        let mut errors = Vec::new();
        if let Err(e) = self.signal(libc::SIGTERM) {
            errors.push(e);
        }
        let deadline = std::time::Instant::now() + grace;
        while running() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if running() {
            if let Err(e) = self.signal(libc::SIGKILL) {
                errors.push(e);
            }
        }
        errors
    }
}
