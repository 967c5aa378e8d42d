//! Serves the three services with ttrpc's async server on one tokio thread.
//!
//! Why async: ttrpc's sync server starts five threads for every connection
//! (accept handler, reader, writer, two workers) before it answers the first
//! request. In a guest whose kernel is emulated, as on this project's CI
//! machine, that was 0.3-0.6 s per connection, and a restored sandbox's first
//! connection is all that stands between it and "ready". Here a connection
//! costs a few tasks, no threads.
//!
//! The services stay synchronous: requests that wait (WaitProcess,
//! GetOOMEvent) or do real work (CreateContainer) run on tokio's blocking
//! pool, whose idle threads are kept, so a restored guest finds them ready.
//! Requests that are a syscall or two run inline.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use husk_protocol::agent::*;
use husk_protocol::agent_ttrpc::{
    create_containers, create_network, create_sandbox, Containers, Network, Sandbox,
};
use ttrpc::r#async::TtrpcContext;

use crate::containers::ContainersService;
use crate::network::NetworkService;
use crate::rpc::internal;
use crate::sandbox::SandboxService;

/// A service shared with the blocking pool's threads.
pub struct Served<T>(pub Arc<T>);

/// Runs `f` on the blocking pool as a handler (`handler`).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ttrpc::Result<T> + Send + 'static,
) -> ttrpc::Result<T> {
    tokio::task::spawn_blocking(|| handler(f))
        .await
        .unwrap_or_else(|e| Err(internal(format!("request handler failed: {e}"))))
}

/// Runs one request's handler: a panic in it is answered INTERNAL and the
/// agent serves on (panics.rs; the guest build unwinds).
fn handler<T>(f: impl FnOnce() -> ttrpc::Result<T>) -> ttrpc::Result<T> {
    crate::panics::in_handler(f)
        .unwrap_or_else(|msg| Err(internal(format!("request handler panicked: {msg}"))))
}

/// Test builds only (feature `panic-test`): a request whose metadata has
/// `husk-test-panic` panics in its handler, and one with
/// `husk-test-panic-outside` panics on a thread of its own, so a test can
/// show what each does to the agent that ships in the guest.
#[cfg(feature = "panic-test")]
fn test_panics(meta: &crate::rpc::Metadata) {
    if meta.contains_key("husk-test-panic-outside") {
        let _ = std::thread::Builder::new()
            .name("panic-test".into())
            .spawn(|| {
                // After the request's answer is out (the test checks it
                // came): a panic that ends the agent at once could
                // otherwise beat the server thread to the socket.
                std::thread::sleep(Duration::from_millis(500));
                panic!("husk-test-panic-outside asked for a panic outside a handler")
            });
    }
    if meta.contains_key("husk-test-panic") {
        panic!("husk-test-panic asked for a panic in this handler");
    }
}

#[cfg(not(feature = "panic-test"))]
fn test_panics(_: &crate::rpc::Metadata) {}

/// Implements a generated async service trait on `Served<$svc>` by calling
/// the synchronous method of the same name: `pool` methods on the blocking
/// pool, `inline` ones on the server thread.
macro_rules! serve {
    ($trait:ident for $svc:ty {
        pool { $($m:ident($req:ty) -> $resp:ty;)* }
        inline { $($i:ident($ireq:ty) -> $iresp:ty;)* }
    }) => {
        #[async_trait]
        impl $trait for Served<$svc> {
            $(
                async fn $m(&self, ctx: &TtrpcContext, req: $req) -> ttrpc::Result<$resp> {
                    let svc = self.0.clone();
                    let meta = ctx.metadata.clone();
                    let timeout = ctx.timeout_nano;
                    blocking(move || {
                        test_panics(&meta);
                        crate::rpc::with_deadline(timeout, || svc.$m(&meta, req))
                    })
                    .await
                }
            )*
            $(
                async fn $i(&self, ctx: &TtrpcContext, req: $ireq) -> ttrpc::Result<$iresp> {
                    handler(|| {
                        test_panics(&ctx.metadata);
                        self.0.$i(&ctx.metadata, req)
                    })
                }
            )*
        }
    };
}

serve!(Containers for ContainersService {
    pool {
        create_container(CreateContainerRequest) -> CreateContainerResponse;
        start_container(ContainerRequest) -> Empty;
        launch_container(LaunchContainerRequest) -> Empty;
        remove_container(ContainerRequest) -> Empty;
        exec_process(ExecProcessRequest) -> ExecProcessResponse;
        signal_process(SignalProcessRequest) -> Empty;
        wait_process(ProcessRequest) -> WaitProcessResponse;
        stats_container(ContainerRequest) -> StatsContainerResponse;
        update_container(UpdateContainerRequest) -> Empty;
        pause_container(ContainerRequest) -> Empty;
        resume_container(ContainerRequest) -> Empty;
        tty_win_resize(TtyWinResizeRequest) -> Empty;
        close_stdin(ProcessRequest) -> Empty;
        get_oom_event(Empty) -> OOMEvent;
        list_containers(Empty) -> ListContainersResponse;
        bare_exec(BareExecRequest) -> BareExecResponse;
    }
    inline {}
});

serve!(Network for NetworkService {
    pool {
        update_interface(UpdateInterfaceRequest) -> Interface;
        update_routes(UpdateRoutesRequest) -> UpdateRoutesRequest;
        list_interfaces(Empty) -> ListInterfacesResponse;
    }
    inline {}
});

serve!(Sandbox for SandboxService {
    pool {
        create_sandbox(CreateSandboxRequest) -> Empty;
        destroy_sandbox(Empty) -> Empty;
        start_sandbox(StartSandboxRequest) -> Empty;
    }
    inline {
        health(Empty) -> HealthResponse;
        set_time(SetTimeRequest) -> Empty;
        reseed_random(ReseedRandomRequest) -> Empty;
        profile(ProfileRequest) -> ProfileResponse;
    }
});

/// Most requests that may wait at once (WaitProcess and GetOOMEvent hold a
/// pool thread each until their event).
const MAX_BLOCKING: usize = 256;

/// Binds `listen` and serves on a new thread. Returns once the server
/// listens (or failed to), so the caller can report either.
/// The server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}")]
    Ttrpc {
        what: String,
        #[source]
        source: ttrpc::Error,
    },
    #[error("the server thread ended before serving")]
    Ended,
}

pub fn start(
    listen: &str,
    sandbox: Arc<SandboxService>,
    containers: Arc<ContainersService>,
    network: Arc<NetworkService>,
) -> Result<(), ServeError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(MAX_BLOCKING)
        // Idle pool threads stay: starting one is emulated kernel work in a
        // guest like this project's CI one, and threads that exist when a
        // template is snapshotted come back in every restored sandbox.
        .thread_keep_alive(Duration::from_secs(24 * 3600))
        .build()
        .map_err(|source| ServeError::Io {
            what: "tokio runtime".into(),
            source,
        })?;
    let (tx, rx) = std::sync::mpsc::channel();
    let listen = listen.to_string();
    let serve = move || {
        rt.block_on(async move {
            let server = ttrpc::r#async::Server::new().bind(&listen).map(|s| {
                s.register_service(create_sandbox(Arc::new(Served(sandbox))))
                    .register_service(create_containers(Arc::new(Served(containers))))
                    .register_service(create_network(Arc::new(Served(network))))
            });
            let mut server = match server {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(ServeError::Ttrpc {
                        what: format!("cannot listen on {listen}"),
                        source: e,
                    }));
                    return;
                }
            };
            if let Err(e) = server.start().await {
                let _ = tx.send(Err(ServeError::Ttrpc {
                    what: format!("cannot serve on {listen}"),
                    source: e,
                }));
                return;
            }
            // One pool thread up front, so the first request that needs one
            // (CreateSandbox, right after a restore) does not wait for it.
            let _ = tokio::task::spawn_blocking(|| ()).await;
            let _ = tx.send(Ok(()));
            std::future::pending::<()>().await
        })
    };
    std::thread::Builder::new()
        .name("ttrpc".into())
        .spawn(serve)
        .map_err(|source| ServeError::Io {
            what: "starting the server thread".into(),
            source,
        })?;
    rx.recv().unwrap_or(Err(ServeError::Ended))
}
