//! `spillway serve` as a real process against the real servers: ingest formats and their exact
//! answers, limits, auth, queries, the live feed, metrics, readiness and graceful shutdown.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use spillway::SchemaVariant;

use crate::helpers::*;

/// A running `spillway serve`, killed on drop.
pub(crate) struct Server {
    child: Child,
    base: String,
    logs: Arc<std::sync::Mutex<String>>,
    http: reqwest::Client,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts `spillway serve` on port 0 against this test's prefix and database.
    async fn start(env: &TestEnv, args: &[&str]) -> Server {
        env.create_table(SchemaVariant::Legacy, "events").await;
        Server::start_with(env, &env.redis_url, args)
    }

    fn start_with(env: &TestEnv, redis_url: &str, args: &[&str]) -> Server {
        let mut command = Command::new(env!("CARGO_BIN_EXE_spillway"));
        command
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--flush-interval-ms", "100"])
            .args(args)
            .env("REDIS_URL", redis_url)
            .env("SPILLWAY_KEY_PREFIX", &env.prefix)
            .env("CLICKHOUSE_URL", &env.clickhouse_url)
            .env("CLICKHOUSE_DATABASE", &env.database)
            // Its own data directory: the outage journal lives there.
            .env(
                "SPILLWAY_DATA_DIR",
                std::env::temp_dir().join(format!("spillway-{}", env.prefix.replace(':', "-"))),
            );
        Server::spawn(command)
    }

    /// Starts `spillway <command>` (`serve` or `flush`) on the Redis Cluster `nodes`, against
    /// this test's prefix and database, with its own data directory `dir`.
    pub(crate) fn start_on_cluster(
        env: &TestEnv,
        nodes: &[String],
        dir: &std::path::Path,
        command: &str,
        args: &[&str],
    ) -> Server {
        let mut process = Command::new(env!("CARGO_BIN_EXE_spillway"));
        process
            .arg(command)
            .args(args)
            .env_remove("REDIS_URL")
            .env("REDIS_CLUSTER_NODES", nodes.join(","))
            .env("SPILLWAY_KEY_PREFIX", &env.prefix)
            .env("CLICKHOUSE_URL", &env.clickhouse_url)
            .env("CLICKHOUSE_DATABASE", &env.database)
            .env("SPILLWAY_DATA_DIR", dir);
        if command == "serve" {
            process.args(["--listen", "127.0.0.1:0", "--flush-interval-ms", "100"]);
            Server::spawn(process)
        } else {
            Server::spawn_quiet(process)
        }
    }

    /// Starts `spillway serve` on its embedded default in `dir`, with no servers at all.
    pub(crate) fn start_embedded(dir: &std::path::Path, args: &[&str]) -> Server {
        let mut command = Command::new(env!("CARGO_BIN_EXE_spillway"));
        command
            .arg("serve")
            .args([
                "--listen",
                "127.0.0.1:0",
                "--flush-interval-ms",
                "100",
                "--data-dir",
            ])
            .arg(dir)
            .args(args)
            .env_remove("REDIS_URL")
            .env_remove("CLICKHOUSE_URL");
        Server::spawn(command)
    }

    /// Spawns the command, waits for its "listening" line, and collects its logs.
    fn spawn(command: Command) -> Server {
        let (mut server, stdout) = Server::spawn_logging(command);
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("first line");
        server.base = line
            .trim()
            .strip_prefix("spillway listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        server
    }

    /// Spawns a command that serves no HTTP (a `spillway flush` worker).
    fn spawn_quiet(command: Command) -> Server {
        let (server, stdout) = Server::spawn_logging(command);
        let sink = server.logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().expect("logs").push_str(&format!("{line}\n"));
            }
        });
        server
    }

    /// Spawns the command and collects its logs; returns its stdout.
    fn spawn_logging(mut command: Command) -> (Server, std::process::ChildStdout) {
        let mut child = command
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spillway starts");
        let stdout = child.stdout.take().expect("stdout");
        // Drain the logs so a chatty server never blocks on a full pipe.
        let logs = Arc::new(std::sync::Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("DEBUG_SERVE").is_some() {
                    eprintln!("{line}");
                }
                let mut logs = sink.lock().expect("logs");
                logs.push_str(&line);
                logs.push('\n');
            }
        });
        let server = Server {
            child,
            base: String::new(),
            logs,
            http: reqwest::Client::new(),
        };
        (server, stdout)
    }

    /// What the server logged so far.
    pub(crate) fn logs(&self) -> String {
        self.logs.lock().expect("logs").clone()
    }

    /// Kills the process with SIGKILL: no shutdown sequence at all.
    pub(crate) fn kill(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("killed");
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub(crate) async fn post(
        &self,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> (u16, Value) {
        let response = self
            .http
            .post(self.url("/v1/events"))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("answer");
        let status = response.status().as_u16();
        (status, response.json().await.expect("JSON answer"))
    }

    pub(crate) async fn get(&self, path: &str) -> (u16, String) {
        let response = self.http.get(self.url(path)).send().await.expect("answer");
        let status = response.status().as_u16();
        (status, response.text().await.expect("text"))
    }

    /// Sends SIGTERM and waits for the exit status.
    pub(crate) fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let killed = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill runs");
        assert!(killed.success());
        self.child.wait().expect("exits")
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).expect("write");
    encoder.finish().expect("gzip")
}

#[tokio::test]
async fn every_ingest_format_gets_its_exact_answer() {
    let env = TestEnv::new().await;
    let server = Server::start(&env, &[]).await;
    let one = click("a", "p1", 0);

    assert_eq!(
        server.post("application/json", one.clone()).await,
        (202, json!({"accepted": 1, "rejected": []}))
    );

    let mixed = format!(
        r#"[{}, {{"name": "x"}}, {}]"#,
        click("b", "p1", 1),
        click("c", "p1", 2)
    );
    assert_eq!(
        server.post("application/json", mixed).await,
        (
            202,
            json!({"accepted": 2, "rejected": [{"index": 1, "error": "item 1: field `project_id`: must be a non-empty string"}]})
        )
    );

    let ndjson = format!(
        "{}\nnot json\n{}\n",
        click("d", "p1", 3),
        click("e", "p1", 4)
    );
    let (status, answer) = server.post("application/x-ndjson", ndjson.clone()).await;
    assert_eq!((status, &answer["accepted"]), (202, &json!(2)));
    assert_eq!(answer["rejected"][0]["index"], 1);
    assert!(answer["rejected"][0]["error"]
        .as_str()
        .expect("text")
        .starts_with("line 2: invalid JSON"));

    let compressed = gzip(format!("{}\n", click("f", "p1", 5)).as_bytes());
    let response = server
        .http
        .post(server.url("/v1/events"))
        .header("content-type", "application/x-ndjson")
        .header("content-encoding", "gzip")
        .body(compressed)
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status().as_u16(), 202);

    let (status, answer) = server.post("application/json", "[{\"name\": ").await;
    assert_eq!(status, 400);
    assert!(
        answer["error"]
            .as_str()
            .expect("text")
            .starts_with("malformed JSON: EOF while parsing"),
        "{answer}"
    );
    assert!(
        answer["error"]
            .as_str()
            .expect("text")
            .contains("line 1 column"),
        "{answer}"
    );
    assert_eq!(
        server.post("application/json", "").await,
        (400, json!({"error": "empty body"}))
    );
    assert_eq!(
        server
            .post("application/json", r#"{"project_id": "p1"}"#)
            .await,
        (
            400,
            json!({"error": "no valid event: item 0: field `name`: must be a non-empty string"})
        )
    );
    let (status, _) = server.post("text/csv", "a,b").await;
    assert_eq!(status, 415);

    // All six accepted events are durably queued (or already flushed).
    let flusher = spillway::Flusher::new(
        env.queue.clone(),
        env.sink("events").await,
        flush_settings(4000, 1000),
    );
    flusher.drain().await.expect("drain");
    let count = env
        .sql(&format!("SELECT count() FROM {}.events", env.database))
        .await;
    assert_eq!(count.trim(), "6");
}

#[tokio::test]
async fn limits_answer_413() {
    let env = TestEnv::new().await;
    let server = Server::start(
        &env,
        &["--max-body-bytes", "2000", "--max-events-per-request", "2"],
    )
    .await;
    let three = format!(
        "[{},{},{}]",
        click("a", "p1", 0),
        click("b", "p1", 0),
        click("c", "p1", 0)
    );
    let (status, answer) = server.post("application/json", three).await;
    assert_eq!(
        (status, answer),
        (413, json!({"error": "more than 2 events in one request"}))
    );

    let big = format!("[{}]", " ".repeat(3000));
    let response = server
        .http
        .post(server.url("/v1/events"))
        .body(big)
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status().as_u16(), 413);

    let bomb = gzip(format!("{}{}", click("a", "p1", 0), " ".repeat(10_000)).as_bytes());
    let response = server
        .http
        .post(server.url("/v1/events"))
        .header("content-encoding", "gzip")
        .body(bomb)
        .send()
        .await
        .expect("answer");
    assert_eq!(
        response.status().as_u16(),
        413,
        "limit applies after decompression"
    );
}

#[tokio::test]
async fn write_keys_guard_their_projects_and_never_leak() {
    let env = TestEnv::new().await;
    let mut server = Server::start(&env, &["--write-key", "p1=s3cret-key"]).await;
    let event = click("a", "p1", 0);
    assert_eq!(
        server.post("application/json", event.clone()).await,
        (
            401,
            json!({"error": "missing or wrong write key for project p1"})
        )
    );
    let send = |key: &'static str| {
        server
            .http
            .post(server.url("/v1/events"))
            .header("authorization", format!("Bearer {key}"))
            .body(event.clone())
            .send()
    };
    assert_eq!(send("wrong").await.expect("answer").status().as_u16(), 401);
    assert_eq!(
        send("s3cret-key").await.expect("answer").status().as_u16(),
        202
    );
    let other = click("b", "p2", 0);
    let response = server
        .http
        .post(server.url("/v1/events"))
        .header("x-spillway-key", "s3cret-key")
        .body(other)
        .send()
        .await
        .expect("answer");
    assert_eq!(
        response.status().as_u16(),
        401,
        "a project without a key is refused"
    );

    let (_, metrics) = server.get("/metrics").await;
    assert!(!metrics.contains("s3cret"));
    server.terminate();
    let mut logs = server.logs();
    for _ in 0..50 {
        if logs.contains("shutdown complete") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        logs = server.logs();
    }
    assert!(logs.contains("shutdown complete"), "{logs}");
    assert!(!logs.contains("s3cret"), "{logs}");
}

#[tokio::test]
async fn query_endpoints_read_what_the_buffer_holds() {
    let env = TestEnv::new().await;
    let server = Server::start(&env, &[]).await;
    let view = screen_view("v1", "s1", "u1", 0);
    assert_eq!(server.post("application/json", view.clone()).await.0, 202);

    assert_eq!(
        server.get("/v1/sessions/s1/last-screen-view").await,
        (200, view.clone())
    );
    assert_eq!(
        server
            .get("/v1/projects/p1/profiles/u1/last-screen-view")
            .await,
        (200, view)
    );
    let (status, body) = server.get("/v1/sessions/nope/last-screen-view").await;
    assert_eq!(
        (status, body.as_str()),
        (404, r#"{"error":"no screen view held for session nope"}"#)
    );
    assert_eq!(
        server.get("/v1/projects/p1/live-visitors").await,
        (200, r#"{"count":1}"#.to_owned())
    );
    let (status, body) = server.get("/v1/buffer").await;
    assert_eq!(status, 200);
    let stats: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(stats["dead_letter"], 0);
    assert_eq!(stats["held_screen_views"], 1);
    assert_eq!(stats["queued"], 0);
    assert_eq!(stats["oldest_queued_age_ms"], Value::Null, "nothing queued");
    assert_eq!(server.get("/healthz").await, (200, "ok\n".to_owned()));
}

#[tokio::test]
async fn the_live_feed_streams_batch_notifications_of_its_project() {
    let env = TestEnv::new().await;
    let server = Server::start(&env, &[]).await;
    let response = server
        .http
        .get(server.url("/v1/projects/p1/batches"))
        .send()
        .await
        .expect("feed");
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut stream = response.bytes_stream();
    let events = format!(
        "[{},{},{}]",
        click("a", "p1", 0),
        click("b", "p2", 1),
        click("c", "p1", 2)
    );
    assert_eq!(server.post("application/json", events).await.0, 202);

    let mut seen = String::new();
    while !seen.contains("\n\n") || !seen.contains("event: batch") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("a notification within 10 s")
            .expect("stream open")
            .expect("bytes");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(seen.contains("event: batch"), "{seen}");
    let data = seen
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .expect("data line");
    let payload: Value = serde_json::from_str(data).expect("json");
    assert_eq!(payload, json!({"projectId": "p1", "count": 2}));
}

#[tokio::test]
async fn metrics_are_present_and_move() {
    let env = TestEnv::new().await;
    let server = Server::start(&env, &[]).await;
    let events = format!(
        "[{},{},{{\"name\":\"\"}}]",
        click("a", "p1", 0),
        click("b", "p1", 1)
    );
    assert_eq!(server.post("application/json", events).await.0, 202);
    let mut text = String::new();
    for _ in 0..100 {
        text = server.get("/metrics").await.1;
        if text.contains("spillway_flush_rows_total 2") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for expected in [
        "spillway_ingest_events_received_total 3",
        "spillway_ingest_events_accepted_total 2",
        "spillway_ingest_events_rejected_total{reason=\"bad_name\"} 1",
        "spillway_ingest_requests_total{status=\"202\"} 1",
        "spillway_batch_micro_batch_events_count",
        "spillway_queue_write_duration_seconds_bucket",
        "spillway_flush_batches_total",
        "spillway_flush_rows_total 2",
        "spillway_flush_duration_seconds_bucket",
        "spillway_sink_request_duration_seconds_bucket",
        "spillway_queue_depth_events",
        "spillway_dead_letter_depth_events",
    ] {
        assert!(text.contains(expected), "missing {expected}:\n{text}");
    }
}

#[tokio::test]
async fn readiness_turns_false_when_redis_stops() {
    let env = TestEnv::new().await;
    env.create_table(SchemaVariant::Legacy, "events").await;
    let mut redis = OwnRedis::start().await;
    let server = Server::start_with(&env, &redis.url(), &[]);
    let (status, body) = server.get("/readyz").await;
    assert_eq!(status, 200, "{body}");

    redis.stop();
    let (status, body) = server.get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    let answer: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(answer["ready"], false);
    assert_ne!(answer["queue"], "ok");
    assert_eq!(answer["sink"], "ok");
}

/// A Redis server of the test's own, on a free port, to stop and start.
struct OwnRedis {
    port: u16,
    dir: std::path::PathBuf,
    process: Option<Child>,
}

impl OwnRedis {
    async fn start() -> OwnRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("port")
            .local_addr()
            .expect("addr")
            .port();
        let dir = std::env::temp_dir().join(format!("spillway-redis-{port}"));
        std::fs::create_dir_all(&dir).expect("dir");
        let mut redis = OwnRedis {
            port,
            dir,
            process: None,
        };
        redis.restart().await;
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn restart(&mut self) {
        let process = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--dir",
            ])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.process = Some(process);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("redis-server did not start on {}", self.port);
    }

    fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill().expect("stop redis");
            process.wait().expect("stopped");
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn with_redis_down_memory_is_bounded_and_ingest_answers_503() {
    let env = TestEnv::new().await;
    env.create_table(SchemaVariant::Legacy, "events").await;
    let mut redis = OwnRedis::start().await;
    let server = Server::start_with(
        &env,
        &redis.url(),
        &[
            "--max-pending-events",
            "10",
            "--request-timeout-ms",
            "300",
            "--no-flush",
            "--no-journal",
        ],
    );
    redis.stop();

    let eight: Vec<String> = (0..8).map(|i| click(&format!("a{i}"), "p1", i)).collect();
    let (status, answer) = server
        .post("application/json", format!("[{}]", eight.join(",")))
        .await;
    assert_eq!(status, 503, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .expect("text")
            .contains("not yet durable"),
        "{answer}"
    );

    let five: Vec<String> = (0..5).map(|i| click(&format!("b{i}"), "p1", i)).collect();
    let response = server
        .http
        .post(server.url("/v1/events"))
        .body(format!("[{}]", five.join(",")))
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let answer: Value = response.json().await.expect("json");
    assert!(
        answer["error"]
            .as_str()
            .expect("text")
            .starts_with("buffer full"),
        "{answer}"
    );

    // Redis returns: the eight events held in memory are written after all.
    redis.restart().await;
    let mut queued = 0;
    for _ in 0..100 {
        let (_, body) = server.get("/v1/buffer").await;
        queued =
            serde_json::from_str::<Value>(&body).map_or(0, |v| v["queued"].as_u64().unwrap_or(0));
        if queued == 8 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(queued, 8);
}

#[tokio::test]
async fn sigterm_under_load_loses_no_acknowledged_event() {
    let env = TestEnv::new().await;
    let mut server = Server::start(&env, &[]).await;
    let stream = EventStream::start(&server, 4, 20);
    stream.wait_for(2000).await;
    let status = server.terminate();
    assert!(status.success(), "exit status {status}");
    let acknowledged = stream.finish().await;
    // What the service had not flushed yet is still queued: drain it, then compare.
    let flusher = spillway::Flusher::new(
        env.queue.clone(),
        env.sink("events").await,
        flush_settings(4000, 1000),
    );
    flusher.drain().await.expect("drain");
    let landed = env
        .sql(&format!("SELECT toString(id) FROM {}.events", env.database))
        .await;
    assert_landed_once(&acknowledged, landed.lines());
}

#[tokio::test]
async fn the_openapi_document_lists_exactly_the_routes() {
    let env = TestEnv::new().await;
    let server = Server::start(&env, &[]).await;
    let (status, body) = server.get("/openapi.json").await;
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_str(&body).expect("json");
    let mut documented: Vec<(String, String)> = doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .expect("ops")
                .keys()
                .map(move |m| (m.clone(), path.clone()))
        })
        .collect();
    let mut served: Vec<(String, String)> = spillway::service::ROUTES
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    documented.sort();
    served.sort();
    assert_eq!(documented, served);
    // Every listed route is routed (the fallback answers "no such route").
    for (method, path) in served.iter().filter(|(_, p)| !p.ends_with("/batches")) {
        let url = server.url(&path.replace(['{', '}'], ""));
        let request = if method == "post" {
            server.http.post(url)
        } else {
            server.http.get(url)
        };
        let text = request
            .send()
            .await
            .expect("answer")
            .text()
            .await
            .expect("text");
        assert!(
            !text.contains("no such route"),
            "{method} {path} is not routed"
        );
    }
}

#[test]
fn config_prints_the_effective_settings_redacted_and_rejects_bad_values() {
    let out = Command::new(env!("CARGO_BIN_EXE_spillway"))
        .args([
            "config",
            "--redis-url",
            "redis://:hunter2@127.0.0.1:6379",
            "--write-key",
            "p1=abc",
            "--batch-size",
            "500",
        ])
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("batch_size = 500"), "{stdout}");
    assert!(
        !stdout.contains("hunter2") && !stdout.contains("abc"),
        "{stdout}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_spillway"))
        .args(["config", "--chunk-size", "0"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: invalid setting `flush.chunk_size`: must be greater than 0"
    );

    // The lock must outlive a ClickHouse request; both can be set by flags.
    let clickhouse = ["config", "--clickhouse-url", "http://127.0.0.1:8123"];
    let out = Command::new(env!("CARGO_BIN_EXE_spillway"))
        .args(clickhouse)
        .args([
            "--flush-lock-ttl-ms",
            "3000",
            "--clickhouse-timeout-ms",
            "2000",
        ])
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("lock_ttl_ms = 3000") && stdout.contains("timeout_ms = 2000"),
        "{stdout}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_spillway"))
        .args(clickhouse)
        .args([
            "--flush-lock-ttl-ms",
            "2000",
            "--clickhouse-timeout-ms",
            "2000",
        ])
        .output()
        .expect("runs");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid setting `flush.lock_ttl_ms`"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let file = std::env::temp_dir().join(format!("spillway-config-{}.toml", std::process::id()));
    std::fs::write(&file, "[flush]\nbatch_size = 123\nchunk_sise = 5\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_spillway"))
        .args(["config", "--config"])
        .arg(&file)
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown field `chunk_sise`"), "{stderr}");
    let _ = std::fs::remove_file(file);
}

/// A fresh data directory, removed on drop.
pub(crate) struct DataDir(pub(crate) std::path::PathBuf);

impl DataDir {
    pub(crate) fn new() -> DataDir {
        DataDir(
            std::env::temp_dir().join(format!("spillway-serve-{}", uuid::Uuid::new_v4().simple())),
        )
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `spillway query` on a data directory, as the README shows it.
fn query(dir: &std::path::Path, sql: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_spillway"))
        .args(["query", sql, "--data-dir"])
        .arg(dir)
        .env_remove("REDIS_URL")
        .output()
        .expect("spillway query runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until nothing is queued or in flight.
pub(crate) async fn wait_until_flushed(server: &Server) {
    for _ in 0..200 {
        let (_, body) = server.get("/v1/buffer").await;
        let stats: Value = serde_json::from_str(&body).expect("json");
        if stats["queued"] == 0 && stats["in_flight"] == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the queue did not drain");
}

#[tokio::test]
async fn with_no_servers_events_land_in_the_embedded_sink_and_are_queryable() {
    let dir = DataDir::new();
    let server = Server::start_embedded(&dir.0, &[]);
    let body = r#"[
      {"name":"screen_view","project_id":"p1","session_id":"s1","profile_id":"u1","path":"/","created_at":"2024-06-01 10:00:00.000"},
      {"name":"screen_view","project_id":"p1","session_id":"s1","profile_id":"u1","path":"/pricing","created_at":"2024-06-01 10:00:42.500"},
      {"name":"click","project_id":"p1"}]"#;
    assert_eq!(
        server.post("application/json", body).await,
        (202, json!({"accepted": 3, "rejected": []}))
    );
    let (status, held) = server.get("/v1/sessions/s1/last-screen-view").await;
    assert_eq!(status, 200);
    assert!(held.contains("/pricing"));
    assert_eq!(
        server.get("/v1/projects/p1/live-visitors").await.1,
        r#"{"count":1}"#
    );
    wait_until_flushed(&server).await;

    let rows = query(
        &dir.0,
        "SELECT name, json_extract(event, '$.path'), duration FROM events ORDER BY name DESC",
    );
    assert_eq!(
        rows,
        "name\tjson_extract(event, '$.path')\tduration\nscreen_view\t/\t42500\nclick\tNULL\t0\n"
    );
    let (_, ready) = server.get("/readyz").await;
    assert!(
        ready.contains(r#""backend":"embedded+embedded""#),
        "{ready}"
    );

    // A second process on the same directory refuses to start, with a clear message.
    let out = Command::new(env!("CARGO_BIN_EXE_spillway"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir.0)
        .env_remove("REDIS_URL")
        .env_remove("CLICKHOUSE_URL")
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is in use by another spillway process"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_request_sent_again_lands_once_unless_the_window_is_off() {
    let body = format!(
        "[{},{},{}]",
        click("a", "p1", 0),
        click("b", "p1", 1),
        screen_view("v", "s1", "u1", 2)
    );
    // Held screen views are not flushed: with the window, the two clicks land; without it, the
    // copy's clicks land too, and its screen view releases the first copy's.
    for (window, landed, dropped) in [("120", "2\n", "3"), ("0", "5\n", "0")] {
        let dir = DataDir::new();
        let server = Server::start_embedded(&dir.0, &["--dedup-window-secs", window]);
        for _ in 0..2 {
            assert_eq!(
                server.post("application/json", body.clone()).await.0,
                202,
                "every copy is acknowledged"
            );
        }
        wait_until_flushed(&server).await;
        assert_eq!(
            query(&dir.0, "SELECT count(*) FROM events"),
            format!("count(*)\n{landed}")
        );
        let metrics = server.get("/metrics").await.1;
        let expected = format!("spillway_queue_resent_events_dropped_total {dropped}");
        assert!(
            metrics.contains(&expected) || dropped == "0",
            "window {window}: missing {expected}:\n{metrics}"
        );
    }
}

#[tokio::test]
async fn sigkill_mid_stream_then_restart_lands_every_acknowledged_event_once() {
    let dir = DataDir::new();
    let mut server = Server::start_embedded(&dir.0, &[]);
    let stream = EventStream::start(&server, 3, 25);
    stream.wait_for(3000).await;
    server.kill();
    let acknowledged = stream.finish().await;

    let server = Server::start_embedded(&dir.0, &[]);
    wait_until_flushed(&server).await;
    let landed = query(&dir.0, "SELECT id FROM events");
    assert_landed_once(&acknowledged, landed.lines().skip(1));
}

/// Clients sending batches of clicks with fresh ids until the server stops answering; they
/// record the id of every event acknowledged with `202`.
pub(crate) struct EventStream {
    pub(crate) acknowledged: Arc<std::sync::Mutex<Vec<String>>>,
    senders: Vec<tokio::task::JoinHandle<()>>,
}

impl EventStream {
    pub(crate) fn start(server: &Server, clients: usize, per_request: u64) -> EventStream {
        let acknowledged = Arc::new(std::sync::Mutex::new(Vec::new()));
        let senders = (0..clients)
            .map(|client| {
                let (http, url) = (server.http.clone(), server.url("/v1/events"));
                let acknowledged = acknowledged.clone();
                tokio::spawn(async move {
                    for request in 0..100_000 {
                        let ids: Vec<String> =
                            (0..per_request).map(|_| uuid::Uuid::new_v4().to_string()).collect();
                        let events: Vec<String> = ids
                            .iter()
                            .zip(0..)
                            .map(|(id, i)| {
                                format!(
                                    r#"{{"id":"{id}","name":"click","project_id":"p1","created_at":"{}","path":"/{client}/{request}/{i}"}}"#,
                                    at(i)
                                )
                            })
                            .collect();
                        let body = format!("[{}]", events.join(","));
                        let Ok(response) = http.post(&url).body(body).send().await else {
                            return;
                        };
                        if response.status().as_u16() != 202 {
                            return;
                        }
                        acknowledged.lock().expect("ids").extend(ids);
                    }
                })
            })
            .collect();
        EventStream {
            acknowledged,
            senders,
        }
    }

    /// Waits until at least `count` events are acknowledged.
    pub(crate) async fn wait_for(&self, count: usize) {
        while self.acknowledged.lock().expect("ids").len() < count {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits for the clients to stop; returns the acknowledged ids.
    pub(crate) async fn finish(self) -> Vec<String> {
        for sender in self.senders {
            sender.await.expect("sender");
        }
        let ids = self.acknowledged.lock().expect("ids").clone();
        ids
    }
}

/// Every acknowledged id landed exactly once, and nothing landed twice. (An event written but
/// whose `202` was lost with the connection may land too: the client would retry it.)
pub(crate) fn assert_landed_once<'a>(
    acknowledged: &[String],
    landed: impl Iterator<Item = &'a str>,
) {
    let mut times: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for id in landed {
        *times.entry(id.trim()).or_default() += 1;
    }
    let duplicated = times.values().filter(|n| **n > 1).count();
    let lost = acknowledged
        .iter()
        .filter(|id| !times.contains_key(id.as_str()))
        .count();
    assert_eq!(
        (lost, duplicated),
        (0, 0),
        "{} acknowledged, {} landed: lost, duplicated",
        acknowledged.len(),
        times.len()
    );
}

#[tokio::test]
async fn with_redis_down_events_are_journaled_acknowledged_and_replayed_in_order() {
    use redis::AsyncCommands;
    let env = TestEnv::new().await;
    env.create_table(SchemaVariant::Legacy, "events").await;
    let mut redis = OwnRedis::start().await;
    let mut server = Server::start_with(&env, &redis.url(), &["--no-flush"]);
    redis.stop();

    for i in 0..3u64 {
        let body = format!(
            "[{},{}]",
            screen_view(&format!("v{i}"), "s1", "u1", i * 1000),
            click(&format!("c{i}"), "p1", i)
        );
        let (status, answer) = server.post("application/json", body).await;
        assert_eq!(status, 202, "acknowledged from the journal: {answer}");
    }
    let (_, metrics) = server.get("/metrics").await;
    assert!(metrics.contains("spillway_journal_events 6"), "{metrics}");
    // A crash during the outage: what was acknowledged is in the journal on disk.
    server.kill();
    redis.restart().await;
    let server = Server::start_with(&env, &redis.url(), &["--no-flush"]);

    let client = redis::Client::open(redis.url()).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let mut queued: Vec<String> = Vec::new();
    for _ in 0..100 {
        queued = conn
            .lrange(env.key("event_buffer:queue"), 0, -1)
            .await
            .expect("LRANGE");
        if queued.len() == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let labels: Vec<String> = queued.iter().map(|e| label(e)).collect();
    assert_eq!(
        labels,
        ["c0", "v0", "c1", "v1", "c2"],
        "replayed in arrival order"
    );
    assert_eq!(field(&queued[1], "duration"), 1000);
    assert_eq!(field(&queued[3], "duration"), 1000);
    let (_, held) = server.get("/v1/sessions/s1/last-screen-view").await;
    assert_eq!(label(&held), "v2");
}
