//! Container records: what `husk ps`, `logs`, `exec`, `stop` and `rm` know
//! of a container after the `husk run` that made it has moved on (`-d`).
//! `<data dir>/containers/<id>/record.json` (replaced atomically) and
//! `log` (JSON lines, Docker's json-file shape: `{"stream", "log", "time"}`).

use std::fs::File;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::container::{ContainerError, Result};
use crate::util::{shown, IoContext};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Created,
    Running,
    Exited,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub image: String,
    pub command: Vec<String>,
    /// The container process's environment and working directory, which
    /// `exec` gives its processes too (as Docker does).
    pub env: Vec<String>,
    pub cwd: String,
    pub created: u64,
    pub status: Status,
    pub exit_code: Option<i32>,
    pub oom_killed: bool,
    /// Why it ended without an exit code (the VM died, husk failed).
    pub error: Option<String>,
    /// The exit code husk ended with when the container did not run:
    /// Docker's 125 (husk's own failure), 126, 127.
    #[serde(default)]
    pub failure_code: Option<u8>,
    /// The husk process that owns the sandbox while it runs.
    pub owner_pid: u32,
    pub auto_remove: bool,
    /// Named volumes: (name, path in the container, read-only).
    #[serde(default)]
    pub volumes: Vec<(String, String, bool)>,
    /// Its address on the bridge and published ports, while it runs.
    #[serde(default)]
    pub network: Option<NetInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetInfo {
    pub ip: String,
    pub prefix: u8,
    pub gateway: String,
    pub mac: String,
    pub ports: Vec<crate::net::ports::PortMapping>,
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whether process `pid` exists.
pub fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    pid != 0 && unsafe { libc::kill(pid as libc::pid_t, 0) } == 0
}

pub struct Records {
    root: PathBuf,
}

impl Records {
    pub fn open(root: &Path) -> Result<Records> {
        std::fs::create_dir_all(root).at(|| shown(root))?;
        Ok(Records {
            root: root.to_path_buf(),
        })
    }

    pub fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    pub fn log_path(&self, id: &str) -> PathBuf {
        self.dir(id).join("log")
    }

    /// Claims `id` for a new container; fails if it is taken.
    pub fn create(&self, r: &Record) -> Result<()> {
        let dir = self.dir(&r.id);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(ContainerError::NameInUse(r.id.clone()))
            }
            Err(e) => return Err(e).at(|| shown(&dir))?,
        }
        self.save(r)
    }

    pub fn save(&self, r: &Record) -> Result<()> {
        let dir = self.dir(&r.id);
        let tmp = dir.join("record.json.tmp");
        let json = serde_json::to_vec_pretty(r).map_err(|source| ContainerError::Json {
            what: format!("the record of {}", r.id),
            source,
        })?;
        std::fs::write(&tmp, json).at(|| shown(&tmp))?;
        Ok(std::fs::rename(&tmp, dir.join("record.json")).at(|| shown(&dir))?)
    }

    /// The record of `name` as written, whether its owner lives or not.
    pub fn read(&self, name: &str) -> Result<Record> {
        let p = self.dir(name).join("record.json");
        let b = std::fs::read(&p).at(|| shown(&p))?;
        serde_json::from_slice(&b).map_err(|source| ContainerError::Json {
            what: shown(&p),
            source,
        })
    }

    /// Containers created or running whose owner died without saying how
    /// they ended: theirs to adopt.
    pub fn orphans(&self) -> Result<Vec<Record>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.root)
            .at(|| shown(&self.root))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Ok(r) = self.read(&name) {
                if r.status != Status::Exited && !alive(r.owner_pid) {
                    out.push(r);
                }
            }
        }
        Ok(out)
    }

    /// The right to change who owns container `id`, held until the file is
    /// closed (one adopter at a time).
    pub fn claim(&self, id: &str) -> Result<File> {
        let path = self.dir(id).join("owner.lock");
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .at(|| shown(&path))?;
        let held =
            crate::util::flock_exclusive(f, true).at(|| format!("locking {}", path.display()))?;
        // A wait for the lock cannot come back without it.
        held.ok_or_else(|| std::io::Error::from(std::io::ErrorKind::WouldBlock))
            .at(|| shown(&path))
            .map_err(Into::into)
    }

    /// The record of `id` (a full id or name, or a unique prefix of 3+).
    pub fn get(&self, id: &str) -> Result<Record> {
        let read = |name: &str| -> Result<Record> {
            let mut r = self.read(name)?;
            // Its owner died without saying how it ended.
            if r.status != Status::Exited && !alive(r.owner_pid) {
                r.status = Status::Exited;
                r.error
                    .get_or_insert_with(|| "husk exited while it ran".into());
            }
            Ok(r)
        };
        if !id.contains('/') && !id.is_empty() && self.dir(id).join("record.json").exists() {
            return read(id);
        }
        if id.len() >= 3 {
            let all: Vec<Record> = self
                .list()?
                .into_iter()
                .filter(|r| r.id.starts_with(id))
                .collect();
            match all.len() {
                1 => return Ok(all[0].clone()),
                0 => {}
                _ => return Err(ContainerError::Ambiguous(id.into())),
            }
        }
        Err(ContainerError::NoSuchContainer(id.into()))
    }

    pub fn list(&self) -> Result<Vec<Record>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.root)
            .at(|| shown(&self.root))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if e.path().join("record.json").exists() {
                if let Ok(r) = self.get(&name) {
                    out.push(r);
                }
            }
        }
        out.sort_by(|a, b| b.created.cmp(&a.created).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    pub fn remove(&self, id: &str) -> Result<()> {
        Ok(std::fs::remove_dir_all(self.dir(id)).at(|| format!("removing container {id}"))?)
    }
}

/// Appends a container's output to its log, one JSON line per chunk.
#[derive(Clone)]
pub struct LogWriter {
    file: Arc<Mutex<File>>,
}

#[derive(Serialize, Deserialize)]
struct LogLine {
    stream: String,
    log: String,
    time: u64,
}

impl LogWriter {
    pub fn create(path: &Path) -> Result<LogWriter> {
        let f = File::options()
            .create(true)
            .append(true)
            .open(path)
            .at(|| shown(path))?;
        Ok(LogWriter {
            file: Arc::new(Mutex::new(f)),
        })
    }

    pub fn write(&self, stream: &str, data: &[u8]) -> std::io::Result<()> {
        let line = LogLine {
            stream: stream.into(),
            log: String::from_utf8_lossy(data).into_owned(),
            time: now(),
        };
        let mut text = serde_json::to_vec(&line)?;
        text.push(b'\n');
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        f.write_all(&text)
    }
}

/// Replays a log from byte `offset`: each chunk to `out` or `err`. Returns
/// the offset after the last whole line.
pub fn replay(path: &Path, offset: u64, out: &mut dyn Write, err: &mut dyn Write) -> Result<u64> {
    use std::io::Seek;
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(offset),
        Err(e) => return Err(e).at(|| shown(path))?,
    };
    f.seek(std::io::SeekFrom::Start(offset))
        .at(|| shown(path))?;
    let mut r = std::io::BufReader::new(f);
    let mut pos = offset;
    let mut line = String::new();
    loop {
        line.clear();
        let n = r.read_line(&mut line).at(|| shown(path))?;
        if n == 0 || !line.ends_with('\n') {
            return Ok(pos);
        }
        pos += n as u64;
        if let Ok(l) = serde_json::from_str::<LogLine>(&line) {
            let w: &mut dyn Write = if l.stream == "stderr" { err } else { out };
            w.write_all(l.log.as_bytes())
                .at(|| "writing a log's lines")?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> Record {
        Record {
            id: id.into(),
            image: "img".into(),
            command: vec!["sh".into()],
            env: vec![],
            cwd: "/".into(),
            created: now(),
            status: Status::Running,
            exit_code: None,
            oom_killed: false,
            error: None,
            failure_code: None,
            owner_pid: std::process::id(),
            auto_remove: false,
            volumes: vec![],
            network: None,
        }
    }

    #[test]
    fn records_and_logs() {
        let d = tempfile::tempdir().unwrap();
        let rs = Records::open(d.path()).unwrap();
        rs.create(&record("web-1")).unwrap();
        assert!(rs.create(&record("web-1")).is_err(), "a name is taken once");
        assert_eq!(rs.get("web").unwrap().id, "web-1");
        assert!(rs.get("nope").is_err());
        // An owner that is gone: the record reads as exited.
        let mut r = record("gone");
        r.owner_pid = u32::MAX >> 2;
        rs.create(&r).unwrap();
        assert_eq!(rs.get("gone").unwrap().status, Status::Exited);
        assert_eq!(rs.list().unwrap().len(), 2);

        let log = LogWriter::create(&rs.log_path("web-1")).unwrap();
        log.write("stdout", b"out 1\n").unwrap();
        log.write("stderr", b"err\n").unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let end = replay(&rs.log_path("web-1"), 0, &mut out, &mut err).unwrap();
        assert_eq!(
            (out.as_slice(), err.as_slice()),
            (&b"out 1\n"[..], &b"err\n"[..])
        );
        log.write("stdout", b"out 2\n").unwrap();
        out.clear();
        replay(&rs.log_path("web-1"), end, &mut out, &mut err).unwrap();
        assert_eq!(out, b"out 2\n");
        rs.remove("web-1").unwrap();
        assert!(rs.get("web-1").is_err());
    }
}
