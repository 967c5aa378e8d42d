//! rtnetlink from synchronous code: each call runs on a thread of its own
//! with a runtime of its own, optionally inside another network namespace.

use std::fs::File;
use std::os::fd::AsRawFd;

use futures_util::TryStreamExt;
use rtnetlink::Handle;

use crate::net::{NetError, NlContext, Result};
use crate::util::{IoContext, IoError};

/// Runs `f` with a netlink handle on a runtime of its own, on a thread of
/// its own (callers may themselves be inside an async runtime).
pub(crate) fn netlink<F, Fut>(f: F) -> Result<()>
where
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<()>>,
{
    netlink_in(None, f)
}

/// `netlink`, in the network namespace `netns` when given: the thread
/// enters it first, so the socket (and any tap made there) belongs to it.
pub(crate) fn netlink_in<F, Fut, T>(netns: Option<&File>, f: F) -> Result<T>
where
    F: FnOnce(Handle) -> Fut + Send,
    Fut: std::future::Future<Output = Result<T>>,
    T: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            if let Some(ns) = netns {
                // SAFETY: setns with an open namespace fd; a network
                // namespace can be entered by one thread of a process.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
                    return Err(IoError {
                        what: "entering the network namespace".into(),
                        source: std::io::Error::last_os_error(),
                    }
                    .into());
                }
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .at(|| "netlink runtime")?;
            rt.block_on(async {
                let (conn, handle, _) =
                    rtnetlink::new_connection().at(|| "opening a netlink socket")?;
                let task = tokio::spawn(conn);
                let r = f(handle).await;
                task.abort();
                r
            })
        })
        .join()
        .map_err(|_| NetError::NetlinkThread)?
    })
}

pub(crate) async fn link_index(h: &Handle, name: &str) -> Result<Option<u32>> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(l)) => Ok(Some(l.header.index)),
        Ok(None) => Ok(None),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(e).nl(|| format!("looking up link {name}")),
    }
}
