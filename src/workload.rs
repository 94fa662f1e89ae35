//! A deterministic generator of OpenPanel-like events, for tests, benchmarks and demos.
//!
//! The mix follows what analytics SDKs send: about 60% screen views spread over many
//! concurrent sessions and profiles, 30% other named events, session starts and ends, some
//! events without a session or a profile, and a few timestamps out of order. Each event is about
//! 600 bytes with a dozen properties, like OpenPanel's rows. The same seed gives the same events.

use std::fmt::Write as _;

/// Shape of a generated workload.
#[derive(Debug, Clone, Copy)]
pub struct WorkloadSettings {
    /// Seed of the pseudo-random sequence.
    pub seed: u64,
    /// Number of projects.
    pub projects: u32,
    /// Sessions open at any time.
    pub concurrent_sessions: u32,
    /// Epoch milliseconds of the first event.
    pub start_millis: i64,
}

impl Default for WorkloadSettings {
    fn default() -> Self {
        WorkloadSettings {
            seed: 1,
            projects: 3,
            concurrent_sessions: 500,
            start_millis: 1_717_200_000_000,
        }
    }
}

struct Session {
    id: String,
    profile: String,
    device: String,
    project: u32,
    started: bool,
}

/// An endless, deterministic stream of event JSON lines.
pub struct Workload {
    settings: WorkloadSettings,
    rng: SplitMix64,
    sessions: Vec<Session>,
    clock: i64,
    serial: u64,
}

const NAMES: &[&str] = &[
    "click",
    "add_to_cart",
    "search",
    "sign_up",
    "purchase",
    "scroll",
];
const PATHS: &[&str] = &[
    "/",
    "/pricing",
    "/docs",
    "/blog/launch",
    "/login",
    "/careers",
    "/cart",
];
const BROWSERS: &[&str] = &["Chrome", "Firefox", "Safari", "Edge"];
const OSES: &[&str] = &["Windows", "macOS", "iOS", "Android", "Linux"];
const REFERRERS: &[(&str, &str, &str)] = &[
    ("https://www.google.com/", "Google", "search"),
    ("https://github.com/", "GitHub", "unknown"),
    ("", "", ""),
    ("https://news.ycombinator.com/", "Hacker News", "social"),
];

impl Workload {
    /// A workload with the given settings.
    #[must_use]
    pub fn new(settings: WorkloadSettings) -> Workload {
        let mut workload = Workload {
            settings,
            rng: SplitMix64(settings.seed),
            sessions: Vec::new(),
            clock: settings.start_millis,
            serial: 0,
        };
        for _ in 0..settings.concurrent_sessions.max(1) {
            let session = workload.new_session();
            workload.sessions.push(session);
        }
        workload
    }

    fn new_session(&mut self) -> Session {
        let profile = if self.rng.below(5) == 0 {
            String::new()
        } else {
            format!("user_{}", self.rng.below(200_000))
        };
        Session {
            id: self.uuid(),
            profile,
            device: format!("{:016x}", self.rng.next()),
            project: u32::try_from(self.rng.below(u64::from(self.settings.projects.max(1))))
                .unwrap_or(0),
            started: false,
        }
    }

    fn uuid(&mut self) -> String {
        let (a, b) = (self.rng.next(), self.rng.next());
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            (b >> 48) & 0x3fff | 0x8000,
            b & 0xffff_ffff_ffff
        )
    }

    fn pick<'a>(&mut self, items: &'a [&'a str]) -> &'a str {
        items[usize::try_from(self.rng.below(items.len() as u64)).unwrap_or(0)]
    }

    /// The next event, as one line of JSON.
    pub fn next_event(&mut self) -> String {
        self.clock += i64::try_from(self.rng.below(20)).unwrap_or(0);
        self.serial += 1;
        let slot = usize::try_from(self.rng.below(self.sessions.len() as u64)).unwrap_or(0);
        let roll = self.rng.below(100);
        let (name, end) = if !self.sessions[slot].started {
            self.sessions[slot].started = true;
            ("session_start", false)
        } else if roll < 70 {
            ("screen_view", false)
        } else if roll < 93 {
            (self.pick(NAMES), false)
        } else {
            ("session_end", true)
        };
        // A few events come without a session, and a few with an earlier timestamp.
        let detached = name != "session_end" && self.rng.below(25) == 0;
        let created_at = if self.rng.below(100) == 0 {
            self.clock - i64::try_from(self.rng.below(3000)).unwrap_or(0)
        } else {
            self.clock
        };
        let id = self.uuid();
        let path = self.pick(PATHS);
        let browser = self.pick(BROWSERS);
        let os = self.pick(OSES);
        let (referrer, referrer_name, referrer_type) =
            REFERRERS[usize::try_from(self.rng.below(REFERRERS.len() as u64)).unwrap_or(0)];
        let value = self.rng.below(1000);
        let session = &self.sessions[slot];
        let session_id = if detached { "" } else { session.id.as_str() };
        let mut line = String::with_capacity(700);
        let _ = write!(
            line,
            r#"{{"id":"{id}","name":"{name}","project_id":"proj_{project}","device_id":"{device}","profile_id":"{profile}","session_id":"{session_id}","created_at":"{created}","path":"{path}","origin":"https://site{project}.example.com","referrer":"{referrer}","referrer_name":"{referrer_name}","referrer_type":"{referrer_type}","properties":{{"utm_source":"mail","utm_campaign":"w{value}","plan":"free","label":"{value}","ab":"b","lang":"en","theme":"dark","n":"{serial}"}},"groups":[],"duration":0,"revenue":0,"browser":"{browser}","browser_version":"126.0.0","os":"{os}","os_version":"14","device":"desktop","brand":"","model":"","country":"DE","city":"Berlin","region":"Berlin","sdk_name":"web","sdk_version":"1.0.0"}}"#,
            project = session.project,
            device = session.device,
            profile = session.profile,
            created = crate::time::format_millis(crate::time::Timestamp::from_millis(created_at)),
            serial = self.serial,
        );
        if end {
            self.sessions[slot] = self.new_session();
        }
        line
    }
}

impl Iterator for Workload {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        Some(self.next_event())
    }
}

/// SplitMix64: small, fast and good enough for synthetic workloads.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, EventKind};

    #[test]
    fn is_deterministic_valid_and_mixed() {
        let a: Vec<String> = Workload::new(WorkloadSettings::default())
            .take(5000)
            .collect();
        let b: Vec<String> = Workload::new(WorkloadSettings::default())
            .take(5000)
            .collect();
        assert_eq!(a, b);
        let events: Vec<Event> = a.iter().map(|l| Event::parse(l).expect("valid")).collect();
        let views = events
            .iter()
            .filter(|e| e.kind() == EventKind::ScreenView)
            .count();
        let ends = events
            .iter()
            .filter(|e| e.kind() == EventKind::SessionEnd)
            .count();
        assert!((2700..3500).contains(&views), "{views} screen views");
        assert!(ends > 100, "{ends} session ends");
        let size = a.iter().map(String::len).sum::<usize>() / a.len();
        assert!((550..750).contains(&size), "{size} bytes per event");
    }
}
