//! Settings: read from environment variables and an optional YAML file (`--config FILE`),
//! validated all at once.
//!
//! Each setting has an environment variable (the names operators of the MTE API Relay know) and
//! a camelCase YAML key; the environment wins over the file. Every problem is collected, and
//! [`ConfigError`] lists them all, each naming both the variable and the key, so an operator fixes
//! a task definition in one pass. Sources are passed in, so tests never touch the process
//! environment.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use actix_web::http::header::{HeaderName, HeaderValue};
use thiserror::Error;
use url::Url;

/// Default listening port: the one the MTE API Relay container uses.
pub const DEFAULT_PORT: u16 = 8080;
/// Default body limit in bytes (1 GiB): generous for APIs, still a bound against a caller
/// streaming forever.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 1 << 30;
/// Default seconds an upstream (relay B, or B's API) may take to answer before the relay
/// returns 504.
pub const DEFAULT_UPSTREAM_TIMEOUT_SECS: u64 = 30;
/// Default replay window in sequence numbers: how far exchanges of one pair may overtake each
/// other on the way to relay B.
pub const DEFAULT_REPLAY_WINDOW: u64 = 1024;
/// Default bytes of a request body relay A keeps so it can retry once after the peer lost the
/// pair. 256 KiB covers typical API calls; larger bodies stream without a retry, so relay A's
/// memory does not grow with upload sizes.
pub const DEFAULT_RETRY_BUFFER_BYTES: usize = 256 * 1024;
/// Default idle seconds after which a pair expires (1 hour).
pub const DEFAULT_PAIR_IDLE_SECS: u64 = 3600;
/// Default maximum age of a pair in seconds (24 hours), bounding how long one key is used.
pub const DEFAULT_PAIR_MAX_AGE_SECS: u64 = 86_400;
/// Default maximum exchanges per pair, bounding how much traffic one key protects.
pub const DEFAULT_PAIR_MAX_EXCHANGES: u64 = 1 << 32;
/// Default maximum pairs one pairing request may ask for.
pub const DEFAULT_MAX_PAIRS_PER_REQUEST: usize = 16;
/// Default maximum header lines of one request or response.
pub const DEFAULT_MAX_HEADER_COUNT: usize = 128;
/// Default maximum encoded size of one header block in bytes (64 KiB).
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// Default seconds an idle keep-alive connection stays open: longer than the 60 s idle timeout
/// of an AWS load balancer, so the balancer closes first and never reuses a closed connection.
pub const DEFAULT_KEEP_ALIVE_SECS: u64 = 75;
/// Default seconds in-flight requests get to finish after SIGTERM: below the 30 s ECS waits
/// before it kills a container, so the relay exits on its own.
pub const DEFAULT_SHUTDOWN_GRACE_SECS: u64 = 25;
/// Default maximum number of connections to Redis one relay process opens. Each store call
/// uses one connection for a round trip of well under a millisecond on a local network, so 16
/// serve thousands of calls a second. A call that finds all in use waits up to `REDIS_TIMEOUT_MS`.
pub const DEFAULT_REDIS_POOL_SIZE: u32 = 16;
/// Default milliseconds one Redis call may take, the wait for a connection included. After that
/// relay B responds with 568 and relay A with 502, so a Redis outage never makes a request hang.
pub const DEFAULT_REDIS_TIMEOUT_MS: u64 = 1000;
/// Default first part of every Redis key, so several deployments can share one Redis.
pub const DEFAULT_REDIS_KEY_PREFIX: &str = "api-relay";
/// Default pairing requests relay B answers at once: each costs about 1 ms of CPU per pair, so
/// a few at a time keep the workers free for exchanges.
pub const DEFAULT_MAX_CONCURRENT_PAIRINGS: usize = 4;
/// Default pairing requests per client id (or address) per minute: a relay A pairs once per
/// pool and again only after a restart or an expiry, so 30 is far above normal use.
pub const DEFAULT_PAIRING_REQUESTS_PER_MINUTE: u32 = 30;
/// Default seconds a client has to send a complete request head; bounds slow-header
/// (slowloris) connections.
pub const DEFAULT_CLIENT_REQUEST_TIMEOUT_SECS: u64 = 10;
/// Default maximum open connections per worker.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// `CLIENT_ID_SECRET` shorter than this many characters gets a start-up warning.
pub const MIN_SECRET_CHARS: usize = 32;
/// `PAIRING_PSK` must have at least this many characters (HPKE asks for 32 bytes of entropy).
pub const MIN_PSK_CHARS: usize = 32;

/// A secret setting. `Debug` and `Display` never show the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(redacted)")
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// An origin on the outbound allow-list: scheme, host and port, all compared exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedOrigin {
    pub scheme: String,
    pub host: String,
    pub port: u16,
}

/// The validated settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub upstream: Url,
    pub client_id_secret: Secret,
    pub client_id_secret_previous: Option<Secret>,
    pub outbound_token: Secret,
    pub redis_url: Option<Secret>,
    pub redis_pool_size: u32,
    pub redis_timeout: Duration,
    pub redis_key_prefix: String,
    pub bind_address: IpAddr,
    pub port: u16,
    pub debug: bool,
    /// One record per finished request; off keeps warnings and errors only.
    pub request_log: bool,
    pub log_format: LogFormat,
    /// Added to every proxied request and every response.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub pairing_psk: Option<Secret>,
    pub outbound_allowlist: Vec<AllowedOrigin>,
    pub extra_ca_file: Option<PathBuf>,
    pub max_body_bytes: u64,
    pub upstream_timeout: Duration,
    pub pair_pool_size: usize,
    pub replay_window: u64,
    pub retry_buffer_bytes: usize,
    pub pair_idle_timeout: Duration,
    pub pair_max_age: Duration,
    pub pair_max_exchanges: u64,
    pub max_pairs_per_request: usize,
    pub max_concurrent_pairings: usize,
    pub pairing_requests_per_minute: u32,
    pub client_request_timeout: Duration,
    pub max_connections: usize,
    pub max_header_count: usize,
    pub max_header_bytes: usize,
    pub keep_alive: Duration,
    pub shutdown_grace: Duration,
    pub workers: usize,
}

/// Every problem found in the settings.
#[derive(Debug, Error)]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration: {}", self.problems.join("; "))
    }
}

/// Where settings come from: environment variables and the YAML file's keys, both as text.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    pub env: HashMap<String, String>,
    pub file: HashMap<String, String>,
}

impl Sources {
    /// Reads the process environment and, when given, the YAML file.
    ///
    /// # Errors
    /// `ConfigError` when the file cannot be read or is not a YAML mapping.
    pub fn from_process(config_file: Option<&Path>) -> Result<Self, ConfigError> {
        let env = std::env::vars().collect();
        let file = match config_file {
            Some(path) => read_yaml(path)?,
            None => HashMap::new(),
        };
        Ok(Self { env, file })
    }
}

fn read_yaml(path: &Path) -> Result<HashMap<String, String>, ConfigError> {
    let problem =
        |reason: String| ConfigError { problems: vec![format!("--config {}: {reason}", path.display())] };
    let source = config::File::from(path).format(config::FileFormat::Yaml).required(true);
    let built =
        config::Config::builder().add_source(source).build().map_err(|error| problem(error.to_string()))?;
    let values: HashMap<String, serde_json::Value> = built
        .try_deserialize()
        .map_err(|error| problem(format!("expected a mapping of settings: {error}")))?;
    Ok(values.into_iter().map(|(key, value)| (key, yaml_value_text(value))).collect())
}

fn yaml_value_text(value: serde_json::Value) -> String {
    match value {
        serde_json::Value::String(text) => text,
        serde_json::Value::Array(items) => {
            items.into_iter().map(yaml_value_text).collect::<Vec<_>>().join(",")
        }
        other => other.to_string(),
    }
}

/// One setting being read: its variable, its YAML key and the problems list to report into.
struct Reader<'a> {
    sources: &'a Sources,
    problems: Vec<String>,
    /// YAML keys looked up, so keys nobody reads (typos) can be reported.
    keys_read: std::cell::RefCell<std::collections::HashSet<String>>,
}

impl Reader<'_> {
    fn raw(&self, env: &str, key: &str) -> Option<String> {
        self.keys_read.borrow_mut().insert(key.to_owned());
        let value = self.sources.env.get(env).or_else(|| self.sources.file.get(key))?;
        let value = value.trim();
        (!value.is_empty()).then(|| value.to_owned())
    }

    fn problem(&mut self, env: &str, key: &str, message: impl fmt::Display) {
        self.problems.push(format!("{env} ({key}): {message}"));
    }

    fn required(&mut self, env: &str, key: &str) -> Option<String> {
        let value = self.raw(env, key);
        if value.is_none() {
            self.problem(env, key, "required");
        }
        value
    }

    fn parsed<T: std::str::FromStr>(&mut self, env: &str, key: &str, default: T, expected: &str) -> T {
        match self.raw(env, key) {
            None => default,
            Some(text) => text.parse().unwrap_or_else(|_| {
                self.problem(env, key, format!("invalid value {text:?}, expected {expected}"));
                default
            }),
        }
    }

    fn positive<T: std::str::FromStr + PartialOrd + Default + Copy>(
        &mut self,
        env: &str,
        key: &str,
        default: T,
    ) -> T {
        let value = self.parsed(env, key, default, "a positive whole number");
        if value <= T::default() {
            self.problem(env, key, "must be greater than 0");
            return default;
        }
        value
    }

    fn flag(&mut self, env: &str, key: &str) -> bool {
        self.flag_or(env, key, false)
    }

    fn flag_or(&mut self, env: &str, key: &str, default: bool) -> bool {
        match self.raw(env, key).map(|text| text.to_ascii_lowercase()) {
            None => default,
            Some(text) if matches!(text.as_str(), "true" | "1" | "yes") => true,
            Some(text) if matches!(text.as_str(), "false" | "0" | "no") => false,
            Some(text) => {
                self.problem(env, key, format!("invalid value {text:?}, expected true or false"));
                false
            }
        }
    }
}

impl Config {
    /// Reads and validates every setting.
    ///
    /// # Errors
    /// `ConfigError` listing every problem, each as `VARIABLE (yamlKey): message`.
    pub fn from_sources(sources: &Sources) -> Result<Self, ConfigError> {
        let mut reader = Reader { sources, problems: Vec::new(), keys_read: Default::default() };
        let config = Self::read(&mut reader);
        let mut unknown: Vec<&String> =
            sources.file.keys().filter(|key| !reader.keys_read.borrow().contains(key.as_str())).collect();
        unknown.sort();
        for key in unknown {
            reader.problems.push(format!(
                "--config file: unknown key {key:?}; check its spelling against the keys in docs/configuration.md"
            ));
        }
        match (config, reader.problems.is_empty()) {
            (Some(config), true) => Ok(config),
            _ => Err(ConfigError { problems: reader.problems }),
        }
    }

    fn read(reader: &mut Reader<'_>) -> Option<Self> {
        let upstream = reader.required("UPSTREAM", "upstream").and_then(|text| parse_upstream(reader, &text));
        let client_id_secret = reader.required("CLIENT_ID_SECRET", "clientIdSecret").map(Secret);
        let client_id_secret_previous =
            reader.raw("CLIENT_ID_SECRET_PREVIOUS", "clientIdSecretPrevious").map(Secret);
        let outbound_token = reader.required("OUTBOUND_TOKEN", "outboundToken").map(Secret);
        let redis_url = reader.raw("REDIS_URL", "redisURL").and_then(|text| parse_redis_url(reader, &text));
        let redis_key_prefix = reader
            .raw("REDIS_KEY_PREFIX", "redisKeyPrefix")
            .map_or_else(|| DEFAULT_REDIS_KEY_PREFIX.to_owned(), |text| parse_key_prefix(reader, text));
        let pairing_psk = reader.raw("PAIRING_PSK", "pairingPsk").and_then(|text| parse_psk(reader, text));
        let headers =
            reader.raw("HEADERS", "headers").map(|text| parse_headers(reader, &text)).unwrap_or_default();
        let outbound_allowlist = reader
            .raw("OUTBOUND_ALLOWLIST", "outboundAllowlist")
            .map(|text| parse_allowlist(reader, &text))
            .unwrap_or_default();
        let extra_ca_file = reader.raw("EXTRA_CA_FILE", "extraCaFile").map(PathBuf::from);
        if let Some(path) = &extra_ca_file
            && !path.is_file()
        {
            reader.problem("EXTRA_CA_FILE", "extraCaFile", format!("file {} not found", path.display()));
        }
        let log_format = match reader.raw("LOG_FORMAT", "logFormat").as_deref() {
            None | Some("json") => LogFormat::Json,
            Some("pretty") => LogFormat::Pretty,
            Some(other) => {
                reader.problem(
                    "LOG_FORMAT",
                    "logFormat",
                    format!("invalid value {other:?}, expected json or pretty"),
                );
                LogFormat::Json
            }
        };
        let default_workers = std::thread::available_parallelism().map_or(2, usize::from);
        let workers = reader.positive("WORKERS", "workers", default_workers);
        Some(Self {
            bind_address: reader.parsed(
                "BIND_ADDRESS",
                "bindAddress",
                IpAddr::from([0, 0, 0, 0]),
                "an IP address",
            ),
            port: reader.parsed("PORT", "port", DEFAULT_PORT, "a port number 0-65535"),
            debug: reader.flag("DEBUG", "debug"),
            request_log: reader.flag_or("REQUEST_LOG", "requestLog", true),
            log_format,
            headers,
            pairing_psk,
            outbound_allowlist,
            extra_ca_file,
            max_body_bytes: reader.positive("MAX_BODY_BYTES", "maxBodyBytes", DEFAULT_MAX_BODY_BYTES),
            upstream_timeout: secs(reader.positive(
                "UPSTREAM_TIMEOUT_SECS",
                "upstreamTimeoutSecs",
                DEFAULT_UPSTREAM_TIMEOUT_SECS,
            )),
            // Relay A defaults to one pair per worker. Each worker then allocates from a session of
            // its own, and relay B's replay checks cover as many exchanges per pair as they can.
            // The default stays within what a relay B with default settings grants at once.
            pair_pool_size: reader.positive(
                "PAIR_POOL_SIZE",
                "pairPoolSize",
                workers.min(DEFAULT_MAX_PAIRS_PER_REQUEST),
            ),
            replay_window: bounded_window(reader),
            retry_buffer_bytes: reader.parsed(
                "RETRY_BUFFER_BYTES",
                "retryBufferBytes",
                DEFAULT_RETRY_BUFFER_BYTES,
                "a whole number of bytes",
            ),
            pair_idle_timeout: secs(reader.positive(
                "PAIR_IDLE_TIMEOUT_SECS",
                "pairIdleTimeoutSecs",
                DEFAULT_PAIR_IDLE_SECS,
            )),
            pair_max_age: secs(reader.positive(
                "PAIR_MAX_AGE_SECS",
                "pairMaxAgeSecs",
                DEFAULT_PAIR_MAX_AGE_SECS,
            )),
            pair_max_exchanges: reader.positive(
                "PAIR_MAX_EXCHANGES",
                "pairMaxExchanges",
                DEFAULT_PAIR_MAX_EXCHANGES,
            ),
            max_pairs_per_request: reader.positive(
                "MAX_PAIRS_PER_REQUEST",
                "maxPairsPerRequest",
                DEFAULT_MAX_PAIRS_PER_REQUEST,
            ),
            max_concurrent_pairings: reader.positive(
                "MAX_CONCURRENT_PAIRINGS",
                "maxConcurrentPairings",
                DEFAULT_MAX_CONCURRENT_PAIRINGS,
            ),
            pairing_requests_per_minute: reader.positive(
                "PAIRING_REQUESTS_PER_MINUTE",
                "pairingRequestsPerMinute",
                DEFAULT_PAIRING_REQUESTS_PER_MINUTE,
            ),
            client_request_timeout: secs(reader.positive(
                "CLIENT_REQUEST_TIMEOUT_SECS",
                "clientRequestTimeoutSecs",
                DEFAULT_CLIENT_REQUEST_TIMEOUT_SECS,
            )),
            max_connections: reader.positive("MAX_CONNECTIONS", "maxConnections", DEFAULT_MAX_CONNECTIONS),
            max_header_count: reader.positive("MAX_HEADER_COUNT", "maxHeaderCount", DEFAULT_MAX_HEADER_COUNT),
            max_header_bytes: reader.positive("MAX_HEADER_BYTES", "maxHeaderBytes", DEFAULT_MAX_HEADER_BYTES),
            keep_alive: secs(reader.positive("KEEP_ALIVE_SECS", "keepAliveSecs", DEFAULT_KEEP_ALIVE_SECS)),
            shutdown_grace: secs(reader.parsed(
                "SHUTDOWN_GRACE_SECS",
                "shutdownGraceSecs",
                DEFAULT_SHUTDOWN_GRACE_SECS,
                "a whole number of seconds",
            )),
            workers,
            redis_pool_size: reader.positive("REDIS_POOL_SIZE", "redisPoolSize", DEFAULT_REDIS_POOL_SIZE),
            redis_timeout: Duration::from_millis(reader.positive(
                "REDIS_TIMEOUT_MS",
                "redisTimeoutMs",
                DEFAULT_REDIS_TIMEOUT_MS,
            )),
            redis_key_prefix,
            upstream: upstream?,
            client_id_secret: client_id_secret?,
            client_id_secret_previous,
            outbound_token: outbound_token?,
            redis_url,
        })
    }

    /// Warnings about settings that work but deserve attention, logged at start-up.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.client_id_secret.expose().chars().count() < MIN_SECRET_CHARS {
            warnings.push(format!("CLIENT_ID_SECRET (clientIdSecret) is shorter than {MIN_SECRET_CHARS} characters; use a long random value"));
        }
        if self.outbound_allowlist.is_empty() {
            warnings.push("OUTBOUND_ALLOWLIST (outboundAllowlist) is empty: any caller with the outbound token can reach any host".to_owned());
        }
        if self.pair_pool_size > DEFAULT_MAX_PAIRS_PER_REQUEST {
            warnings.push(format!("PAIR_POOL_SIZE (pairPoolSize) is {}, above the {DEFAULT_MAX_PAIRS_PER_REQUEST} pairs that a relay B with the default MAX_PAIRS_PER_REQUEST accepts, so such a peer rejects the pairing with 564", self.pair_pool_size));
        }
        if self.pairing_psk.is_none() {
            warnings.push("PAIRING_PSK (pairingPsk) is not set: pairing is only as trustworthy as the transport between the relays; use HTTPS between them".to_owned());
        }
        warnings
    }
}

/// Largest `REPLAY_WINDOW`: 2^24 sequence numbers (a 2 MiB bitmap per pair). A state store reads
/// back larger windows as corrupt records.
pub const MAX_REPLAY_WINDOW: u64 = 1 << 24;

fn bounded_window(reader: &mut Reader<'_>) -> u64 {
    let window = reader.positive("REPLAY_WINDOW", "replayWindow", DEFAULT_REPLAY_WINDOW);
    if window > MAX_REPLAY_WINDOW {
        reader.problem("REPLAY_WINDOW", "replayWindow", format!("must be at most {MAX_REPLAY_WINDOW}"));
        return DEFAULT_REPLAY_WINDOW;
    }
    window
}

fn secs(value: u64) -> Duration {
    Duration::from_secs(value)
}

fn parse_upstream(reader: &mut Reader<'_>, text: &str) -> Option<Url> {
    let problem = match Url::parse(text) {
        Ok(url) if !matches!(url.scheme(), "http" | "https") => "scheme must be http or https",
        Ok(url) if url.host().is_none() => "a host is required",
        Ok(url) if url.query().is_some() || url.fragment().is_some() => {
            "must not contain a query or fragment"
        }
        Ok(url) if !url.username().is_empty() || url.password().is_some() => "must not contain credentials",
        Ok(url) => return Some(url),
        Err(_) => "invalid URL, expected e.g. http://api.internal:3000 or https://api.example.com/v1",
    };
    reader.problem("UPSTREAM", "upstream", problem);
    None
}

fn parse_redis_url(reader: &mut Reader<'_>, text: &str) -> Option<Secret> {
    match Url::parse(text) {
        Ok(url) if matches!(url.scheme(), "redis" | "rediss") && url.host().is_some() => {
            Some(Secret(text.to_owned()))
        }
        // The URL may hold a password, so the message never repeats it.
        _ => {
            reader.problem(
                "REDIS_URL",
                "redisURL",
                "invalid URL, expected redis://host:6379 or rediss://host:6379",
            );
            None
        }
    }
}

/// Checks a Redis key prefix: braces would change the hash tag that keeps a pair's keys in
/// one Redis Cluster slot, and whitespace makes keys hard to type in `redis-cli`.
fn parse_key_prefix(reader: &mut Reader<'_>, text: String) -> String {
    if text.contains(['{', '}']) || text.chars().any(char::is_whitespace) {
        reader.problem(
            "REDIS_KEY_PREFIX",
            "redisKeyPrefix",
            format!(
                "invalid value {text:?}, expected no braces and no spaces, e.g. {DEFAULT_REDIS_KEY_PREFIX}"
            ),
        );
        return DEFAULT_REDIS_KEY_PREFIX.to_owned();
    }
    text
}

fn parse_psk(reader: &mut Reader<'_>, text: String) -> Option<Secret> {
    if text.chars().count() < MIN_PSK_CHARS {
        reader.problem("PAIRING_PSK", "pairingPsk", format!("must have at least {MIN_PSK_CHARS} characters"));
        return None;
    }
    Some(Secret(text))
}

fn parse_headers(reader: &mut Reader<'_>, text: &str) -> Vec<(HeaderName, HeaderValue)> {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(text) else {
        reader.problem(
            "HEADERS",
            "headers",
            "expected a JSON object of string values, e.g. {\"x-env\":\"prod\"}",
        );
        return Vec::new();
    };
    let mut headers = Vec::new();
    for (name, value) in map {
        let parsed = match (HeaderName::try_from(name.as_str()), value.as_str().map(HeaderValue::try_from)) {
            (Ok(name), Some(Ok(value))) => Some((name, value)),
            _ => None,
        };
        match parsed {
            Some(header) => headers.push(header),
            None => reader.problem(
                "HEADERS",
                "headers",
                format!("header {name:?} needs a valid name and a string value"),
            ),
        }
    }
    headers
}

fn parse_allowlist(reader: &mut Reader<'_>, text: &str) -> Vec<AllowedOrigin> {
    let mut origins = Vec::new();
    for entry in text.split(',').map(str::trim).filter(|entry| !entry.is_empty()) {
        match origin_of(entry) {
            Some(origin) => origins.push(origin),
            None => reader.problem(
                "OUTBOUND_ALLOWLIST",
                "outboundAllowlist",
                format!("invalid origin {entry:?}, expected scheme://host[:port] such as https://relay-b.example.com"),
            ),
        }
    }
    origins
}

fn origin_of(text: &str) -> Option<AllowedOrigin> {
    let url = Url::parse(text).ok()?;
    let plain = url.username().is_empty() && url.password().is_none() && matches!(url.path(), "" | "/");
    if !plain || url.query().is_some() || !matches!(url.scheme(), "http" | "https") {
        return None;
    }
    Some(AllowedOrigin {
        scheme: url.scheme().to_owned(),
        host: url.host_str()?.to_owned(),
        port: url.port_or_known_default()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(env: &[(&str, &str)], file: &[(&str, &str)]) -> Sources {
        let map =
            |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Sources { env: map(env), file: map(file) }
    }

    const REQUIRED: [(&str, &str); 3] =
        [("UPSTREAM", "http://127.0.0.1:3000/api"), ("CLIENT_ID_SECRET", "s"), ("OUTBOUND_TOKEN", "t")];

    #[test]
    fn request_log_turns_off_from_either_source() {
        let off = [REQUIRED.as_slice(), &[("REQUEST_LOG", "false")]].concat();
        assert!(!Config::from_sources(&sources(&off, &[])).unwrap().request_log);
        let off_in_file = sources(&REQUIRED, &[("requestLog", "false")]);
        assert!(!Config::from_sources(&off_in_file).unwrap().request_log);
        let invalid = [REQUIRED.as_slice(), &[("REQUEST_LOG", "quiet")]].concat();
        let error = Config::from_sources(&sources(&invalid, &[])).unwrap_err();
        assert!(
            error
                .problems
                .iter()
                .any(|problem| problem.starts_with("REQUEST_LOG (requestLog): invalid value")),
            "{:?}",
            error.problems
        );
    }

    #[test]
    fn defaults_apply() {
        let config = Config::from_sources(&sources(&REQUIRED, &[])).unwrap();
        assert_eq!(config.port, DEFAULT_PORT);
        assert!(!config.debug);
        assert!(config.request_log);
        assert_eq!(config.pair_pool_size, config.workers);
        assert_eq!(config.upstream.path(), "/api");
    }

    #[test]
    fn pair_pool_follows_workers_unless_set() {
        let with = |extra: &[(&'static str, &'static str)]| {
            let pairs: Vec<_> = REQUIRED.iter().chain(extra).copied().collect();
            Config::from_sources(&sources(&pairs, &[])).unwrap()
        };
        assert_eq!(with(&[("WORKERS", "3")]).pair_pool_size, 3);
        assert_eq!(with(&[("WORKERS", "40")]).pair_pool_size, DEFAULT_MAX_PAIRS_PER_REQUEST);
        let pool_warning =
            |config: &Config| config.warnings().iter().any(|text| text.contains("PAIR_POOL_SIZE"));
        assert!(!pool_warning(&with(&[("WORKERS", "40")])));
        assert!(pool_warning(&with(&[("PAIR_POOL_SIZE", "17")])));
        let set = with(&[("WORKERS", "3"), ("PAIR_POOL_SIZE", "5")]);
        assert_eq!((set.workers, set.pair_pool_size), (3, 5));
    }

    #[test]
    fn every_problem_is_listed_with_variable_and_key() {
        let error =
            Config::from_sources(&sources(&[("PORT", "eighty"), ("HEADERS", "[1]")], &[])).unwrap_err();
        let text = error.to_string();
        for expected in [
            "UPSTREAM (upstream): required",
            "CLIENT_ID_SECRET (clientIdSecret): required",
            "OUTBOUND_TOKEN (outboundToken): required",
            "PORT (port): invalid value",
            "HEADERS (headers): expected a JSON object",
        ] {
            assert!(text.contains(expected), "expected {expected:?} in {text:?}");
        }
    }

    #[test]
    fn unknown_file_key_is_reported() {
        let file = [
            ("upstream", "http://file:1"),
            ("clientIdSecret", "f"),
            ("outboundToken", "f"),
            ("prot", "9000"),
        ];
        let text = Config::from_sources(&sources(&[], &file)).unwrap_err().to_string();
        assert!(text.contains("unknown key \"prot\""), "{text}");
    }

    #[test]
    fn environment_wins_over_file() {
        let file = [
            ("upstream", "http://file:1"),
            ("clientIdSecret", "f"),
            ("outboundToken", "f"),
            ("port", "9000"),
        ];
        let config = Config::from_sources(&sources(&[("PORT", "9001")], &file)).unwrap();
        assert_eq!(config.port, 9001);
        assert_eq!(config.upstream.as_str(), "http://file:1/");
    }

    #[test]
    fn headers_json_is_parsed_in_order_given() {
        let mut env = REQUIRED.to_vec();
        env.push(("HEADERS", r#"{"x-env":"prod","x-team":"api"}"#));
        let config = Config::from_sources(&sources(&env, &[])).unwrap();
        assert_eq!(config.headers.len(), 2);
    }

    #[test]
    fn bad_upstream_redis_and_psk_are_reported() {
        let env = [
            ("UPSTREAM", "ftp://x"),
            ("CLIENT_ID_SECRET", "s"),
            ("OUTBOUND_TOKEN", "t"),
            ("REDIS_URL", "http://user:hunter2@x"),
            ("PAIRING_PSK", "short"),
        ];
        let text = Config::from_sources(&sources(&env, &[])).unwrap_err().to_string();
        assert!(text.contains("UPSTREAM (upstream): scheme must be http or https"), "{text}");
        assert!(text.contains("REDIS_URL (redisURL): invalid URL"), "{text}");
        assert!(!text.contains("hunter2"), "message repeats the redis password: {text}");
        assert!(text.contains("PAIRING_PSK (pairingPsk): must have at least"), "{text}");
    }

    #[test]
    fn redis_settings_have_defaults_and_are_checked() {
        let config = Config::from_sources(&sources(&REQUIRED, &[])).unwrap();
        assert_eq!(config.redis_pool_size, DEFAULT_REDIS_POOL_SIZE);
        assert_eq!(config.redis_timeout, Duration::from_millis(DEFAULT_REDIS_TIMEOUT_MS));
        assert_eq!(config.redis_key_prefix, DEFAULT_REDIS_KEY_PREFIX);

        let file = [("redisPoolSize", "4"), ("redisTimeoutMs", "250"), ("redisKeyPrefix", "relay-prod")];
        let config = Config::from_sources(&sources(&REQUIRED, &file)).unwrap();
        assert_eq!(config.redis_pool_size, 4);
        assert_eq!(config.redis_timeout, Duration::from_millis(250));
        assert_eq!(config.redis_key_prefix, "relay-prod");

        let mut env = REQUIRED.to_vec();
        env.extend([("REDIS_POOL_SIZE", "0"), ("REDIS_TIMEOUT_MS", "soon"), ("REDIS_KEY_PREFIX", "a{b}")]);
        let text = Config::from_sources(&sources(&env, &[])).unwrap_err().to_string();
        assert!(text.contains("REDIS_POOL_SIZE (redisPoolSize): must be greater than 0"), "{text}");
        assert!(text.contains("REDIS_TIMEOUT_MS (redisTimeoutMs): invalid value"), "{text}");
        assert!(text.contains("REDIS_KEY_PREFIX (redisKeyPrefix): invalid value"), "{text}");
    }

    #[test]
    fn allowlist_origins_get_default_ports() {
        let mut env = REQUIRED.to_vec();
        env.push(("OUTBOUND_ALLOWLIST", "https://relay-b.example.com, http://10.0.0.5:8080"));
        let config = Config::from_sources(&sources(&env, &[])).unwrap();
        assert_eq!(config.outbound_allowlist[0].port, 443);
        assert_eq!(config.outbound_allowlist[1].host, "10.0.0.5");
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let config = Config::from_sources(&sources(&REQUIRED, &[])).unwrap();
        let debug = format!("{config:?}");
        assert!(debug.contains("Secret(redacted)"));
        assert!(!debug.contains("OUTBOUND_TOKEN"));
    }
}
