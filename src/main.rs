//! The `api-relay` binary: `api-relay [--config FILE]` runs a relay, `api-relay demo` runs the
//! one-process demonstration.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use api_relay::config::{Config, Sources};
use api_relay::{demo, server, telemetry};

/// Exit status for invalid configuration (EX_CONFIG of sysexits.h).
const EXIT_CONFIG: u8 = 78;

/// Every exchange allocates and frees many short-lived buffers (headers, records, futures) on
/// its worker thread. mimalloc serves them from per-thread free lists, which takes about a
/// sixth less CPU per exchange than glibc's allocator on the benchmark. Transparent huge pages
/// are off for its heap (`no_thp`), which keeps resident memory near glibc's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("demo") => run_demo(),
        Some("demo-upstream") => match demo::run_upstream() {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("api-relay demo-upstream: {error:#}");
                ExitCode::FAILURE
            }
        },
        Some("--help" | "-h") => {
            println!("usage: api-relay [--config FILE]   run a relay (settings from environment variables)");
            println!(
                "       api-relay demo              run an upstream, relay B and relay A on loopback and send one request"
            );
            println!(
                "       api-relay demo-upstream     run only the demo upstream API on BIND_ADDRESS:PORT (default 0.0.0.0:3000)"
            );
            ExitCode::SUCCESS
        }
        _ => run_relay(&args),
    }
}

fn run_relay(args: &[String]) -> ExitCode {
    let config_file = match args {
        [] => None,
        [flag, path] if flag == "--config" => Some(PathBuf::from(path)),
        _ => {
            eprintln!("usage: api-relay [--config FILE]");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let config = match Sources::from_process(config_file.as_deref())
        .and_then(|sources| Config::from_sources(&sources))
    {
        Ok(config) => config,
        Err(error) => {
            eprintln!("api-relay: {error}");
            for problem in &error.problems {
                eprintln!("  {problem}");
            }
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let _log_guard = telemetry::init(config.log_format, config.debug);
    server::log_startup(&config);
    let result = actix_web::rt::System::new().block_on(async move {
        let running = server::start(config)?;
        // Installs the signal handlers before the listening record announces the relay.
        let drain = server::drain_on_signal(running.server.handle(), running.state.clone());
        tracing::info!(address = %format!("http://{}", running.address), "listening at http://{}", running.address);
        actix_web::rt::spawn(drain);
        running.server.await?;
        tracing::info!("stopped");
        anyhow::Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "relay failed");
            ExitCode::FAILURE
        }
    }
}

fn run_demo() -> ExitCode {
    match demo::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("api-relay demo: {error:#}");
            ExitCode::FAILURE
        }
    }
}
