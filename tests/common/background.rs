//! A TCP server that runs on its own tokio runtime thread, so that the upstream and the
//! recorder work the same from `#[test]` and `#[tokio::test]` functions.

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use tokio::sync::oneshot;

/// Maximum time that dropping a server waits for its connection tasks to stop.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

/// A listener on 127.0.0.1 with an ephemeral port, served on a dedicated runtime thread.
///
/// Dropping it stops the accept loop and cancels every connection task.
pub struct BackgroundServer {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl BackgroundServer {
    /// Binds 127.0.0.1:0 and runs `serve` with the listener on a new runtime thread.
    ///
    /// The port is bound before this returns, so clients can connect right away. `serve`
    /// should spawn one task per connection with `tokio::spawn`.
    pub fn start<F, Fut>(name: &str, serve: F) -> BackgroundServer
    where
        F: FnOnce(tokio::net::TcpListener) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0 failed");
        listener.set_nonblocking(true).expect("switching the listener to non-blocking mode failed");
        let addr = listener.local_addr().expect("reading the listener address failed");
        let (shutdown, shutdown_signal) = oneshot::channel::<()>();

        let thread = thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || run(listener, serve, shutdown_signal))
            .expect("starting the server thread failed");

        BackgroundServer { addr, shutdown: Some(shutdown), thread: Some(thread) }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

fn run<F, Fut>(listener: TcpListener, serve: F, shutdown_signal: oneshot::Receiver<()>)
where
    F: FnOnce(tokio::net::TcpListener) -> Fut,
    Fut: Future<Output = ()>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("building the server runtime failed");

    runtime.block_on(async move {
        let listener =
            tokio::net::TcpListener::from_std(listener).expect("registering the listener with tokio failed");
        tokio::select! {
            _ = serve(listener) => {}
            // An error means the handle was dropped without sending, which also means stop.
            _ = shutdown_signal => {}
        }
    });
    runtime.shutdown_timeout(SHUTDOWN_TIMEOUT);
}

impl Drop for BackgroundServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        // The join is bounded: the runtime thread returns at most SHUTDOWN_TIMEOUT after the
        // signal, because connection tasks are cancelled at their next await point.
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
