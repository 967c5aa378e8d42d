//! Races on the paths every container's output and files take, provoked on
//! purpose (tier 3, one sandbox restored from the runtime's template, a
//! second restored beside it while the first works):
//! - many short execs at once, each writing its output just before it exits
//!   (busybox `echo` is a shell builtin: the write is the last syscall
//!   before exit, so the stream's close follows its data at once);
//! - an exec that writes and exits before anybody reads its stream (the
//!   host reads only after WaitProcess said it ended);
//! - a host share read by the sandbox's first container, the instant the
//!   guest mounts it.
//!
//! Each output is checked byte for byte; a wrong one prints the stream's
//! bytes, the other stream and the guest console.

use std::path::PathBuf;
use std::time::Duration;

use husk_protocol::agent::Storage;
use husk_runtime::{Runtime, Sandbox};
use husk_tests::agent::{
    busybox_guest, busybox_sandbox as config, busybox_spec, busybox_storage, host_share_mount,
    process, read_all, Io,
};
use husk_tests::{kvm_unavailable, root_unavailable};

const T: Duration = Duration::from_secs(300);
/// Execs in flight at once.
const PARALLEL: usize = 6;
/// Rounds of them.
const ROUNDS: usize = 3;

fn setup(test: &str) -> Option<(Runtime, tempfile::TempDir, PathBuf)> {
    busybox_guest(test, kvm_unavailable().or_else(root_unavailable))
}

fn storage(sb: &Sandbox) -> Vec<Storage> {
    vec![busybox_storage(sb)]
}

fn sh(script: &str) -> serde_json::Value {
    process(&["sh", "-c", script])
}

/// What a wrong result prints: both streams and the guest's last words.
fn explain(sb: &Sandbox, what: &str, out: &str, err: &str) -> String {
    format!(
        "{what}\nstdout ({} bytes): {out:?}\nstderr: {err:?}\n{}",
        out.len(),
        sb.logs()
    )
}

#[test]
fn outputs_written_just_before_exit_all_arrive() {
    let Some((rt, _dir, busybox)) = setup("outputs_written_just_before_exit_all_arrive") else {
        return;
    };
    let sb = rt
        .start_sandbox(&config("races", &busybox))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let a = sb
        .connect()
        .unwrap_or_else(|e| panic!("{e:#}\n{}", sb.logs()));
    let spec = busybox_spec("busybox", &["sh", "-c", "while :; do sleep 1; done"], false);
    a.create("long", &spec, Io::default(), storage(&sb), true)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", sb.logs()));

    // A second guest restored while the first one's execs run: its restore
    // and first calls load the cores and the host side as users' hosts are.
    let neighbour = std::thread::scope(|s| {
        let n = s.spawn(|| rt.start_sandbox(&config("races-neighbour", &busybox)));
        for round in 0..ROUNDS {
            execs_at_once(&sb, round);
        }
        n.join().unwrap()
    });
    let neighbour = neighbour.unwrap_or_else(|e| panic!("{e:#}"));

    // Written and exited before the host reads a byte: the stream must
    // hold it until read.
    let mut s = a
        .exec(
            "long",
            "early",
            &sh("echo early-out; echo early-err >&2; exit 7"),
            Io::OUT_ERR,
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", sb.logs()));
    let w = a
        .wait("long", "early")
        .unwrap_or_else(|e| panic!("{e:#}\n{}", sb.logs()));
    std::thread::sleep(Duration::from_secs(2));
    let out = read_all(&mut s.stdout, T).unwrap_or_else(|e| panic!("{e:#}\n{}", sb.logs()));
    let err = read_all(&mut s.stderr, T).unwrap_or_else(|e| panic!("{e:#}\n{}", sb.logs()));
    assert!(
        out == "early-out\n" && err == "early-err\n" && w.status == 7,
        "{}",
        explain(&sb, &format!("exit {}", w.status), &out, &err)
    );
    a.remove("long").unwrap();
    neighbour.stop();
    let status = sb.shutdown(Duration::from_secs(120)).unwrap();
    assert!(status.success(), "{status}");
}

/// PARALLEL execs at once, each printing its own lines on both streams as
/// its last act; every byte checked.
fn execs_at_once(sb: &Sandbox, round: usize) {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..PARALLEL)
            .map(|i| {
                s.spawn(move || {
                    let a = sb
                        .connect()
                        .unwrap_or_else(|e| panic!("{e:#}\n{}", sb.logs()));
                    let id = format!("r{round}-{i}");
                    // 3 lines of stdout, one of stderr, written last.
                    let script =
                        format!("echo {id}-a; echo {id}-b; echo {id}-c; echo {id}-e >&2; exit {i}");
                    let mut st = a
                        .exec("long", &id, &sh(&script), Io::OUT_ERR)
                        .unwrap_or_else(|e| panic!("exec {id}: {e:#}\n{}", sb.logs()));
                    let out = read_all(&mut st.stdout, T)
                        .unwrap_or_else(|e| panic!("exec {id} stdout: {e:#}\n{}", sb.logs()));
                    let err = read_all(&mut st.stderr, T)
                        .unwrap_or_else(|e| panic!("exec {id} stderr: {e:#}\n{}", sb.logs()));
                    let w = a
                        .wait("long", &id)
                        .unwrap_or_else(|e| panic!("wait {id}: {e:#}\n{}", sb.logs()));
                    let want = format!("{id}-a\n{id}-b\n{id}-c\n");
                    assert!(
                        out == want && err == format!("{id}-e\n") && w.status == i as i32,
                        "{}",
                        explain(sb, &format!("exec {id}: exit {}", w.status), &out, &err)
                    );
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    });
}

#[test]
fn a_share_is_served_the_instant_the_guest_mounts_it() {
    let test = "a_share_is_served_the_instant_the_guest_mounts_it";
    let Some((rt, dir, busybox)) = setup(test) else {
        return;
    };
    let host = dir.path().join("host-share");
    std::fs::create_dir_all(&host).unwrap();
    std::fs::write(host.join("f"), "shared-ok\n").unwrap();
    let mut cfg = config("share-race", &busybox);
    cfg.shares = vec![husk_runtime::storage::shared::HostShare {
        source: host.clone(),
        read_only: false,
    }];
    let sb = rt.start_sandbox(&cfg).unwrap_or_else(|e| panic!("{e:#}"));
    let a = sb
        .connect()
        .unwrap_or_else(|e| panic!("{e:#}\n{}", sb.logs()));
    let mut st = storage(&sb);
    st.push(sb.shared_storage().expect("a share was asked for"));
    let mut spec = busybox_spec(
        "busybox",
        &["sh", "-c", "cat /host/f 2>&1; ls /host 2>&1"],
        false,
    );
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    mounts.push(host_share_mount("/host"));
    spec.set_mounts(Some(mounts));
    // The first thing the restored guest does with the share is read it.
    let mut s = a
        .create("reader", &spec, Io::OUT_ERR, st, true)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", sb.logs()));
    let out = read_all(&mut s.stdout, T).unwrap_or_else(|e| panic!("{e:#}\n{}", sb.logs()));
    let err = read_all(&mut s.stderr, T).unwrap_or_else(|e| panic!("{e:#}\n{}", sb.logs()));
    let w = a.wait("reader", "").unwrap();
    let virtiofsd_log = std::fs::read_to_string(sb.dir.join("virtiofsd.log")).unwrap_or_default();
    assert!(
        out == "shared-ok\nf\n" && w.status == 0,
        "{}\nvirtiofsd: {virtiofsd_log}",
        explain(&sb, &format!("exit {}", w.status), &out, &err)
    );
    a.remove("reader").unwrap();
    let status = sb.shutdown(Duration::from_secs(120)).unwrap();
    assert!(status.success(), "{status}");
}
