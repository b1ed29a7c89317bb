//! Child processes of the real `api-relay` binary: starting one with an explicit
//! environment, waiting for its `listening at` log line, capturing its output lines and
//! stopping it.
//!
//! The relay logs JSON lines to stdout (tracing-subscriber's json format). The startup line
//! looks like `{"level":"INFO","fields":{"message":"listening at http://127.0.0.1:41234",...},...}`.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::{POLL_INTERVAL, host_port, wait_until};

/// Maximum time `spawn` waits for the `listening at` line.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Maximum time `spawn_expect_exit` waits for the process to exit.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Maximum time to wait for the output reader threads after the process exited.
const OUTPUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// Prefix of `fields.message` in the startup log line. The base URL follows it.
const LISTENING_PREFIX: &str = "listening at ";

fn binary_path() -> &'static str {
    env!("CARGO_BIN_EXE_api-relay")
}

/// Environment and port of a relay process to start.
///
/// The child gets an empty environment plus `PATH`, `PORT=0`, `BIND_ADDRESS=127.0.0.1` and
/// the variables set here. A variable set here replaces a default of the same name.
#[derive(Clone, Debug, Default)]
pub struct RelayBuilder {
    env: Vec<(String, String)>,
    removed: Vec<String>,
    port: Option<u16>,
    /// Program and arguments that replace the relay binary, for testing this harness.
    program: Option<(String, Vec<String>)>,
}

impl RelayBuilder {
    pub fn new() -> RelayBuilder {
        RelayBuilder::default()
    }

    /// Sets `key` to `value`, replacing an earlier value of `key`.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> RelayBuilder {
        let key = key.into();
        self.removed.retain(|removed| *removed != key);
        self.env.retain(|(existing, _)| *existing != key);
        self.env.push((key, value.into()));
        self
    }

    /// Sets every pair of `vars`, in order.
    pub fn envs(self, vars: &[(&str, &str)]) -> RelayBuilder {
        vars.iter().fold(self, |builder, (key, value)| builder.env(*key, *value))
    }

    /// Leaves `key` out of the child's environment, including the defaults `PORT`,
    /// `BIND_ADDRESS` and `PATH`.
    pub fn env_remove(mut self, key: impl Into<String>) -> RelayBuilder {
        let key = key.into();
        self.env.retain(|(existing, _)| *existing != key);
        self.removed.push(key);
        self
    }

    /// Sets `PORT`, so that a restarted relay listens on the same port.
    pub fn port(mut self, port: u16) -> RelayBuilder {
        self.port = Some(port);
        self
    }

    /// Runs `program` with `args` instead of the relay binary. The harness self-tests use it
    /// to check startup and shutdown handling with a shell script.
    pub fn program(mut self, program: &str, args: &[&str]) -> RelayBuilder {
        let args = args.iter().map(|arg| (*arg).to_owned()).collect();
        self.program = Some((program.to_owned(), args));
        self
    }

    /// Returns the complete environment of the child, defaults first.
    pub fn environment(&self) -> Vec<(String, String)> {
        let mut vars = Vec::new();
        if let Some(path) = std::env::var_os("PATH") {
            vars.push(("PATH".to_owned(), path.to_string_lossy().into_owned()));
        }
        let port = self.port.unwrap_or(0).to_string();
        vars.push(("PORT".to_owned(), port));
        vars.push(("BIND_ADDRESS".to_owned(), "127.0.0.1".to_owned()));
        for (key, value) in &self.env {
            vars.retain(|(existing, _)| existing != key);
            vars.push((key.clone(), value.clone()));
        }
        vars.retain(|(key, _)| !self.removed.contains(key));
        vars
    }

    /// Starts the relay and waits for its `listening at` line, blocking the calling thread.
    /// Panics with all captured output if the process exits first or [`STARTUP_TIMEOUT`]
    /// passes.
    pub fn spawn(&self) -> RelayProcess {
        self.try_spawn().unwrap_or_else(|message| panic!("{message}"))
    }

    /// Same as [`RelayBuilder::spawn`], but returns the failure message instead of
    /// panicking.
    pub fn try_spawn(&self) -> Result<RelayProcess, String> {
        let (mut child, output) = self.start_child()?;
        let url = wait_for_listening(&mut child, &output, self)?;
        Ok(RelayProcess { child, url, output, builder: self.clone(), exit_status: None })
    }

    /// Starts the relay, expecting it to exit on its own (for example on a configuration
    /// error), and returns its exit status and output. Panics if it logs `listening at` or
    /// is still running after [`EXIT_TIMEOUT`].
    pub fn spawn_expect_exit(&self) -> ExitOutput {
        let (mut child, output) = self.start_child().unwrap_or_else(|message| panic!("{message}"));
        let deadline = Instant::now() + EXIT_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("checking the relay process failed") {
                break status;
            }
            let listening = output.stdout().iter().any(|line| listening_url(line).is_some());
            if listening || Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                output.wait_closed(OUTPUT_DRAIN_TIMEOUT);
                panic!(
                    "expected api-relay to exit within {EXIT_TIMEOUT:?}, but it {}\n{}",
                    if listening { "started listening" } else { "kept running" },
                    output.report(self)
                );
            }
            thread::sleep(POLL_INTERVAL);
        };
        output.wait_closed(OUTPUT_DRAIN_TIMEOUT);
        ExitOutput { status, stdout: output.stdout().join("\n"), stderr: output.stderr().join("\n") }
    }

    fn start_child(&self) -> Result<(Child, Arc<CapturedOutput>), String> {
        let (program, args) = match &self.program {
            Some((program, args)) => (program.as_str(), args.as_slice()),
            None => (binary_path(), [].as_slice()),
        };
        let mut child = Command::new(program)
            .args(args)
            .env_clear()
            .envs(self.environment())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|error| format!("starting {program} failed: {error}"))?;
        let output = Arc::new(CapturedOutput::default());
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        spawn_line_reader(stdout, Arc::clone(&output), Stream::Stdout);
        spawn_line_reader(stderr, Arc::clone(&output), Stream::Stderr);
        Ok((child, output))
    }
}

/// Exit status and output of a relay that exited on its own. Lines are joined with `\n`.
#[derive(Debug)]
pub struct ExitOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl ExitOutput {
    /// Returns stdout followed by stderr, for searching an error message in either.
    pub fn combined(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// Polls until the startup line appears and returns the base URL from it.
fn wait_for_listening(
    child: &mut Child,
    output: &CapturedOutput,
    builder: &RelayBuilder,
) -> Result<String, String> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        if let Some(url) = output.stdout().iter().find_map(|line| listening_url(line)) {
            return Ok(url);
        }
        let exited = child.try_wait().map_err(|error| error.to_string());
        if !matches!(exited, Ok(None)) || Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            output.wait_closed(OUTPUT_DRAIN_TIMEOUT);
            let reason = match exited {
                Ok(Some(status)) => format!("exited with {status}"),
                Ok(None) => format!("did not log it within {STARTUP_TIMEOUT:?}"),
                Err(error) => format!("could not be checked: {error}"),
            };
            return Err(format!(
                "api-relay did not start: expected a log line with message \
                 \"{LISTENING_PREFIX}<url>\", but the process {reason}\n{}",
                output.report(builder)
            ));
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Returns the base URL, without a trailing slash, if `line` is a JSON log line whose
/// `fields.message` starts with `listening at `.
pub fn listening_url(line: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let message = value.get("fields")?.get("message")?.as_str()?;
    let url = message.strip_prefix(LISTENING_PREFIX)?.trim();
    Some(url.trim_end_matches('/').to_owned())
}

#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

/// Output lines of one child, filled by two reader threads.
#[derive(Default)]
struct CapturedOutput {
    stdout: Mutex<Vec<String>>,
    stderr: Mutex<Vec<String>>,
    closed_streams: AtomicUsize,
}

impl CapturedOutput {
    fn stdout(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    fn stderr(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until both pipes reached end of file, so that no output of an exited process
    /// is missing, or until `timeout` passes.
    fn wait_closed(&self, timeout: Duration) {
        wait_until(timeout, || self.closed_streams.load(Ordering::SeqCst) == 2);
    }

    /// Formats the environment variable names and all output lines for a failure message.
    /// The values are left out because they include the test secrets.
    fn report(&self, builder: &RelayBuilder) -> String {
        let names: Vec<String> = builder.environment().into_iter().map(|(key, _)| key).collect();
        format!(
            "environment variables: {names:?}\n--- stdout ---\n{}\n--- stderr ---\n{}\n--- end ---",
            self.stdout().join("\n"),
            self.stderr().join("\n")
        )
    }
}

fn spawn_line_reader(pipe: impl Read + Send + 'static, output: Arc<CapturedOutput>, stream: Stream) {
    thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        // The loop ends at end of file, which comes when the child exits or is killed.
        while matches!(reader.read_until(b'\n', &mut line), Ok(count) if count > 0) {
            let text = String::from_utf8_lossy(&line).trim_end_matches(['\r', '\n']).to_owned();
            match stream {
                Stream::Stdout => output.stdout.lock().unwrap().push(text),
                Stream::Stderr => output.stderr.lock().unwrap().push(text),
            }
            line.clear();
        }
        output.closed_streams.fetch_add(1, Ordering::SeqCst);
    });
}

/// A running relay process. Dropping it kills the process with SIGKILL.
pub struct RelayProcess {
    child: Child,
    url: String,
    output: Arc<CapturedOutput>,
    builder: RelayBuilder,
    exit_status: Option<ExitStatus>,
}

impl RelayProcess {
    /// Returns the base URL from the startup line, for example `http://127.0.0.1:41234`.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// Returns the `host:port` part of the base URL.
    pub fn addr(&self) -> String {
        host_port(&self.url).to_owned()
    }

    pub fn port(&self) -> u16 {
        let addr = self.addr();
        let port = addr.rsplit(':').next().unwrap_or_default();
        port.parse().unwrap_or_else(|_| panic!("relay URL {:?} has no numeric port", self.url))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Returns the builder this process was started from, for starting it again.
    pub fn builder(&self) -> &RelayBuilder {
        &self.builder
    }

    /// Returns every stdout line captured so far, without line endings.
    pub fn log_lines(&self) -> Vec<String> {
        self.output.stdout()
    }

    /// Returns every stderr line captured so far, without line endings.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.output.stderr()
    }

    /// Returns the stdout lines that parse as JSON. Other lines are skipped.
    pub fn log_json(&self) -> Vec<serde_json::Value> {
        self.log_lines().iter().filter_map(|line| serde_json::from_str(line).ok()).collect()
    }

    /// Returns the environment variable names and all captured output, for failure messages.
    pub fn output_report(&self) -> String {
        self.output.report(&self.builder)
    }

    /// Waits until a stdout line satisfies `predicate` and returns that line, or returns
    /// `None` after `timeout`.
    pub fn wait_for_log(&self, timeout: Duration, predicate: impl Fn(&str) -> bool) -> Option<String> {
        let mut found = None;
        wait_until(timeout, || {
            found = self.log_lines().into_iter().find(|line| predicate(line));
            found.is_some()
        });
        found
    }

    /// Returns whether the process is still running, and records its status if it exited.
    pub fn is_running(&mut self) -> bool {
        self.poll_exit().is_none()
    }

    /// Kills the process with SIGKILL and waits for it to exit.
    pub fn kill(&mut self) {
        if self.poll_exit().is_none() {
            let _ = self.child.kill();
            self.exit_status = self.child.wait().ok();
        }
        self.output.wait_closed(OUTPUT_DRAIN_TIMEOUT);
    }

    /// Sends SIGTERM with the `kill` command, unless the process already exited. It does not
    /// wait; call [`RelayProcess::wait_exit`] for that.
    pub fn terminate(&mut self) {
        // A process that was reaped may have its PID reused, so only signal a live child.
        if self.poll_exit().is_some() {
            return;
        }
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .unwrap_or_else(|error| panic!("running `kill -TERM {}` failed: {error}", self.pid()));
        assert!(status.success(), "`kill -TERM {}` exited with {status}", self.pid());
    }

    /// Waits up to `timeout` for the process to exit and returns its status, or `None` if it
    /// is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_until(timeout, || self.poll_exit().is_some());
        let status = self.poll_exit();
        if status.is_some() {
            self.output.wait_closed(OUTPUT_DRAIN_TIMEOUT);
        }
        status
    }

    fn poll_exit(&mut self) -> Option<ExitStatus> {
        if self.exit_status.is_none() {
            self.exit_status = self.child.try_wait().ok().flatten();
        }
        self.exit_status
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if self.poll_exit().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
