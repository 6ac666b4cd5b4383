//! The Kubernetes manifests drive the real binary. The prod overlay is rendered with
//! `kubectl kustomize`; each role's container command, args and environment are taken from the
//! rendered Deployments and Job (ConfigMaps resolved as the kubelet would) and run as local
//! processes against the local services, with only the cluster's addresses, the Secret's values
//! and the listen ports replaced. The apply is promoted; meanwhile the roles' `/metrics` parse
//! with Prometheus's own text parser and count every task of the plan, `/readyz` answers
//! ready, every log line is JSON joined by run_id, and no line shows the password.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_yaml_ng::Value;
use sqlx::Connection;
use support::fault::{SECRET, SECRET_USER, ensure_secret_users};
use support::{Backend, Roles, Sandbox, Services, free_port, get, wait_for};

/// One container of a rendered workload, as the kubelet would start it.
#[derive(Debug)]
struct Container {
    /// `command` then `args`.
    argv: Vec<String>,
    env: BTreeMap<String, String>,
    /// Keys the container's Secret references would add (their values come from the test).
    from_secret: bool,
}

fn render(overlay: &str) -> Vec<Value> {
    let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kubernetes/overlays").join(overlay);
    let output = Command::new("kubectl").arg("kustomize").arg(&folder).output().expect("kubectl must be installed");
    assert!(output.status.success(), "kubectl kustomize: {}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text).map(|document| Value::deserialize(document).unwrap()).collect()
}

use serde::Deserialize;

fn text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Number(number) => number.to_string(),
        Value::Bool(flag) => flag.to_string(),
        other => panic!("expected a scalar, found {other:?}"),
    }
}

fn object<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|object| object["kind"] == *kind && object["metadata"]["name"] == *name)
        .unwrap_or_else(|| panic!("the render has no {kind} {name}"))
}

/// The first container of a Deployment's or Job's pod, with its environment resolved.
fn container(objects: &[Value], kind: &str, name: &str) -> Container {
    let object = object(objects, kind, name);
    let pod = if kind == "CronJob" {
        &object["spec"]["jobTemplate"]["spec"]["template"]
    } else {
        &object["spec"]["template"]
    };
    let spec = &pod["spec"]["containers"][0];
    let config_maps: BTreeMap<String, &Value> = objects
        .iter()
        .filter(|object| object["kind"] == "ConfigMap")
        .map(|object| (text(&object["metadata"]["name"]), &object["data"]))
        .collect();
    let mut env = BTreeMap::new();
    let mut from_secret = false;
    for source in spec["envFrom"].as_sequence().into_iter().flatten() {
        if let Some(reference) = source.get("configMapRef") {
            let data = config_maps[&text(&reference["name"])];
            for (key, value) in data.as_mapping().into_iter().flatten() {
                env.insert(text(key), text(value));
            }
        }
        from_secret |= source.get("secretRef").is_some();
    }
    for item in spec["env"].as_sequence().into_iter().flatten() {
        env.insert(text(&item["name"]), text(&item["value"]));
    }
    let argv =
        spec["command"].as_sequence().into_iter().chain(spec["args"].as_sequence()).flatten().map(text).collect();
    Container { argv, env, from_secret }
}

/// Prometheus's text format parsed by Prometheus's own Python client: every sample's name,
/// labels and value.
fn parse_metrics(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    let tools =
        std::env::var("SLUICE_TOOLS_VENV").unwrap_or_else(|_| format!("{}/.cache/sluice/k8s-tools", env!("HOME")));
    let script = "import json, sys\nfrom prometheus_client.parser import text_string_to_metric_families\nprint(json.dumps([[s.name, s.labels, s.value] for f in text_string_to_metric_families(sys.stdin.read()) for s in f.samples]))";
    let mut child = Command::new(format!("{tools}/bin/python"))
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the tools' virtual environment (scripts/services.sh installs it)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "/metrics does not parse: {}\n{text}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice::<Vec<(String, BTreeMap<String, String>, f64)>>(&output.stdout).unwrap()
}

fn sum(samples: &[(String, BTreeMap<String, String>, f64)], name: &str) -> f64 {
    samples.iter().filter(|(sample, _, _)| sample == name).map(|(_, _, value)| value).sum()
}

/// The sum of a metric's samples whose label has the value.
fn sum_labelled(samples: &[(String, BTreeMap<String, String>, f64)], name: &str, label: (&str, &str)) -> f64 {
    samples
        .iter()
        .filter(|(sample, labels, _)| sample == name && labels.get(label.0).map(String::as_str) == Some(label.1))
        .map(|(_, _, value)| value)
        .sum()
}

/// Every stderr line of a role parsed as JSON.
fn json_lines(log: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|error| panic!("{}: not JSON ({error}): {line}", log.display()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_prod_overlay_runs_as_rendered_and_promotes() {
    ensure_secret_users();
    let sandbox = Sandbox::new(Backend::Postgres).await;
    let services = Services::new("k8s");
    let objects = render("prod");

    // The project's config.yaml is the rendered ConfigMap's (hosts and passwords from the env).
    let config_map = object(
        &objects,
        "ConfigMap",
        &text(
            &object(&objects, "Deployment", "sluice-worker-local")["spec"]["template"]["spec"]["volumes"][0]["configMap"]
                ["name"],
        ),
    );
    let config = text(&config_map["data"]["config.yaml"]);
    sandbox.write("config.yaml", &config);
    // What the pods mount at /project: config.yaml alone (the models stay with the operator).
    let mounted = sandbox.folder.path().join("mounted");
    std::fs::create_dir_all(&mounted).unwrap();
    std::fs::write(mounted.join("config.yaml"), &config).unwrap();

    // What the cluster would supply differently: the services' addresses, the Secret's values,
    // the project folder and the listen ports (every process here shares one host).
    let warehouse = sandbox.databases()[0].clone();
    let local = |mut container: Container| -> Container {
        assert!(container.from_secret, "{:?} does not read the Secret", container.argv);
        for (key, value) in [
            ("PG_HOST", "127.0.0.1".to_string()),
            ("PG_USER", "postgres".to_string()),
            ("PG_DATABASE", warehouse.clone()),
            ("SLUICE_QUEUE_PREFIX", services.prefix.clone()),
            ("SLUICE_PROJECT", mounted.to_string_lossy().into_owned()),
        ] {
            assert!(container.env.contains_key(key), "{:?} has no {key}", container.argv);
            container.env.insert(key.to_string(), value);
        }
        if container.env.contains_key("SLUICE_LISTEN") {
            container.env.insert("SLUICE_LISTEN".to_string(), format!("127.0.0.1:{}", free_port()));
        }
        // The Secret `sluice`'s keys.
        // (The local PostgreSQL trusts 127.0.0.1 and ignores it; it must still render into
        // config.yaml, quotes and backslash included, and never be shown.)
        container.env.insert("PG_PASSWORD".to_string(), format!("{SECRET}\"'\\x"));
        container.env.insert("SLUICE_STATE_URL".to_string(), sandbox.state_url());
        container
            .env
            .insert("SLUICE_AMQP_URL".to_string(), format!("amqp://{SECRET_USER}:{SECRET}@127.0.0.1:5672/%2f"));
        container.env.insert("SLUICE_REDIS_URL".to_string(), format!("redis://{SECRET_USER}:{SECRET}@127.0.0.1:6379"));
        container
    };
    let start = |container: &Container, log: &Path| -> std::process::Child {
        assert_eq!(container.argv[0], "sluice", "the image's binary");
        let stdout = std::fs::File::create(log.with_extension("stdout")).unwrap();
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(&container.argv[1..])
            .env_clear()
            .envs(&container.env)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap()
    };
    let folder = sandbox.folder.path().to_path_buf();
    let port =
        |container: &Container| container.env["SLUICE_LISTEN"].rsplit(':').next().unwrap().parse::<u16>().unwrap();

    // The promoter Deployment, at its replica count (two: shown safe here), and two workers.
    let promoter = local(container(&objects, "Deployment", "sluice-promoter"));
    let replicas = object(&objects, "Deployment", "sluice-promoter")["spec"]["replicas"].as_u64().unwrap();
    assert_eq!(replicas, 2);
    let mut roles = Roles::default();
    let mut ports = Vec::new();
    for index in 0..replicas {
        let promoter = local(Container { argv: promoter.argv.clone(), env: promoter.env.clone(), from_secret: true });
        let log = folder.join(format!("promoter-{index}.log"));
        roles.adopt(&format!("promoter {index}"), start(&promoter, &log), log);
        ports.push(port(&promoter));
    }
    let worker_template = container(&objects, "Deployment", "sluice-worker-local");
    assert_eq!(worker_template.argv, ["sluice", "worker"]);
    assert_eq!(worker_template.env["SLUICE_LOG_FORMAT"], "json");
    for index in 0..2 {
        let worker = local(Container {
            argv: worker_template.argv.clone(),
            env: worker_template.env.clone(),
            from_secret: true,
        });
        let log = folder.join(format!("worker-{index}.log"));
        roles.adopt(&format!("worker {index}"), start(&worker, &log), log);
        ports.push(port(&worker));
    }
    // Ready once RabbitMQ, Redis, the state store (and a worker's warehouse) answer.
    for port in &ports {
        wait_for("/readyz to answer 200", Duration::from_secs(60), || {
            get(*port, "/readyz").is_some_and(|(status, body)| status == 200 && body == "ready\n")
        });
        assert_eq!(get(*port, "/healthz").unwrap().0, 200);
    }

    // The operator plans (outside the cluster, with the models), then the apply Job runs.
    let job = container(&objects, "Job", "sluice-apply");
    let mut planning = local(Container {
        argv: vec!["sluice".into(), "plan".into(), "--now".into(), "2024-01-15".into()],
        env: job.env.clone(),
        from_secret: true,
    });
    planning.env.remove("SLUICE_PLAN_ID");
    planning.env.insert("SLUICE_PROJECT".to_string(), sandbox.project.to_string_lossy().into_owned());
    let planned = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(&planning.argv[1..])
        .env_clear()
        .envs(&planning.env)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let plan_text = String::from_utf8_lossy(&planned.stdout).into_owned();
    assert!(planned.status.success(), "{plan_text}{}", String::from_utf8_lossy(&planned.stderr));
    let plan_id = plan_text
        .lines()
        .find_map(|line| line.strip_prefix("Stored as plan "))
        .and_then(|rest| rest.split(';').next())
        .unwrap()
        .to_string();
    assert!(job.env.contains_key("SLUICE_PLAN_ID"), "the Job reads the plan id from its ConfigMap");
    let mut apply = local(job);
    assert_eq!(apply.argv, ["sluice", "apply"]);
    apply.env.insert("SLUICE_PLAN_ID".to_string(), plan_id.clone());
    let apply_log = folder.join("apply.log");
    let applied = start(&apply, &apply_log).wait_with_output().unwrap();
    assert!(applied.status.success(), "{}", std::fs::read_to_string(&apply_log).unwrap());

    // The Job followed the run to its promotion.
    let mut status = String::new();
    let mut status_env = planning.env.clone();
    status_env.insert("SLUICE_LOG_FORMAT".to_string(), "text".to_string());
    wait_for("the run to be promoted", Duration::from_secs(300), || {
        let output = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["status", &plan_id])
            .env_clear()
            .envs(&status_env)
            .output()
            .unwrap();
        status = String::from_utf8_lossy(&output.stdout).into_owned();
        status.contains("succeeded")
    });
    // The promoted views answer (config.yaml here is the rendered Jinja one: read directly).
    let mut warehouse_connection = sqlx::PgConnection::connect(&sandbox.warehouse_url()).await.unwrap();
    let orders: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM sushi.orders").fetch_one(&mut warehouse_connection).await.unwrap();
    assert!(orders > 0, "{status}");

    // The apply's log: JSON, and from the run's start every line carries its ids.
    let lines = json_lines(&apply_log);
    let started = lines.iter().position(|line| line["message"] == "run started").expect("a run started line");
    let run_id = lines[started]["run_id"].as_str().unwrap().to_string();
    for line in &lines[started..] {
        assert_eq!(line["run_id"], run_id.as_str(), "{line}");
        assert_eq!(line["role"], "coordinator", "{line}");
        assert_eq!(line["trace_id"].as_str().unwrap().len(), 32, "{line}");
    }
    let tasks = lines.iter().find(|line| line["message"] == "tasks published").unwrap()["tasks"].as_f64().unwrap();

    // The metrics: every task of the plan succeeded (or was found done) in one worker or the
    // other; the run counted promoted; the outstanding backlog back to zero.
    let mut worker_samples = Vec::new();
    for port in &ports[2..] {
        worker_samples.extend(parse_metrics(&get(*port, "/metrics").unwrap().1));
    }
    let settled =
        sum(&worker_samples, "sluice_tasks_succeeded_total") + sum(&worker_samples, "sluice_tasks_skipped_total");
    assert_eq!(settled, tasks, "tasks settled by the workers");
    assert_eq!(
        sum(&worker_samples, "sluice_tasks_started_total"),
        sum(&worker_samples, "sluice_tasks_succeeded_total")
    );
    assert!(sum(&worker_samples, "sluice_task_duration_seconds_count") >= 1.0);
    assert!(sum(&worker_samples, "sluice_warehouse_statement_duration_seconds_count") >= tasks);
    assert_eq!(sum(&worker_samples, "sluice_tasks_failed_total"), 0.0);
    let completions = sum_labelled(&worker_samples, "sluice_gate_operations_total", ("operation", "complete"));
    assert_eq!(completions, tasks, "one gate completion per task");
    let mut promoter_samples = Vec::new();
    for port in &ports[..2] {
        promoter_samples.extend(parse_metrics(&get(*port, "/metrics").unwrap().1));
    }
    let promoted = sum_labelled(&promoter_samples, "sluice_runs_total", ("outcome", "promoted"));
    assert!(promoted >= 1.0, "{promoter_samples:?}");
    assert_eq!(sum(&promoter_samples, "sluice_ready"), 2.0, "both promoters ready");
    // A JSON-logging role writes its results as log lines too: nothing on stdout.
    assert_eq!(std::fs::read_to_string(apply_log.with_extension("stdout")).unwrap(), "");

    // The janitor CronJob's command, as rendered, with config.yaml alone.
    let janitor = local(container(&objects, "CronJob", "sluice-janitor"));
    assert_eq!(janitor.argv, ["sluice", "janitor"]);
    let janitor_log = folder.join("janitor.log");
    let cleaned = start(&janitor, &janitor_log).wait_with_output().unwrap();
    assert!(cleaned.status.success(), "{}", std::fs::read_to_string(&janitor_log).unwrap());

    roles.stop();
    // Every line every process wrote is JSON; a worker's task lines carry the task's ids; no
    // byte anywhere shows the password.
    for entry in std::fs::read_dir(&folder).unwrap() {
        let path = entry.unwrap().path();
        let written = std::fs::read(&path).unwrap_or_default();
        assert!(!String::from_utf8_lossy(&written).contains(SECRET), "{} shows the password", path.display());
        if path.extension().is_some_and(|extension| extension == "log") {
            let lines = json_lines(&path);
            if path.file_name().unwrap().to_string_lossy().starts_with("worker") {
                for line in lines.iter().filter(|line| line.get("task").is_some()) {
                    assert!(
                        line["run_id"].is_string() && line["trace_id"].is_string() && line["gateway"] == "local",
                        "{line}"
                    );
                }
            }
        }
    }
}
