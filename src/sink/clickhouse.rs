//! The ClickHouse sink: `INSERT ... FORMAT JSONEachRow` over the HTTP interface.
//!
//! At start the sink reads the target table's columns from `system.columns` and shapes every
//! row to them, so the same events fit OpenPanel's current table (`Map(String, String)`,
//! `DateTime64(3)`, `LowCardinality`) and one that Debian's ClickHouse 18.16 can hold (`String`,
//! `DateTime`):
//!
//! - fields without a column are left out; columns without a field take their default;
//! - an object into a `String` column becomes its JSON text; into a `Map(String, String)`, each
//!   non-string value becomes its JSON text;
//! - `created_at` (and any parseable date into a `DateTime`/`DateTime64` column) is sent as Unix
//!   seconds, which ClickHouse reads independently of the server's time zone;
//! - every other value is passed through byte for byte.
//!
//! Servers from 22.2 on get each chunk's token as `insert_deduplication_token`, so a retried
//! chunk is deduplicated by ClickHouse (on non-replicated tables only when the table sets
//! `non_replicated_deduplication_window`, as `spillway schema` does). Older servers (18.16)
//! have no token: there each chunk's insert, into a table with an `id`, leaves out in the same
//! query the rows whose `id` the table already holds (see [`ClickHouseSink::insert`]).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write as _;

use reqwest::Url;
use serde::Deserialize;

use super::{Row, SinkError};
use crate::config::ClickHouseSettings;
use crate::event::Fields;
use crate::time::{self, Timestamp};

/// How the sink writes one column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ColumnKind {
    /// `String`, `FixedString`, `UUID`, `Enum*`: JSON strings.
    Text,
    /// `Map(String, String)`: an object of strings.
    Map,
    /// `DateTime`: whole Unix seconds.
    DateTime,
    /// `DateTime64(n)`: Unix seconds with milliseconds.
    DateTime64,
    /// Integers and floats: numbers.
    Number,
    /// Anything else (arrays, tuples, bools): passed through.
    Other,
}

#[derive(Debug, Clone, Copy)]
struct Column {
    kind: ColumnKind,
    nullable: bool,
}

impl Column {
    fn from_type(ty: &str) -> Column {
        let mut ty = ty.trim();
        let mut nullable = false;
        loop {
            if let Some(inner) = unwrap_type(ty, "Nullable") {
                nullable = true;
                ty = inner;
            } else if let Some(inner) = unwrap_type(ty, "LowCardinality") {
                ty = inner;
            } else {
                break;
            }
        }
        let kind = if ty.starts_with("DateTime64") {
            ColumnKind::DateTime64
        } else if ty.starts_with("DateTime") {
            ColumnKind::DateTime
        } else if ty.starts_with("Map(") {
            ColumnKind::Map
        } else if ty == "String"
            || ty == "UUID"
            || ty.starts_with("FixedString(")
            || ty.starts_with("Enum")
        {
            ColumnKind::Text
        } else if ty.starts_with("UInt")
            || ty.starts_with("Int")
            || ty.starts_with("Float")
            || ty.starts_with("Decimal")
        {
            ColumnKind::Number
        } else {
            ColumnKind::Other
        };
        Column { kind, nullable }
    }
}

fn unwrap_type<'a>(ty: &'a str, wrapper: &str) -> Option<&'a str> {
    ty.strip_prefix(wrapper)?
        .strip_prefix('(')?
        .strip_suffix(')')
        .map(str::trim)
}

/// The two shapes of the events table `spillway schema` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SchemaVariant {
    /// OpenPanel's current table: `Map`, `DateTime64(3)`, `LowCardinality`. ClickHouse ≥ 22.2.
    Current,
    /// For ClickHouse 18.16 (Debian): `properties` as JSON text, `created_at` as `DateTime`.
    Legacy,
}

impl SchemaVariant {
    /// The `CREATE TABLE` statement for `database.table`.
    #[must_use]
    pub fn ddl(self, database: &str, table: &str) -> String {
        let (low, properties, created_at, country, settings) = match self {
            SchemaVariant::Current => (
                "LowCardinality(String)",
                "Map(String, String)",
                "DateTime64(3)",
                "LowCardinality(FixedString(2))",
                "\nSETTINGS non_replicated_deduplication_window = 1000",
            ),
            SchemaVariant::Legacy => ("String", "String", "DateTime", "String", ""),
        };
        format!(
            "CREATE TABLE IF NOT EXISTS `{database}`.`{table}`\n(\n    \
             id UUID,\n    name {low},\n    sdk_name {low},\n    sdk_version {low},\n    \
             device_id String,\n    profile_id String,\n    project_id String,\n    \
             session_id String,\n    groups Array(String),\n    path String,\n    \
             origin String,\n    referrer String,\n    referrer_name String,\n    \
             referrer_type {low},\n    revenue UInt64,\n    duration UInt64,\n    \
             properties {properties},\n    created_at {created_at},\n    country {country},\n    \
             city String,\n    region {low},\n    longitude Nullable(Float32),\n    \
             latitude Nullable(Float32),\n    os {low},\n    os_version {low},\n    \
             browser {low},\n    browser_version {low},\n    device {low},\n    brand {low},\n    \
             model {low},\n    imported_at Nullable(DateTime)\n)\n\
             ENGINE = MergeTree\nPARTITION BY toYYYYMM(created_at)\n\
             ORDER BY (project_id, toDate(created_at), created_at, name){settings}"
        )
    }
}

/// Inserts rows into one ClickHouse table over HTTP.
#[derive(Clone)]
pub struct ClickHouseSink {
    http: reqwest::Client,
    settings: ClickHouseSettings,
    columns: HashMap<String, Column>,
    insert_url: Url,
    dedup_tokens: bool,
    /// On servers without deduplication tokens, for a table with an `id`: the columns an insert
    /// writes, as an external table's structure (`id UUID, name String, ...`).
    id_check: Option<String>,
}

impl ClickHouseSink {
    /// Connects, checks the server version and reads the target table's columns.
    ///
    /// # Errors
    /// [`SinkError`] when the server cannot be reached or the table does not exist.
    pub async fn connect(settings: ClickHouseSettings) -> Result<ClickHouseSink, SinkError> {
        for (what, name) in [("database", &settings.database), ("table", &settings.table)] {
            if !is_identifier(name) {
                return Err(SinkError::Setup(format!(
                    "ClickHouse {what} name {name:?} must match [A-Za-z_][A-Za-z0-9_]*"
                )));
            }
        }
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(std::time::Duration::from_secs(5))
            // Below ClickHouse's keep_alive_timeout (3 s by default on older servers), so an
            // idle connection is never reused just as the server closes it.
            .pool_idle_timeout(std::time::Duration::from_secs(2))
            .build()?;
        let base = Url::parse(&settings.url).map_err(|e| {
            SinkError::Setup(format!("invalid ClickHouse URL {:?}: {e}", settings.url))
        })?;
        let mut insert_url = base;
        insert_url.query_pairs_mut().append_pair(
            "query",
            &format!(
                "INSERT INTO `{}`.`{}` FORMAT JSONEachRow",
                settings.database, settings.table
            ),
        );
        let mut sink = ClickHouseSink {
            http,
            settings,
            columns: HashMap::new(),
            insert_url,
            dedup_tokens: false,
            id_check: None,
        };
        let version = sink.query("SELECT version()").await?;
        sink.dedup_tokens = supports_dedup_tokens(version.trim());
        let (columns, structure) = sink.read_columns().await?;
        if !sink.dedup_tokens && columns.contains_key("id") {
            sink.id_check = Some(structure);
        }
        sink.columns = columns;
        Ok(sink)
    }

    /// The table's columns, and the structure (`name Type, ...`, in table order) of those an
    /// insert writes (not `MATERIALIZED` or `ALIAS`).
    async fn read_columns(&self) -> Result<(HashMap<String, Column>, String), SinkError> {
        #[derive(Deserialize)]
        struct ColumnRow {
            name: String,
            #[serde(rename = "type")]
            ty: String,
            default_kind: String,
        }
        let body = self
            .query(&format!(
                "SELECT name, type, default_kind FROM system.columns \
                 WHERE database = '{}' AND table = '{}' FORMAT JSONEachRow",
                self.settings.database, self.settings.table
            ))
            .await?;
        let mut columns = HashMap::new();
        let mut structure = Vec::new();
        for line in body.lines().filter(|l| !l.trim().is_empty()) {
            let row: ColumnRow = serde_json::from_str(line).map_err(|e| {
                SinkError::Setup(format!("unexpected system.columns row {line:?}: {e}"))
            })?;
            if !matches!(row.default_kind.as_str(), "MATERIALIZED" | "ALIAS") {
                structure.push(format!("{} {}", row.name, row.ty));
            }
            columns.insert(row.name, Column::from_type(&row.ty));
        }
        if columns.is_empty() {
            return Err(SinkError::Setup(format!(
                "ClickHouse table {}.{} does not exist; create it with the DDL from `spillway schema`",
                self.settings.database, self.settings.table
            )));
        }
        Ok((columns, structure.join(", ")))
    }

    /// Runs one query and returns the body.
    async fn query(&self, sql: &str) -> Result<String, SinkError> {
        let url = Url::parse(&self.settings.url)
            .map_err(|e| SinkError::Setup(format!("invalid ClickHouse URL: {e}")))?;
        let response = self
            .authorize(self.http.post(url))
            .body(sql.to_owned())
            .send()
            .await?;
        read_response(response).await
    }

    fn authorize(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.settings.user {
            Some(user) => request.basic_auth(user, self.settings.password.as_deref()),
            None => request,
        }
    }

    /// Checks the server answers.
    pub(crate) async fn ping(&self) -> Result<(), SinkError> {
        self.query("SELECT 1").await.map(drop)
    }

    /// Inserts one chunk as a single request; `token` is the same on every attempt at it.
    ///
    /// Every attempt at a chunk must be harmless once one has landed, even an attempt that
    /// arrives late: one that timed out while the server stalled (the server still runs it when
    /// it resumes), or one sent by a flusher that stalled past its lock's expiry after its
    /// successor inserted the chunk. Servers from 22.2 drop a repeat by its token. Older ones
    /// get, for a table with an `id`, the rows as an external table and
    /// `INSERT ... SELECT ... WHERE id NOT IN (the ids the table holds)`: the look and the
    /// insert are one query, and the token is its `query_id`, so ClickHouse never runs two
    /// attempts at a chunk at once (`QUERY_WITH_SAME_ID_IS_ALREADY_RUNNING`, retried). Rows
    /// without an `id` (the zero UUID) are always inserted, so they may land twice.
    pub(crate) async fn insert(&self, rows: &[Row<'_>], token: &str) -> Result<(), SinkError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut body = String::with_capacity(rows.len() * 640);
        for row in rows {
            self.shape(row, &mut body);
            body.push('\n');
        }
        let request = if self.dedup_tokens {
            // Asynchronous inserts (on by default in recent releases) skip deduplication.
            let mut url = self.insert_url.clone();
            url.query_pairs_mut()
                .append_pair("insert_deduplication_token", token)
                .append_pair("async_insert", "0");
            self.http.post(url).body(body)
        } else if let Some(structure) = &self.id_check {
            self.insert_unless_landed(rows, token, structure, body)?
        } else {
            self.http.post(self.insert_url.clone()).body(body)
        };
        let response = self.authorize(request).send().await?;
        read_response(response).await.map(drop)
    }

    /// The request of an insert that leaves out the rows whose `id` the table holds already
    /// (servers without deduplication tokens). The look-up is narrowed by the primary key's
    /// columns (project, time range), so it reads little.
    fn insert_unless_landed(
        &self,
        rows: &[Row<'_>],
        token: &str,
        structure: &str,
        body: String,
    ) -> Result<reqwest::RequestBuilder, SinkError> {
        let table = format!("`{}`.`{}`", self.settings.database, self.settings.table);
        let mut landed = vec!["id IN (SELECT id FROM _chunk)".to_owned()];
        if self.columns.contains_key("created_at") {
            let (first, last) = rows.iter().fold((i64::MAX, i64::MIN), |(lo, hi), row| {
                let ms = row.created_at.as_millis();
                (lo.min(ms), hi.max(ms))
            });
            landed.push(format!(
                "created_at >= toDateTime({}) AND created_at < toDateTime({})",
                first.div_euclid(1000),
                last.div_euclid(1000) + 1
            ));
        }
        if self.columns.contains_key("project_id") {
            let mut projects: Vec<String> = rows
                .iter()
                .filter_map(|row| row.fields.get("project_id"))
                .filter_map(|raw| serde_json::from_str(raw.get()).ok())
                .collect();
            projects.sort();
            projects.dedup();
            landed.push(format!("project_id IN ({})", sql_list(&projects)));
        }
        let columns: Vec<String> = structure
            .split(", ")
            .filter_map(|column| column.split_once(' '))
            .map(|(name, _)| format!("`{name}`"))
            .collect();
        let columns = columns.join(", ");
        let query = format!(
            "INSERT INTO {table} ({columns}) SELECT {columns} FROM _chunk \
             WHERE id = toUUID('00000000-0000-0000-0000-000000000000') \
             OR id NOT IN (SELECT id FROM {table} WHERE {})",
            landed.join(" AND ")
        );
        let mut url = Url::parse(&self.settings.url)
            .map_err(|e| SinkError::Setup(format!("invalid ClickHouse URL: {e}")))?;
        url.query_pairs_mut()
            .append_pair("query", &query)
            .append_pair("query_id", token)
            .append_pair("_chunk_format", "JSONEachRow")
            .append_pair("_chunk_structure", structure);
        // The rows travel as the file of a form, which ClickHouse reads as table `_chunk`.
        let boundary = format!("spillway-{}", uuid::Uuid::new_v4().simple());
        let mut form = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"_chunk\"; \
             filename=\"_chunk\"\r\n\r\n"
        );
        form.push_str(&body);
        form.push_str(&format!("\r\n--{boundary}--\r\n"));
        Ok(self
            .http
            .post(url)
            .header(
                reqwest::header::CONTENT_TYPE,
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(form))
    }

    /// Appends one row, shaped to the table's columns, as a JSON object.
    fn shape(&self, row: &Row<'_>, out: &mut String) {
        out.push('{');
        let mut first = true;
        for (name, raw) in row.fields.iter() {
            let Some(column) = self.columns.get(name) else {
                continue;
            };
            // A repeated key: only its last value counts, as in JSON.parse.
            if !row
                .fields
                .get(name)
                .is_some_and(|last| std::ptr::eq(last, raw))
            {
                continue;
            }
            let value = if name == "created_at" {
                Some(Cow::Owned(timestamp_value(row.created_at, column.kind)))
            } else {
                shape_value(raw.get(), *column)
            };
            let Some(value) = value else { continue };
            if !first {
                out.push(',');
            }
            first = false;
            push_json_string(out, name);
            out.push(':');
            out.push_str(&value);
        }
        out.push('}');
    }
}

/// `'a', 'b'`: strings quoted for ClickHouse SQL.
fn sql_list(values: &[String]) -> String {
    let quoted: Vec<String> = values
        .iter()
        .map(|v| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'")))
        .collect();
    quoted.join(", ")
}

/// The value to send for one field, or `None` to leave the column at its default.
fn shape_value(value: &str, column: Column) -> Option<Cow<'_, str>> {
    if value == "null" {
        return column.nullable.then_some(Cow::Borrowed(value));
    }
    let is_string = value.starts_with('"');
    match column.kind {
        ColumnKind::Text if is_string => Some(Cow::Borrowed(value)),
        ColumnKind::Text => {
            let mut out = String::with_capacity(value.len() + 8);
            push_json_string(&mut out, value);
            Some(Cow::Owned(out))
        }
        ColumnKind::Map => shape_map(value),
        ColumnKind::DateTime | ColumnKind::DateTime64 if is_string => {
            let text: Cow<'_, str> = serde_json::from_str(value).ok()?;
            match time::parse(&text) {
                Some(ts) => Some(Cow::Owned(timestamp_value(ts, column.kind))),
                None => Some(Cow::Borrowed(value)),
            }
        }
        ColumnKind::Number if is_string => {
            let text: Cow<'_, str> = serde_json::from_str(value).ok()?;
            if text.parse::<f64>().is_ok() {
                Some(Cow::Owned(text.into_owned()))
            } else {
                Some(Cow::Borrowed(value))
            }
        }
        _ => Some(Cow::Borrowed(value)),
    }
}

/// An object for a `Map(String, String)` column: string values as they are, others as their
/// JSON text, nulls left out. Anything but an object leaves the column at its default.
fn shape_map(value: &str) -> Option<Cow<'_, str>> {
    let fields = Fields::parse(value).ok()?;
    if fields.iter().all(|(_, v)| v.get().starts_with('"')) {
        return Some(Cow::Borrowed(value));
    }
    let mut out = String::with_capacity(value.len() + 16);
    out.push('{');
    let mut first = true;
    for (key, raw) in fields.iter() {
        let raw = raw.get();
        if raw == "null" {
            continue;
        }
        if !first {
            out.push(',');
        }
        first = false;
        push_json_string(&mut out, key);
        out.push(':');
        if raw.starts_with('"') {
            out.push_str(raw);
        } else {
            push_json_string(&mut out, raw);
        }
    }
    out.push('}');
    Some(Cow::Owned(out))
}

/// Unix seconds (with milliseconds for `DateTime64`): read the same in every server time zone.
fn timestamp_value(ts: Timestamp, kind: ColumnKind) -> String {
    let millis = ts.as_millis();
    let (secs, frac) = (millis.div_euclid(1000), millis.rem_euclid(1000));
    match kind {
        ColumnKind::DateTime64 if secs >= 0 => format!("{secs}.{frac:03}"),
        ColumnKind::DateTime if secs >= 0 => secs.to_string(),
        _ => {
            let mut out = String::new();
            push_json_string(&mut out, &time::format_millis(ts));
            out
        }
    }
}

fn push_json_string(out: &mut String, text: &str) {
    // serde_json's escaping of a &str cannot fail.
    match serde_json::to_string(text) {
        Ok(quoted) => out.push_str(&quoted),
        Err(_) => out.push_str("\"\""),
    }
}

async fn read_response(response: reqwest::Response) -> Result<String, SinkError> {
    let status = response.status();
    let header_code = response
        .headers()
        .get("x-clickhouse-exception-code")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let body = response.text().await?;
    if status.is_success() {
        return Ok(body);
    }
    let code = header_code.or_else(|| exception_code(&body)).unwrap_or(0);
    let mut message = body.lines().next().unwrap_or("").trim().to_owned();
    if message.len() > 1000 {
        let mut end = 1000;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
    }
    Err(SinkError::Server {
        status: status.as_u16(),
        code,
        message,
    })
}

/// The number after `Code: ` in a ClickHouse error body.
fn exception_code(body: &str) -> Option<u32> {
    let rest = &body[body.find("Code: ")? + 6..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `insert_deduplication_token` exists from ClickHouse 22.2 on.
fn supports_dedup_tokens(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major, minor) >= (22, 2)
}

impl std::fmt::Debug for ClickHouseSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut columns = String::new();
        for name in self.columns.keys() {
            let _ = write!(columns, "{name} ");
        }
        f.debug_struct("ClickHouseSink")
            .field("url", &self.settings.url)
            .field("table", &self.settings.table)
            .field("columns", &columns.trim_end())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sink_with(columns: &[(&str, &str)]) -> ClickHouseSink {
        ClickHouseSink {
            http: reqwest::Client::new(),
            settings: ClickHouseSettings::default(),
            columns: columns
                .iter()
                .map(|(n, t)| ((*n).to_owned(), Column::from_type(t)))
                .collect(),
            insert_url: Url::parse("http://127.0.0.1:1/").expect("static url"),
            dedup_tokens: false,
            id_check: None,
        }
    }

    fn shaped(sink: &ClickHouseSink, json: &str) -> String {
        let fields = Fields::parse(json).expect("object");
        let row = Row {
            created_at: Timestamp::from_millis(1_717_200_000_006),
            fields,
        };
        let mut out = String::new();
        sink.shape(&row, &mut out);
        out
    }

    #[test]
    fn shapes_rows_for_the_current_table() {
        let sink = sink_with(&[
            ("name", "LowCardinality(String)"),
            ("properties", "Map(String, String)"),
            ("created_at", "DateTime64(3)"),
            ("groups", "Array(String)"),
            ("latitude", "Nullable(Float32)"),
        ]);
        let row = r#"{"name":"a","extra":1,"properties":{"a":"x","n":2,"z":null},"created_at":"2024-06-01 00:00:00.006","groups":[],"latitude":null}"#;
        assert_eq!(
            shaped(&sink, row),
            r#"{"name":"a","properties":{"a":"x","n":"2"},"created_at":1717200000.006,"groups":[],"latitude":null}"#
        );
    }

    #[test]
    fn shapes_rows_for_clickhouse_18() {
        let sink = sink_with(&[
            ("name", "String"),
            ("properties", "String"),
            ("created_at", "DateTime"),
            ("duration", "UInt64"),
            ("profile_id", "String"),
        ]);
        let row = r#"{"name":"a","properties":{"a":"x"},"created_at":"2024-06-01T00:00:00.006Z","duration":"5","profile_id":42}"#;
        assert_eq!(
            shaped(&sink, row),
            r#"{"name":"a","properties":"{\"a\":\"x\"}","created_at":1717200000,"duration":5,"profile_id":"42"}"#
        );
    }

    #[test]
    fn reads_exception_codes_of_old_and_new_servers() {
        assert_eq!(
            exception_code("Code: 27, e.displayText() = DB::Exception: Cannot parse"),
            Some(27)
        );
        assert_eq!(exception_code("Code: 60. DB::Exception: Table"), Some(60));
        assert!(supports_dedup_tokens("26.9.2.1"));
        assert!(!supports_dedup_tokens("18.16.1"));
    }
}
