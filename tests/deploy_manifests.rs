//! Checks the deployment files against the relay itself: every environment variable they set is
//! one the relay reads, every port is the relay's, every file they mount exists, and every
//! health-check path answers 200 on a running relay.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::{Upstream, relay_builder};
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(path))
        .unwrap_or_else(|error| panic!("reading {path}: {error}"))
}

fn yaml_documents(path: &str) -> Vec<Yaml> {
    let text = read(path);
    serde_yaml::Deserializer::from_str(&text)
        .map(|document| Yaml::deserialize(document).unwrap_or_else(|error| panic!("parsing {path}: {error}")))
        .collect()
}

use serde::Deserialize;

/// Environment variable names the relay reads: every `"NAME"` literal passed as a setting in
/// src/config.rs, plus those of the demo upstream.
fn relay_variables() -> BTreeSet<String> {
    let source = read("src/config.rs");
    let mut names: BTreeSet<String> = source
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|text| text.len() > 2 && text.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .map(str::to_owned)
        .collect();
    names.extend(["PORT", "BIND_ADDRESS"].map(str::to_owned));
    names
}

fn assert_known(variables: &BTreeSet<String>, file: &str) {
    let known = relay_variables();
    for name in variables {
        assert!(known.contains(name), "{file} sets {name}, which the relay does not read; known: {known:?}");
    }
}

fn compose() -> Yaml {
    yaml_documents("docker-compose.yml").remove(0)
}

fn compose_relay_services(compose: &Yaml) -> Vec<(String, Yaml)> {
    let services = compose["services"].as_mapping().expect("services mapping");
    services
        .iter()
        .map(|(name, service)| (name.as_str().unwrap_or_default().to_owned(), service.clone()))
        .filter(|(name, _)| name.starts_with("relay-") || name == "upstream")
        .collect()
}

#[test]
fn compose_sets_only_variables_the_relay_reads() {
    let compose = compose();
    let relays = compose_relay_services(&compose);
    assert!(relays.len() >= 3, "expected relay-a, relay-b and upstream services");
    for (name, service) in relays {
        let environment =
            service["environment"].as_mapping().unwrap_or_else(|| panic!("{name} has no environment"));
        let variables = environment.keys().filter_map(|key| key.as_str().map(str::to_owned)).collect();
        assert_known(&variables, &format!("docker-compose.yml service {name}"));
    }
}

#[test]
fn compose_ports_and_mounts_match_the_project() {
    let compose = compose();
    for (name, service) in compose_relay_services(&compose) {
        if name == "upstream" {
            assert_eq!(service["environment"]["PORT"].as_str(), Some("3000"));
            continue;
        }
        assert_eq!(service["environment"]["PORT"].as_str(), Some("8080"), "{name} PORT");
        let ports = service["ports"].as_sequence().unwrap_or_else(|| panic!("{name} has no ports"));
        for port in ports {
            let mapping = port.as_str().unwrap_or_default();
            assert!(mapping.ends_with(":8080"), "{name} maps {mapping}, not the relay's port 8080");
        }
    }
    let services = compose["services"].as_mapping().expect("services mapping");
    for (name, service) in services {
        for volume in service["volumes"].as_sequence().into_iter().flatten() {
            let source = volume.as_str().unwrap_or_default().split(':').next().unwrap_or_default();
            assert!(Path::new(ROOT).join(source).exists(), "{name:?} mounts {source}, which does not exist");
        }
    }
}

#[test]
fn env_example_lists_only_used_variables() {
    let compose_text = read("docker-compose.yml");
    let known = relay_variables();
    let example = read(".env.example");
    let names: Vec<&str> = example
        .lines()
        .filter(|line| !line.trim_start().starts_with('#') && line.contains('='))
        .filter_map(|line| line.split('=').next())
        .collect();
    assert!(!names.is_empty(), ".env.example sets nothing");
    for name in names {
        let used = known.contains(name) || compose_text.contains(&format!("${{{name}"));
        assert!(used, ".env.example sets {name}, which neither the relay nor docker-compose.yml reads");
    }
}

fn ecs_container() -> Json {
    let task: Json =
        serde_json::from_str(&read("deploy/ecs/task-definition.json")).expect("task definition JSON");
    task["containerDefinitions"][0].clone()
}

#[test]
fn ecs_task_definition_matches_the_relay() {
    let task: Json =
        serde_json::from_str(&read("deploy/ecs/task-definition.json")).expect("task definition JSON");
    assert_eq!(task["cpu"], "1024");
    assert_eq!(task["memory"], "2048");
    let container = ecs_container();
    let mut variables = BTreeSet::new();
    for list in ["environment", "secrets"] {
        for entry in container[list].as_array().expect("environment and secrets lists") {
            variables.insert(entry["name"].as_str().expect("name").to_owned());
        }
    }
    assert_known(&variables, "deploy/ecs/task-definition.json");
    for secret in ["CLIENT_ID_SECRET", "OUTBOUND_TOKEN", "PAIRING_PSK"] {
        let from_secrets =
            container["secrets"].as_array().unwrap().iter().any(|entry| entry["name"] == secret);
        assert!(from_secrets, "{secret} must come from Secrets Manager");
    }
    assert_eq!(container["portMappings"][0]["containerPort"], 8080);
    assert_eq!(container["logConfiguration"]["logDriver"], "awslogs");
    let grace = container["environment"]
        .as_array()
        .unwrap()
        .iter()
        .find(|entry| entry["name"] == "SHUTDOWN_GRACE_SECS")
        .and_then(|entry| entry["value"].as_str()?.parse::<u64>().ok())
        .expect("SHUTDOWN_GRACE_SECS set");
    let stop_timeout = container["stopTimeout"].as_u64().expect("stopTimeout");
    assert!(grace < stop_timeout, "drain period {grace} s must end before stopTimeout {stop_timeout} s");
}

fn k8s_documents() -> Vec<Yaml> {
    let mut documents = yaml_documents("deploy/k8s/deployment.yaml");
    documents.extend(yaml_documents("deploy/k8s/service.yaml"));
    documents
}

#[test]
fn kubernetes_manifests_match_the_relay() {
    let documents = k8s_documents();
    let deployment = documents.iter().find(|doc| doc["kind"] == "Deployment").expect("a Deployment");
    let service = documents.iter().find(|doc| doc["kind"] == "Service").expect("a Service");
    assert_eq!(deployment["spec"]["replicas"].as_u64(), Some(2));
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let variables = container["env"]
        .as_sequence()
        .expect("env list")
        .iter()
        .map(|entry| entry["name"].as_str().expect("name").to_owned())
        .collect();
    assert_known(&variables, "deploy/k8s/deployment.yaml");
    assert_eq!(container["ports"][0]["containerPort"].as_u64(), Some(8080));
    assert_eq!(service["spec"]["type"].as_str(), Some("LoadBalancer"));
    assert_eq!(service["spec"]["ports"][0]["port"].as_u64(), Some(80));
    assert_eq!(service["spec"]["ports"][0]["targetPort"].as_u64(), Some(8080));
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    let grace = container["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|entry| entry["name"] == "SHUTDOWN_GRACE_SECS")
        .and_then(|entry| entry["value"].as_str()?.parse::<u64>().ok())
        .expect("SHUTDOWN_GRACE_SECS set");
    let termination = pod["terminationGracePeriodSeconds"].as_u64().expect("terminationGracePeriodSeconds");
    assert!(
        termination > grace,
        "terminationGracePeriodSeconds {termination} must exceed the drain period {grace}"
    );
}

/// Every health-check path of the deployment files, as the relay sees it.
fn health_paths() -> Vec<String> {
    let mut paths = Vec::new();
    let dockerfile = read("Dockerfile");
    let ecs = ecs_container()["healthCheck"]["command"][1].as_str().expect("ECS health command").to_owned();
    for text in [dockerfile.as_str(), ecs.as_str()] {
        for part in text.split("127.0.0.1:").skip(1) {
            let path: String = part
                .chars()
                .skip_while(|c| *c != '/')
                .take_while(|c| !c.is_whitespace() && *c != '"')
                .collect();
            paths.push(path);
        }
    }
    let documents = k8s_documents();
    let deployment = documents.iter().find(|doc| doc["kind"] == "Deployment").expect("a Deployment");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    for probe in ["readinessProbe", "livenessProbe"] {
        paths.push(container[probe]["httpGet"]["path"].as_str().expect("probe path").to_owned());
    }
    paths
}

#[test]
fn health_check_paths_answer_on_a_running_relay() {
    let upstream = Upstream::start();
    let relay = relay_builder(&upstream.url()).spawn();
    let paths = health_paths();
    assert!(paths.len() >= 4, "expected Dockerfile, ECS and two Kubernetes probes, found {paths:?}");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    for path in paths {
        let status = runtime.block_on(async {
            reqwest::get(format!("{}{path}", relay.url())).await.map(|response| response.status().as_u16())
        });
        assert_eq!(status.ok(), Some(200), "health-check path {path} did not answer 200");
    }
}

#[test]
fn dockerfile_runs_unprivileged_on_8080() {
    let dockerfile = read("Dockerfile");
    assert!(dockerfile.contains("EXPOSE 8080"), "Dockerfile must expose 8080");
    assert!(dockerfile.contains("USER 10001"), "Dockerfile must switch to the unprivileged user");
    assert!(dockerfile.contains("deploy/build-pgo.sh"), "Dockerfile must build with deploy/build-pgo.sh");
    let builds: Vec<String> = read("deploy/build-pgo.sh")
        .lines()
        .map(str::trim_start)
        .filter(|line| line.starts_with("cargo build"))
        .map(str::to_owned)
        .collect();
    assert_eq!(builds.len(), 2, "expected the instrumented and the optimised build, found {builds:?}");
    for build in builds {
        assert!(build.contains("--locked"), "release build must use the committed Cargo.lock: {build}");
    }
    for copied in dockerfile.lines().filter(|line| line.starts_with("COPY ") && !line.contains("--from")) {
        for source in copied
            .split_whitespace()
            .skip(1)
            .collect::<Vec<_>>()
            .split_last()
            .map(|(_, s)| s.to_vec())
            .unwrap_or_default()
        {
            assert!(
                Path::new(ROOT).join(source).exists(),
                "Dockerfile copies {source}, which does not exist"
            );
        }
    }
    let ignore = read(".dockerignore");
    assert!(
        ignore.lines().any(|line| line.trim_end_matches('/') == "target"),
        ".dockerignore must exclude target/"
    );
}
