//! A private `redis-server` child process for tests: its own free port on 127.0.0.1, no
//! persistence, killed when dropped. Tests never use a Redis they did not start.
//!
//! Needs `redis-server` on `PATH` (Debian package `redis-server`).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Maximum time to wait for a started server to reply to `PING`.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts to start a server on a port another process may hold for a moment.
const START_ATTEMPTS: usize = 20;

/// A running `redis-server` on 127.0.0.1.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    /// TLS port, when started with [`RedisServer::start_tls`].
    tls_port: Option<u16>,
    /// Arguments added to the command line, such as the TLS files and the password.
    extra_args: Vec<String>,
}

/// Files for a TLS listener of `redis-server`, all PEM.
pub struct TlsFiles<'a> {
    pub certificate: &'a Path,
    pub key: &'a Path,
    pub ca: &'a Path,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it replies to `PING`.
    pub fn start() -> RedisServer {
        let mut server =
            RedisServer { child: None, port: free_port(), tls_port: None, extra_args: Vec::new() };
        server.launch();
        server
    }

    /// Starts a server that requires `password` and also listens with TLS on a second free
    /// port. Clients need not present a certificate.
    pub fn start_tls(files: &TlsFiles<'_>, password: &str) -> RedisServer {
        let tls_port = free_port();
        let path = |path: &Path| path.display().to_string();
        let extra_args = vec![
            "--tls-port".to_owned(),
            tls_port.to_string(),
            "--tls-cert-file".to_owned(),
            path(files.certificate),
            "--tls-key-file".to_owned(),
            path(files.key),
            "--tls-ca-cert-file".to_owned(),
            path(files.ca),
            "--tls-auth-clients".to_owned(),
            "no".to_owned(),
            "--requirepass".to_owned(),
            password.to_owned(),
        ];
        let mut server = RedisServer { child: None, port: free_port(), tls_port: Some(tls_port), extra_args };
        server.launch();
        server
    }

    /// Returns `rediss://:PASSWORD@127.0.0.1:TLS_PORT` of a server from [`RedisServer::start_tls`].
    pub fn tls_url(&self, password: &str) -> String {
        let port = self.tls_port.expect("server was started without TLS");
        format!("rediss://:{password}@127.0.0.1:{port}")
    }

    /// Returns `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server with SIGKILL and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, empty, after [`RedisServer::kill`].
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    fn launch(&mut self) {
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            match self.try_launch() {
                Ok(child) => {
                    self.child = Some(child);
                    return;
                }
                Err(error) => last_error = error,
            }
            thread::sleep(Duration::from_millis(200));
        }
        panic!("starting redis-server on port {} failed: {last_error}", self.port);
    }

    fn try_launch(&self) -> Result<Child, String> {
        let port = self.port.to_string();
        let mut child = Command::new("redis-server")
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|error| {
                format!("running redis-server failed ({error}); install the redis-server package")
            })?;
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("redis-server exited with {status}"));
            }
            // A server that replies while this child still runs is this child.
            if answers_ping(self.port) && matches!(child.try_wait(), Ok(None)) {
                return Ok(child);
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        Err(format!("redis-server did not answer PING within {STARTUP_TIMEOUT:?}"))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0 failed");
    listener.local_addr().expect("reading the local address failed").port()
}

/// Returns whether a server on `port` replies to `PING`. A server that requires a password
/// replies with a `NOAUTH` error, which counts as a reply.
fn answers_ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    matches!(stream.read(&mut reply), Ok(count) if reply[..count].starts_with(b"+PONG") || reply[..count].starts_with(b"-NOAUTH"))
}
