//! The live status page, looked at in a real browser (headless Chromium): the numbers it shows
//! match what was sent, and its chart moves.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::helpers::*;
use crate::service::{wait_until_flushed, DataDir, Server};

fn chromium() -> PathBuf {
    let path = PathBuf::from("/usr/bin/chromium");
    assert!(
        path.exists(),
        "Chromium is missing: scripts/test.sh installs the `chromium` Debian package"
    );
    path
}

/// Runs headless Chromium on `url` with `args`, letting the page's timers run for `seconds`
/// of virtual time; returns its stdout. The page must be in snapshot mode (`?samples=N`): an
/// open live feed would stop the virtual clock.
fn chromium_run(url: &str, seconds: u32, args: &[&str], profile: &Path) -> String {
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--virtual-time-budget={}", seconds * 1000))
        .args(args)
        .arg(url)
        .output()
        .expect("chromium runs");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of the element with this id in a dumped DOM.
fn text_of(dom: &str, id: &str) -> String {
    let start = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the page"));
    let rest = &dom[start..];
    let open = rest.find('>').expect("tag end") + 1;
    let close = rest[open..].find('<').expect("text end") + open;
    rest[open..close].to_owned()
}

#[tokio::test]
async fn the_status_page_shows_what_was_sent_and_its_chart_moves() {
    let dir = DataDir::new();
    let server = Server::start_embedded(&dir.0, &[]);
    let events: Vec<String> = (0..30)
        .map(|i| {
            let project = if i % 3 == 0 { "alpha" } else { "beta" };
            format!(
                r#"{{"id":"{}","name":"click","project_id":"{project}","profile_id":"u{}","created_at":"{}","path":"/{i}"}}"#,
                uuid::Uuid::new_v4(),
                i % 4,
                at(i)
            )
        })
        .collect();
    let (first, second) = events.split_at(12);
    for part in [first, second] {
        let (status, _) = server
            .post("application/json", format!("[{}]", part.join(",")))
            .await;
        assert_eq!(status, 202);
    }
    wait_until_flushed(&server).await;

    let (status, page) = server.get("/").await;
    assert_eq!(status, 200);
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "nothing from the network"
    );

    let profile = tempdir("chromium-profile");
    let dom = chromium_run(&server.url("/?samples=5"), 10, &["--dump-dom"], &profile);
    assert_eq!(text_of(&dom, "accepted"), "30");
    assert_eq!(text_of(&dom, "flushed"), "30");
    assert_eq!(text_of(&dom, "queued"), "0");
    assert_eq!(text_of(&dom, "dead-letter"), "0");
    assert_eq!(text_of(&dom, "backend"), "embedded+embedded");
    assert_eq!(text_of(&dom, "readiness"), "ready");
    assert_eq!(text_of(&dom, "last-flush-result"), "ok (30 rows)");
    assert!(
        dom.contains("<td>alpha</td><td>4</td>"),
        "alpha has u0..u3 seen: {dom}"
    );
    assert!(dom.contains("<td>beta</td><td>4</td>"), "{dom}");
    let samples: usize = text_of(&dom, "samples").parse().expect("a number");
    assert_eq!(samples, 5, "the chart took a sample a second");
    let line = &dom[dom.find(r#"id="queue-line""#).expect("chart line")..];
    let points = &line[line.find("points=\"").expect("points") + 8..];
    let points = &points[..points.find('"').expect("end of points")];
    assert!(
        points.split(' ').count() >= 3,
        "the line has a point per sample: {points}"
    );

    // A screenshot, kept as a CI artifact.
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    chromium_run(
        &server.url("/?samples=5"),
        10,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1100,820",
        ],
        &profile,
    );
    let png = std::fs::read(&shot).expect("screenshot written");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    println!("status page screenshot: {}", shot.display());
    eprintln!("status page screenshot: {}", shot.display());
    let _ = std::fs::remove_dir_all(profile);
}

fn tempdir(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("spillway-{name}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}
