//! Black-box tests of start-up: configuration problems stop the binary with every problem
//! listed, a YAML file given with `--config` supplies settings that the environment
//! overrides, and the start-up log reports warnings, the crypto and the listening address.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{
    CLIENT_ID_SECRET_VALUE, OUTBOUND_TOKEN_VALUE, RelayBuilder, RelayProcess, Upstream, relay_builder,
};
use serde_json::Value;

/// Exit status of the binary for invalid configuration (EX_CONFIG of sysexits.h).
const EXIT_CONFIG: i32 = 78;
/// Maximum time to wait for a log record that follows start-up.
const LOG_WAIT: Duration = Duration::from_secs(5);

fn binary_path() -> &'static str {
    env!("CARGO_BIN_EXE_api-relay")
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("building the reqwest client failed")
}

/// Returns the message of a JSON log line, if it is one.
fn log_message(line: &str) -> Option<String> {
    let record: Value = serde_json::from_str(line).ok()?;
    record["fields"]["message"].as_str().map(str::to_owned)
}

/// Returns the JSON records whose message equals `message`.
fn records_with_message(relay: &RelayProcess, message: &str) -> Vec<Value> {
    relay.log_json().into_iter().filter(|record| record["fields"]["message"] == message).collect()
}

/// A YAML file in the temporary directory, removed on drop.
struct ConfigFile {
    path: PathBuf,
}

impl ConfigFile {
    fn write(contents: &str) -> ConfigFile {
        let name = format!("api-relay-test-{}.yaml", uuid::Uuid::new_v4().simple());
        let path = std::env::temp_dir().join(name);
        std::fs::write(&path, contents)
            .unwrap_or_else(|error| panic!("writing {} failed: {error}", path.display()));
        ConfigFile { path }
    }

    fn path(&self) -> &str {
        self.path.to_str().expect("temporary path is UTF-8")
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[test]
fn empty_environment_lists_every_required_setting() {
    let output = RelayBuilder::new()
        .env_remove("PATH")
        .env_remove("PORT")
        .env_remove("BIND_ADDRESS")
        .spawn_expect_exit();

    assert_eq!(output.status.code(), Some(EXIT_CONFIG), "{}", output.combined());
    for problem in [
        "UPSTREAM (upstream): required",
        "CLIENT_ID_SECRET (clientIdSecret): required",
        "OUTBOUND_TOKEN (outboundToken): required",
    ] {
        assert!(output.stderr.contains(problem), "missing {problem:?} in stderr:\n{}", output.stderr);
    }
    assert!(!output.combined().contains("listening at"), "a relay with no settings must not listen");
}

#[test]
fn invalid_values_are_reported_together() {
    let port = common::free_port();
    let output = RelayBuilder::new()
        .env("UPSTREAM", "ftp://api.internal")
        .env("CLIENT_ID_SECRET", CLIENT_ID_SECRET_VALUE)
        .env("BIND_ADDRESS", "127.0.0.1")
        .env("PORT", port.to_string())
        .env("MAX_BODY_BYTES", "0")
        .env("LOG_FORMAT", "xml")
        .env("OUTBOUND_ALLOWLIST", "not-an-origin")
        .env("WORKERS", "many")
        .spawn_expect_exit();

    assert_eq!(output.status.code(), Some(EXIT_CONFIG), "{}", output.combined());
    for problem in [
        "UPSTREAM (upstream): scheme must be http or https",
        "OUTBOUND_TOKEN (outboundToken): required",
        "MAX_BODY_BYTES (maxBodyBytes): must be greater than 0",
        "LOG_FORMAT (logFormat): invalid value \"xml\"",
        "OUTBOUND_ALLOWLIST (outboundAllowlist): invalid origin \"not-an-origin\"",
        "WORKERS (workers): invalid value \"many\"",
    ] {
        assert!(output.stderr.contains(problem), "missing {problem:?} in stderr:\n{}", output.stderr);
    }
    assert!(!output.stderr.contains(CLIENT_ID_SECRET_VALUE), "stderr shows the secret");
    let connection_refused = std::net::TcpStream::connect(("127.0.0.1", port)).is_err();
    assert!(connection_refused, "something listens on port {port} after the relay exited");
}

#[test]
fn missing_config_file_is_reported() {
    let path = std::env::temp_dir().join(format!("api-relay-missing-{}.yaml", uuid::Uuid::new_v4().simple()));
    let path = path.to_str().expect("temporary path is UTF-8");

    let output =
        relay_builder("http://127.0.0.1:9").program(binary_path(), &["--config", path]).spawn_expect_exit();

    assert_eq!(output.status.code(), Some(EXIT_CONFIG), "{}", output.combined());
    assert!(output.stderr.contains(&format!("--config {path}")), "stderr:\n{}", output.stderr);
}

#[tokio::test]
async fn config_file_supplies_settings_and_environment_wins() {
    let upstream = Upstream::start();
    let file_token = "file-outbound-token-6a1d0c93e27b4f58a0c4d1e9b3f7a215";
    let file = ConfigFile::write(&format!(
        "upstream: {}\nclientIdSecret: {CLIENT_ID_SECRET_VALUE}\noutboundToken: {file_token}\nmaxBodyBytes: 100\n",
        upstream.url()
    ));
    // UPSTREAM and CLIENT_ID_SECRET come only from the file. Both relays of the pair read it:
    // relay A checks the token and the body limit, relay B proxies to the file's upstream.
    let from_file = RelayBuilder::new()
        .program(binary_path(), &["--config", file.path()])
        .env("OUTBOUND_TOKEN", OUTBOUND_TOKEN_VALUE)
        .env("MAX_BODY_BYTES", "100000");
    let relay_b = from_file.spawn();
    let relay_a = from_file.spawn();
    let send = |token: &str, body: Vec<u8>| {
        client()
            .post(format!("{}/echo/from-file", relay_a.url()))
            .header("x-mte-outbound-token", token)
            .header("x-mte-upstream", relay_b.url())
            .body(body)
            .send()
    };

    let with_file_token = send(file_token, vec![b'f'; 10]).await.expect("request to the relay failed");
    assert_eq!(with_file_token.status(), 401, "the environment's OUTBOUND_TOKEN must replace the file's");

    let over_file_limit =
        send(OUTBOUND_TOKEN_VALUE, vec![b'e'; 1000]).await.expect("request to the relay failed");
    assert_eq!(over_file_limit.status(), 200, "the environment's MAX_BODY_BYTES must replace the file's");
    let recorded = upstream.wait_for_requests(1, LOG_WAIT);
    assert_eq!(recorded[0].target, b"/echo/from-file", "the file's upstream must receive the request");
    assert_eq!(recorded[0].body_len, 1000);

    let loaded = records_with_message(&relay_a, "configuration loaded");
    assert_eq!(loaded.len(), 1, "one configuration record expected\n{}", relay_a.output_report());
    assert_eq!(loaded[0]["fields"]["max_body_bytes"], 100_000);
    assert_eq!(loaded[0]["fields"]["upstream"], format!("{}/", upstream.url()));
}

#[test]
fn short_client_id_secret_logs_warning() {
    let short_secret = "short-secret-4f1a";
    let relay = relay_builder("http://127.0.0.1:9").env("CLIENT_ID_SECRET", short_secret).spawn();

    let warning = relay.wait_for_log(LOG_WAIT, |line| {
        log_message(line).is_some_and(|message| message.starts_with("CLIENT_ID_SECRET (clientIdSecret)"))
    });

    let warning =
        warning.unwrap_or_else(|| panic!("no warning about the short secret\n{}", relay.output_report()));
    let record: Value = serde_json::from_str(&warning).expect("the warning is a JSON record");
    assert_eq!(record["level"], "WARN");
    assert!(record["fields"]["message"].as_str().unwrap().contains("shorter than 32 characters"), "{record}");
    assert!(relay.log_lines().iter().all(|line| !line.contains(short_secret)), "the log shows the secret");

    let long = relay_builder("http://127.0.0.1:9").spawn();
    let messages: Vec<String> = long.log_lines().iter().filter_map(|line| log_message(line)).collect();
    assert!(
        messages.iter().all(|message| !message.starts_with("CLIENT_ID_SECRET")),
        "a {}-character secret got a warning: {messages:?}",
        CLIENT_ID_SECRET_VALUE.len()
    );
}

#[tokio::test]
async fn startup_log_reports_crypto_and_address() {
    let relay = relay_builder("http://127.0.0.1:9").spawn();

    let crypto = records_with_message(&relay, "crypto ready");
    assert_eq!(crypto.len(), 1, "one \"crypto ready\" record expected\n{}", relay.output_report());
    assert_eq!(crypto[0]["level"], "INFO");
    let port = relay.port();
    assert_ne!(port, 0, "the log must name the bound port, not the requested port 0");
    let listening = records_with_message(&relay, &format!("listening at http://127.0.0.1:{port}"));
    assert_eq!(listening.len(), 1, "no listening record for port {port}\n{}", relay.output_report());

    let health = client().get(format!("{}/healthz", relay.url())).send().await.expect("GET /healthz failed");
    assert_eq!(health.status(), 200, "the relay must respond at the logged address");
    for line in relay.log_lines() {
        assert!(!line.contains(OUTBOUND_TOKEN_VALUE), "the log shows the outbound token: {line}");
        assert!(!line.contains(CLIENT_ID_SECRET_VALUE), "the log shows the client id secret: {line}");
    }
}
