//! `api-relay demo`: a demo upstream API, relay B and relay A in one process on loopback, with
//! in-memory state. It sends one JSON POST through the pair, prints what the upstream API
//! received and what came back, then keeps running so the printed `curl` commands work.
//!
//! The demo upstream API (also `api-relay demo-upstream`) has a login route, an items
//! collection with create, read, update and delete, and an echo route that returns what it
//! received.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use anyhow::Context as _;
use serde_json::{Value, json};

use crate::config::{Config, Sources};
use crate::server;

/// Token the demo relays share; printed so the curl commands can use it.
const DEMO_OUTBOUND_TOKEN: &str = "demo-outbound-token";
/// Client id secret of the demo relay B; a real deployment uses a long random value.
const DEMO_CLIENT_ID_SECRET: &str = "demo-client-id-secret-0123456789abcdef";

/// Runs the demo until interrupted.
///
/// # Errors
/// When a server cannot start or the first request fails.
pub fn run() -> anyhow::Result<()> {
    // Warnings only, so the demo's own output stays readable.
    let _log_guard = crate::telemetry::init_at(crate::config::LogFormat::Pretty, "warn");
    actix_web::rt::System::new().block_on(async {
        let (upstream_server, upstream) = start_upstream(([127, 0, 0, 1], 0).into())?;
        actix_web::rt::spawn(upstream_server);
        let relay_b = server::start(demo_config(upstream)?)?;
        let relay_a = server::start(demo_config(upstream)?)?;
        let (a, b) = (relay_a.address, relay_b.address);
        actix_web::rt::spawn(relay_b.server);
        let handle = relay_a.server.handle();
        actix_web::rt::spawn(relay_a.server);

        println!("demo upstream API: http://{upstream}");
        println!("relay B (inbound):  http://{b}   UPSTREAM=http://{upstream}");
        println!("relay A (outbound): http://{a}");
        println!();
        first_exchange(a, b).await?;
        println!();
        print_curl(a, b);
        wait_for_stop().await?;
        handle.stop(true).await;
        anyhow::Ok(())
    })
}

/// Waits for Ctrl-C (SIGINT) or SIGTERM.
async fn wait_for_stop() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        result = actix_web::rt::signal::ctrl_c() => result.context("waiting for Ctrl-C"),
        _ = terminate.recv() => Ok(()),
    }
}

fn demo_config(upstream: SocketAddr) -> anyhow::Result<Config> {
    let env: std::collections::HashMap<String, String> = [
        ("UPSTREAM", format!("http://{upstream}")),
        ("CLIENT_ID_SECRET", DEMO_CLIENT_ID_SECRET.to_owned()),
        ("OUTBOUND_TOKEN", DEMO_OUTBOUND_TOKEN.to_owned()),
        ("BIND_ADDRESS", "127.0.0.1".to_owned()),
        ("PORT", "0".to_owned()),
        ("WORKERS", "1".to_owned()),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_owned(), value))
    .collect();
    Ok(Config::from_sources(&Sources { env, file: Default::default() })?)
}

async fn first_exchange(a: SocketAddr, b: SocketAddr) -> anyhow::Result<()> {
    let client = awc::Client::default();
    let body = json!({ "username": "demo", "password": "demo-password" });
    println!("POST http://{a}/api/login  x-mte-upstream: http://{b}  body {body}");
    let mut response = client
        .post(format!("http://{a}/api/login"))
        .insert_header(("x-mte-outbound-token", DEMO_OUTBOUND_TOKEN))
        .insert_header(("x-mte-upstream", format!("http://{b}")))
        .send_json(&body)
        .await
        .map_err(|error| anyhow::anyhow!("sending the demo request: {error}"))?;
    let answer = response.body().await.context("reading the demo answer")?;
    println!("the upstream API received (through the pair, opened by relay B):");
    println!("  {}", serde_json::to_string(&last_received().await?)?);
    println!("relay A returned {}:", response.status());
    println!("  {}", String::from_utf8_lossy(&answer));
    Ok(())
}

async fn last_received() -> anyhow::Result<Value> {
    let received = LAST_RECEIVED.lock().map_err(|_| anyhow::anyhow!("demo state poisoned"))?;
    Ok(received.clone())
}

fn print_curl(a: SocketAddr, b: SocketAddr) {
    let common = format!("-H 'x-mte-outbound-token: {DEMO_OUTBOUND_TOKEN}' -H 'x-mte-upstream: http://{b}'");
    println!("try more (Ctrl-C or SIGTERM stops the demo):");
    println!(
        "  curl -s {common} -H 'content-type: application/json' -d '{{\"name\":\"pen\"}}' http://{a}/api/items"
    );
    println!("  curl -s {common} http://{a}/api/items");
    println!("  curl -s {common} -H 'x-mte-encode-type: MTE' 'http://{a}/api/echo?q=1'");
    println!("  curl -s http://{a}/api/mte-echo/hello");
}

/// What the demo upstream received last, for the demo's printout.
static LAST_RECEIVED: Mutex<Value> = Mutex::new(Value::Null);

/// Items of the demo API, by id.
#[derive(Default)]
struct Items {
    next_id: AtomicU64,
    items: Mutex<BTreeMap<u64, Value>>,
}

/// Starts the demo upstream API.
///
/// # Errors
/// When the address cannot be bound.
pub fn start_upstream(address: SocketAddr) -> anyhow::Result<(actix_web::dev::Server, SocketAddr)> {
    let items = web::Data::new(Items::default());
    let server = HttpServer::new(move || {
        App::new()
            .app_data(items.clone())
            .route("/api/login", web::post().to(login))
            .route("/api/items", web::get().to(list_items))
            .route("/api/items", web::post().to(create_item))
            .route("/api/items/{id}", web::get().to(read_item))
            .route("/api/items/{id}", web::put().to(update_item))
            .route("/api/items/{id}", web::delete().to(delete_item))
            .default_service(web::to(echo))
    })
    .workers(1)
    .bind(address)
    .with_context(|| format!("binding the demo upstream to {address}"))?;
    let bound = server.addrs().first().copied().context("demo upstream has no address")?;
    Ok((server.run(), bound))
}

/// Runs only the demo upstream API on `BIND_ADDRESS` (default 0.0.0.0) and `PORT` (default
/// 3000), for the compose demo and the Postman run.
///
/// # Errors
/// When `BIND_ADDRESS` or `PORT` is invalid or the address cannot be bound.
pub fn run_upstream() -> anyhow::Result<()> {
    let port: u16 = match std::env::var("PORT") {
        Ok(text) => text.parse().with_context(|| format!("PORT: invalid port {text:?}"))?,
        Err(_) => 3000,
    };
    let ip: std::net::IpAddr = match std::env::var("BIND_ADDRESS") {
        Ok(text) => text.parse().with_context(|| format!("BIND_ADDRESS: invalid IP address {text:?}"))?,
        Err(_) => [0, 0, 0, 0].into(),
    };
    actix_web::rt::System::new().block_on(async move {
        let (server, address) = start_upstream((ip, port).into())?;
        println!("demo upstream API listening at http://{address}");
        server.await.context("demo upstream stopped")
    })
}

fn record(request: &HttpRequest, body: &[u8]) {
    let headers: Vec<Value> = request
        .headers()
        .iter()
        .map(|(name, value)| json!([name.as_str(), String::from_utf8_lossy(value.as_bytes())]))
        .collect();
    let received = json!({
        "method": request.method().as_str(),
        "path": request.uri().path_and_query().map_or("/", |pq| pq.as_str()),
        "headers": headers,
        "body": String::from_utf8_lossy(body),
    });
    if let Ok(mut last) = LAST_RECEIVED.lock() {
        *last = received;
    }
}

async fn login(request: HttpRequest, body: web::Bytes) -> HttpResponse {
    record(&request, &body);
    let credentials: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    match (credentials["username"].as_str(), credentials["password"].as_str()) {
        (Some(user), Some(password)) if !user.is_empty() && !password.is_empty() => {
            HttpResponse::Ok().json(json!({ "token": format!("demo-session-{user}"), "user": user }))
        }
        _ => HttpResponse::Unauthorized().json(json!({ "error": "username and password are required" })),
    }
}

async fn list_items(request: HttpRequest, items: web::Data<Items>) -> HttpResponse {
    record(&request, b"");
    let items =
        items.items.lock().map(|items| items.values().cloned().collect::<Vec<_>>()).unwrap_or_default();
    HttpResponse::Ok().json(json!({ "items": items }))
}

async fn create_item(request: HttpRequest, body: web::Bytes, items: web::Data<Items>) -> HttpResponse {
    record(&request, &body);
    let Ok(mut item) = serde_json::from_slice::<Value>(&body) else {
        return HttpResponse::BadRequest().json(json!({ "error": "body must be a JSON object" }));
    };
    let Some(fields) = item.as_object_mut() else {
        return HttpResponse::BadRequest().json(json!({ "error": "body must be a JSON object" }));
    };
    let id = items.next_id.fetch_add(1, Ordering::Relaxed) + 1;
    fields.insert("id".into(), json!(id));
    if let Ok(mut map) = items.items.lock() {
        map.insert(id, item.clone());
    }
    HttpResponse::Created().insert_header(("location", format!("/api/items/{id}"))).json(item)
}

async fn read_item(request: HttpRequest, id: web::Path<u64>, items: web::Data<Items>) -> HttpResponse {
    record(&request, b"");
    let found = items.items.lock().ok().and_then(|map| map.get(&id).cloned());
    match found {
        Some(item) => HttpResponse::Ok().json(item),
        None => HttpResponse::NotFound().json(json!({ "error": format!("item {id} not found") })),
    }
}

async fn update_item(
    request: HttpRequest,
    id: web::Path<u64>,
    body: web::Bytes,
    items: web::Data<Items>,
) -> HttpResponse {
    record(&request, &body);
    let Ok(Value::Object(mut fields)) = serde_json::from_slice::<Value>(&body) else {
        return HttpResponse::BadRequest().json(json!({ "error": "body must be a JSON object" }));
    };
    let id = id.into_inner();
    fields.insert("id".into(), json!(id));
    let mut map = match items.items.lock() {
        Ok(map) => map,
        Err(_) => return HttpResponse::InternalServerError().finish(),
    };
    match map.get_mut(&id) {
        Some(item) => {
            *item = Value::Object(fields);
            HttpResponse::Ok().json(item.clone())
        }
        None => HttpResponse::NotFound().json(json!({ "error": format!("item {id} not found") })),
    }
}

async fn delete_item(request: HttpRequest, id: web::Path<u64>, items: web::Data<Items>) -> HttpResponse {
    record(&request, b"");
    let removed = items.items.lock().ok().and_then(|mut map| map.remove(&id));
    match removed {
        Some(_) => HttpResponse::NoContent().finish(),
        None => HttpResponse::NotFound().json(json!({ "error": format!("item {id} not found") })),
    }
}

/// Returns what it received: method, path and query, headers and body.
async fn echo(request: HttpRequest, body: web::Bytes) -> HttpResponse {
    record(&request, &body);
    HttpResponse::Ok().json(LAST_RECEIVED.lock().map(|last| last.clone()).unwrap_or(Value::Null))
}
