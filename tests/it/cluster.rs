//! spillway on Redis Cluster (`scripts/cluster.sh`: 3 masters, 3 replicas): the queue in
//! shards, each script's keys in one slot, flushers leasing shards, and the reference's
//! semantics unchanged.

use futures_util::StreamExt;
use spillway::workload::{Workload, WorkloadSettings};
use spillway::FlushSettings;

use crate::conformance::golden::{
    add_the_golden_trace_and_drain, assert_landed_once_with_the_reference_durations,
    assert_the_reference_rows_landed, expected_held, reference_model,
};
use crate::helpers::*;
use crate::service::{assert_landed_once, wait_until_flushed, DataDir, EventStream, Server};

#[tokio::test]
async fn the_golden_trace_lands_the_reference_rows_and_holds_the_reference_views() {
    let b = Backend::cluster(16).await;
    add_the_golden_trace_and_drain(&b).await;
    assert_the_reference_rows_landed(&b).await;

    // The held views, read the way callers read them: by session, and by project + profile.
    let queue = b.queue();
    let mut sessions = 0;
    for (key, event_id, _) in expected_held() {
        let name = key.trim_start_matches("event_buffer:last_screen_view:");
        let held = match name.split_once(':') {
            Some(("session", session)) => {
                sessions += 1;
                queue.last_screen_view_by_session(session).await
            }
            Some(("profile", rest)) => {
                let (project, profile) = rest.split_once(':').expect("project:profile");
                queue.last_screen_view_by_profile(project, profile).await
            }
            _ => panic!("unexpected held key {key}"),
        };
        let held = held
            .expect("read")
            .unwrap_or_else(|| panic!("{key}: nothing held"));
        assert_eq!(field(&held, "id"), event_id.as_str(), "{key}");
    }
    assert_eq!(queue.held_count().await.expect("held count"), sessions);
}

#[tokio::test]
async fn two_flushers_share_the_shards_and_land_100k_events_once_with_the_reference_durations() {
    let b = Backend::cluster(16).await;
    let lines: Vec<String> = Workload::new(WorkloadSettings::default())
        .take(100_000)
        .collect();
    b.add_all(&b.buffer(), &refs(&lines)).await;
    let (first, second) = (
        b.flusher(FlushSettings::default()).await,
        b.flusher(FlushSettings::default()).await,
    );
    let (first, second) = tokio::join!(first.drain(), second.drain());
    let (first, second) = (first.expect("drain"), second.expect("drain"));
    assert!(
        first.batches > 0 && second.batches > 0,
        "both flushers took batches: {first:?} {second:?}"
    );

    assert_landed_once_with_the_reference_durations(&b, &lines).await;
    assert_eq!(b.queue().size().await.expect("size"), 0);
}

#[tokio::test]
async fn a_profiles_last_screen_view_is_the_newest_of_its_sessions_in_any_shard() {
    let b = Backend::cluster(16).await;
    // Sessions spread over the shards; the profile's newest view is in one of them.
    let views: Vec<String> = (0..12)
        .map(|i| screen_view(&format!("v{i}"), &format!("s{i}"), "u1", 1_000 * i))
        .collect();
    b.add_all(&b.buffer(), &refs(&views)).await;
    let newest = b.queue().last_screen_view_by_profile("p1", "u1").await;
    assert_eq!(
        newest.expect("read").map(|e| label(&e)).as_deref(),
        Some("v11")
    );
    let by_session = b.queue().last_screen_view_by_session("s3").await;
    assert_eq!(
        by_session.expect("read").map(|e| label(&e)).as_deref(),
        Some("v3")
    );
}

#[tokio::test]
async fn visitors_quiet_sessions_counters_and_dead_letters_work_across_slots() {
    let b = Backend::cluster(4).await;
    let events = [
        screen_view("v1", "s1", "u1", 0),
        screen_view("v2", "s2", "u2", 10),
        click("c", "p1", 20),
    ];
    b.add_all(&b.buffer(), &refs(&events)).await;
    let queue = b.queue();
    let now = spillway::time::now();
    assert_eq!(
        queue.active_visitor_count("p1", now).await.expect("count"),
        2
    );
    // A cutoff in the future: every held view counts as quiet, and is released unchanged.
    let later = spillway::Timestamp::from_millis(now.as_millis() + 1);
    assert_eq!(queue.sweep_idle(later, 100).await.expect("sweep"), 2);
    assert_eq!(queue.held_count().await.expect("held"), 0);
    assert_eq!(queue.size().await.expect("size"), 3);
    assert_eq!(queue.reconcile().await.expect("reconcile"), 0);
    let stats = queue.stats().await.expect("stats");
    assert_eq!(
        (stats.queued, stats.in_flight, stats.dead_letter),
        (3, 0, 0)
    );
    assert_eq!(queue.replay_dead_letters(10).await.expect("replay"), 0);
    assert!(queue.dead_letters().await.expect("list").is_empty());
}

/// Two `serve --no-flush` ingest processes and two `spillway flush` workers share one queue of
/// 16 shards on the cluster. Each session's events go, in order, to one ingest process (as a
/// load balancer with session affinity would send them). Midway one flush worker is SIGKILLed
/// and a new one started: the leases (shard locks) of the dead one expire and are taken over,
/// its abandoned batches resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_ingest_and_two_flush_processes_land_200k_events_once_through_a_flusher_crash() {
    const EVENTS: usize = 200_000;
    const PER_REQUEST: usize = 500;
    let env = TestEnv::new().await;
    env.create_table(spillway::SchemaVariant::Legacy, "events")
        .await;
    let nodes = cluster_nodes();
    let dirs: Vec<DataDir> = (0..5).map(|_| DataDir::new()).collect();
    let shards = ["--redis-shards", "16"];
    let ingest: Vec<Server> = dirs[..2]
        .iter()
        .map(|dir| {
            Server::start_on_cluster(
                &env,
                &nodes,
                &dir.0,
                "serve",
                &[&shards[..], &["--no-flush"]].concat(),
            )
        })
        .collect();
    // Short leases, so a dead worker's shards are taken over within seconds.
    let flush_args = [
        &shards[..],
        &["--flush-interval-ms", "100", "--flush-lock-ttl-ms", "4000"],
        &["--clickhouse-timeout-ms", "3000"],
    ]
    .concat();
    let flush_worker =
        |dir: &DataDir| Server::start_on_cluster(&env, &nodes, &dir.0, "flush", &flush_args);
    let mut flushers = vec![flush_worker(&dirs[2]), flush_worker(&dirs[3])];

    let lines: Vec<String> = Workload::new(WorkloadSettings::default())
        .take(EVENTS)
        .collect();
    let mut streams: [Vec<&str>; 2] = [Vec::new(), Vec::new()];
    for line in &lines {
        let session = field(line, "session_id");
        let session = session.as_str().unwrap_or("");
        let side = session
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31) + usize::from(b))
            % 2;
        streams[side].push(line);
    }
    let senders = streams
        .iter()
        .zip(&ingest)
        .map(|(events, server)| async move {
            for request in events.chunks(PER_REQUEST) {
                let (status, body) = server
                    .post("application/x-ndjson", request.join("\n"))
                    .await;
                assert_eq!(status, 202, "{body}");
            }
        });
    let model = reference_model(&lines);
    let rows = u64::try_from(model.len()).expect("rows");
    let crash = async {
        env.wait_for_rows(rows / 4).await;
        flushers[0].kill();
        flush_worker(&dirs[4])
    };
    let (_, replacement) = tokio::join!(futures_util::future::join_all(senders), crash);
    flushers.push(replacement);

    let landed = env.wait_for_rows(rows).await;
    assert_eq!(landed, rows, "rows landed within two minutes");
    for flusher in &mut flushers[1..] {
        assert!(flusher.terminate().success(), "{}", flusher.logs());
    }
    let b = Backend::Redis {
        env,
        schema: spillway::SchemaVariant::Legacy,
    };
    assert_landed_once_with_the_reference_durations(&b, &lines).await;
}

/// A Redis Cluster of this test's own (`scripts/cluster.sh` on other ports), stopped on drop.
struct OwnCluster {
    env: Vec<(&'static str, String)>,
    nodes: Vec<String>,
}

impl OwnCluster {
    fn start() -> OwnCluster {
        // 50 above the shared cluster's base: clusters take BASE+1..BASE+16.
        let shared: u16 = std::env::var("SPILLWAY_CLUSTER_PORT_BASE")
            .ok()
            .and_then(|b| b.parse().ok())
            .unwrap_or(17_000);
        let dir = std::env::temp_dir().join(format!(
            "spillway-own-cluster-{}",
            uuid::Uuid::new_v4().simple()
        ));
        let env = vec![
            ("SPILLWAY_CLUSTER_PORT_BASE", (shared + 50).to_string()),
            ("SPILLWAY_CLUSTER_DIR", dir.display().to_string()),
        ];
        let out =
            std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster.sh"))
                .arg("start")
                .envs(env.iter().map(|(k, v)| (k, v)))
                .output()
                .expect("cluster.sh runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "cluster.sh start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let nodes = stdout
            .lines()
            .find_map(|l| l.strip_prefix("export SPILLWAY_TEST_REDIS_CLUSTER="))
            .expect("the cluster's nodes")
            .split(',')
            .map(str::to_owned)
            .collect();
        OwnCluster { env, nodes }
    }

    /// Restarts nodes that died; each rejoins as a replica of the node that took over.
    fn restart_dead_nodes(&self) {
        let out =
            std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster.sh"))
                .arg("start")
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .output()
                .expect("cluster.sh runs");
        assert!(
            out.status.success(),
            "cluster.sh start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The port of a master: the first seed node (a fresh cluster lists its masters).
    fn a_master_port(&self) -> u16 {
        self.nodes[0]
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port")
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let _ =
            std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster.sh"))
                .arg("stop")
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .output();
    }
}

/// Redis Cluster replicates asynchronously: a master that dies may take writes it acknowledged
/// with it. With `--redis-wait-replicas 1`, spillway acknowledges only writes a replica has (or
/// that it journaled on disk), so killing a master mid-stream loses no acknowledged event. Its
/// replica takes over; until the dead node is back as that one's replica, writes there cannot
/// reach a replica and are journaled, then replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_master_killed_mid_stream_loses_no_event_acknowledged_with_replica_wait() {
    let cluster = OwnCluster::start();
    let env = TestEnv::new().await;
    env.create_table(spillway::SchemaVariant::Legacy, "events")
        .await;
    let dir = DataDir::new();
    let args = ["--redis-shards", "6", "--redis-wait-replicas", "1"];
    let mut server = Server::start_on_cluster(&env, &cluster.nodes, &dir.0, "serve", &args);
    let (_, ready) = server.get("/readyz").await;
    assert!(
        ready.contains(r#""backend":"redis-cluster[6 shards]+clickhouse""#),
        "{ready}"
    );
    let stream = EventStream::start(&server, 4, 50);
    stream.wait_for(5_000).await;

    let master = cluster.a_master_port();
    let pid = std::fs::read_to_string(
        std::path::Path::new(&cluster.env[1].1)
            .join(master.to_string())
            .join("redis.pid"),
    )
    .expect("the master's pidfile");
    let killed = std::process::Command::new("kill")
        .args(["-KILL", pid.trim()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let before = stream.acknowledged.lock().expect("ids").len();
    // Acknowledged through the failover (written, retried or journaled) and after it.
    stream.wait_for(before + 5_000).await;
    cluster.restart_dead_nodes();
    stream.wait_for(before + 10_000).await;
    assert!(server.terminate().success(), "{}", server.logs());
    let acknowledged = stream.finish().await;

    // Whatever the journal holds is replayed by the next process; it flushes everything.
    let server = Server::start_on_cluster(&env, &cluster.nodes, &dir.0, "serve", &args);
    env.wait_for_rows(u64::try_from(acknowledged.len()).expect("count"))
        .await;
    wait_until_flushed(&server).await;
    let landed = env
        .sql(&format!("SELECT toString(id) FROM {}.events", env.database))
        .await;
    assert_landed_once(&acknowledged, landed.lines());
}

#[tokio::test]
async fn batch_notifications_reach_subscribers_with_each_shards_counts() {
    let b = Backend::cluster(4).await;
    let events: Vec<String> = (0..8).map(|i| click(&format!("c{i}"), "p1", i)).collect();
    b.add_all(&b.buffer(), &refs(&events)).await;
    let flusher = b.flusher(flush_settings(4000, 1000)).await;
    let mut feed = b.queue().subscribe().await.expect("subscribe");
    flusher.drain().await.expect("drain");
    // One notification per project and shard batch; together they count every event.
    let mut counted = 0;
    while counted < events.len() {
        let payload = tokio::time::timeout(std::time::Duration::from_secs(10), feed.next())
            .await
            .expect("a notification")
            .expect("feed open");
        let payload: serde_json::Value = serde_json::from_str(&payload).expect("json");
        assert_eq!(payload["projectId"], "p1");
        counted += usize::try_from(payload["count"].as_u64().expect("count")).expect("count");
    }
    assert_eq!(counted, events.len());
}
