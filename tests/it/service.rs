//! `spillway serve` as a real process against the real servers: ingest formats and their exact
//! answers, limits, auth, queries, the live feed, metrics, readiness and graceful shutdown.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use spillway::SchemaVariant;

use crate::helpers::*;

/// A running `spillway serve`, killed on drop.
struct Server {
    child: Child,
    base: String,
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
        let mut child = Command::new(env!("CARGO_BIN_EXE_spillway"))
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--flush-interval-ms", "100"])
            .args(args)
            .env("REDIS_URL", redis_url)
            .env("SPILLWAY_KEY_PREFIX", &env.prefix)
            .env("CLICKHOUSE_URL", &env.clickhouse_url)
            .env("CLICKHOUSE_DATABASE", &env.database)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(if std::env::var_os("DEBUG_SERVE").is_some() {
                Stdio::inherit()
            } else {
                Stdio::piped()
            })
            .spawn()
            .expect("spillway serve starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("first line");
        let base = line
            .trim()
            .strip_prefix("spillway listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        Server {
            child,
            base,
            http: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn post(&self, content_type: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
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

    async fn get(&self, path: &str) -> (u16, String) {
        let response = self.http.get(self.url(path)).send().await.expect("answer");
        let status = response.status().as_u16();
        (status, response.text().await.expect("text"))
    }

    /// Sends SIGTERM and waits for the exit status.
    fn terminate(&mut self) -> std::process::ExitStatus {
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
    let mut logs = String::new();
    std::io::Read::read_to_string(&mut server.child.stderr.take().expect("stderr"), &mut logs)
        .expect("logs");
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
    let acknowledged = Arc::new(AtomicUsize::new(0));
    let mut senders = Vec::new();
    for sender in 0..4 {
        let (http, url, acknowledged) = (
            server.http.clone(),
            server.url("/v1/events"),
            acknowledged.clone(),
        );
        senders.push(tokio::spawn(async move {
            for request in 0..10_000 {
                let body: Vec<String> = (0..20)
                    .map(|i| {
                        format!(
                            r#"{{"id":"{}","name":"click","project_id":"p1","created_at":"{}","path":"/{sender}/{request}/{i}"}}"#,
                            uuid::Uuid::new_v4(),
                            at(i)
                        )
                    })
                    .collect();
                let Ok(response) = http.post(&url).body(format!("[{}]", body.join(","))).send().await else {
                    return;
                };
                if response.status().as_u16() != 202 {
                    return;
                }
                let answer: Value = response.json().await.expect("json");
                let accepted = answer["accepted"].as_u64().expect("count") as usize;
                acknowledged.fetch_add(accepted, Ordering::SeqCst);
            }
        }));
    }
    while acknowledged.load(Ordering::SeqCst) < 2000 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = server.terminate();
    assert!(status.success(), "exit status {status}");
    for sender in senders {
        sender.await.expect("sender");
    }
    // What the service had not flushed yet is still queued: drain it, then count.
    let flusher = spillway::Flusher::new(
        env.queue.clone(),
        env.sink("events").await,
        flush_settings(4000, 1000),
    );
    flusher.drain().await.expect("drain");
    let acknowledged = acknowledged.load(Ordering::SeqCst);
    let counts = env
        .sql(&format!(
            "SELECT count(), uniqExact(id) FROM {}.events",
            env.database
        ))
        .await;
    assert_eq!(counts.trim(), format!("{acknowledged}\t{acknowledged}"));
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
