//! The protobuf envelopes around chunks and run reports (wire.md §6).
//!
//! Two numberings meet here. A chunk's `sync_meta` (inside `message`) is
//! numbered per *run*, so core sees one run however many streams carry it;
//! the envelope's `chunk_index`/`total_chunks` are numbered per *stream*,
//! because the gateway checks every stream on its own (0, 1, 2… ending
//! with `is_final`).

use std::borrow::Cow;

use serde::Serialize;

use crate::proto::{GatewayServiceStatus, GatewayStatusChunk, GatewayStatusRequest};

/// Gateway limit on a status message; longer ones are truncated there,
/// which would break the JSON, so the report is cut to size here.
pub const MAX_REPORT_BYTES: usize = 4096;

/// Gateway limit on `service_name`.
const MAX_SERVICE_NAME_BYTES: usize = 255;

/// Appended to an error text that had to be shortened.
const TRUNCATED: &str = "…[truncated]";

/// The agent-level fields every envelope repeats.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvelopeFields {
    /// The agent's own id: the gateway checks it against the client
    /// certificate, so source overrides never go here.
    pub agent_id: String,
    pub gateway_id: String,
    pub partition: String,
    pub source_ip: String,
    pub version: String,
    pub hostname: String,
    pub os: String,
    pub arch: String,
}

impl EnvelopeFields {
    /// Chunk `stream_index` of `stream_total` in one StreamStatus call,
    /// carrying one `results` service whose message is the chunk's JSON.
    pub fn status_chunk(
        &self,
        stream_index: i32,
        stream_total: i32,
        message: Vec<u8>,
        timestamp_secs: i64,
    ) -> GatewayStatusChunk {
        GatewayStatusChunk {
            services: vec![self.service("sync".to_owned(), "results", true, message)],
            gateway_id: self.gateway_id.clone(),
            agent_id: self.agent_id.clone(),
            timestamp: timestamp_secs,
            partition: self.partition.clone(),
            source_ip: self.source_ip.clone(),
            is_final: stream_index == stream_total - 1,
            chunk_index: stream_index,
            total_chunks: stream_total,
            version: self.version.clone(),
            hostname: self.hostname.clone(),
            os: self.os.clone(),
            arch: self.arch.clone(),
            ..Default::default()
        }
    }

    /// The PushStatus request reporting one finished run, successful or not.
    pub fn run_report(&self, report: &RunReport, timestamp_nanos: i64) -> GatewayStatusRequest {
        let name = service_name(&report.source);
        let message = report.to_json_within(MAX_REPORT_BYTES);
        self.status_request(
            vec![self.service(name, "status", report.ok, message)],
            timestamp_nanos,
        )
    }

    /// A PushStatus request from this agent; no services makes it a pure
    /// heartbeat.
    pub fn status_request(
        &self,
        services: Vec<GatewayServiceStatus>,
        timestamp_nanos: i64,
    ) -> GatewayStatusRequest {
        GatewayStatusRequest {
            services,
            gateway_id: self.gateway_id.clone(),
            agent_id: self.agent_id.clone(),
            timestamp: timestamp_nanos,
            partition: self.partition.clone(),
            source_ip: self.source_ip.clone(),
            version: self.version.clone(),
            hostname: self.hostname.clone(),
            os: self.os.clone(),
            arch: self.arch.clone(),
            ..Default::default()
        }
    }

    fn service(
        &self,
        service_name: String,
        source: &str,
        available: bool,
        message: Vec<u8>,
    ) -> GatewayServiceStatus {
        GatewayServiceStatus {
            service_name,
            available,
            message,
            service_type: "sync".to_owned(),
            agent_id: self.agent_id.clone(),
            gateway_id: self.gateway_id.clone(),
            partition: self.partition.clone(),
            source: source.to_owned(),
            ..Default::default()
        }
    }
}

/// `sync:<source name>`, made acceptable to the gateway: CR, LF and TAB
/// become spaces and the name is cut to 255 bytes. Source names come from
/// the config and may contain anything.
fn service_name(source: &str) -> String {
    let mut name: String = format!("sync:{source}")
        .chars()
        .map(|c| {
            if matches!(c, '\r' | '\n' | '\t') {
                ' '
            } else {
                c
            }
        })
        .collect();
    truncate_at_char_boundary(&mut name, MAX_SERVICE_NAME_BYTES);
    name
}

fn truncate_at_char_boundary(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// The outcome of one run, as pushed after it (wire.md §6 run reports).
/// Serializable because a spooled run keeps its report on disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RunReport {
    /// The source's name (the key in `config_json.sources`).
    pub source: String,
    /// `armis`, `netbox` or `faker`.
    pub source_type: String,
    pub run_id: String,
    pub ok: bool,
    /// A scheduled run not started because the source's previous run is
    /// still waiting for delivery (`result: "skipped"`; `ok` stays true:
    /// nothing failed).
    pub skipped: bool,
    pub device_count: u64,
    pub duration_ms: u64,
    pub error: Option<String>,
    /// The class of failure: `auth`, `rate_limit`, `network`,
    /// `server_error`, `bad_response`, `config`, `staging`, `deadline`, …
    pub error_kind: Option<String>,
    /// Something a successful run wants the operator to know (device
    /// objects skipped as unreadable).
    pub warning: Option<String>,
    pub skipped_no_ip: u64,
    pub blacklisted: u64,
    pub skipped_duplicate: u64,
    pub skipped_invalid: u64,
    pub pages: u64,
    pub retries: u64,
}

/// The JSON shape of a report: `type` and `result` are the wire names.
#[derive(Serialize)]
struct ReportJson<'a> {
    source: Cow<'a, str>,
    #[serde(rename = "type")]
    source_type: Cow<'a, str>,
    run_id: Cow<'a, str>,
    result: &'static str,
    device_count: u64,
    duration_ms: u64,
    error: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_kind: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    warning: Option<Cow<'a, str>>,
    skipped_no_ip: u64,
    blacklisted: u64,
    skipped_duplicate: u64,
    skipped_invalid: u64,
    pages: u64,
    retries: u64,
}

impl RunReport {
    /// Copies a run's counters into the report.
    pub fn set_counts(&mut self, counts: &crate::sources::RunCounts) {
        self.device_count = counts.devices;
        self.skipped_no_ip = counts.skipped_no_ip;
        self.blacklisted = counts.blacklisted;
        self.skipped_duplicate = counts.skipped_duplicate;
        self.skipped_invalid = counts.skipped_invalid;
        self.pages = counts.pages;
        self.retries = counts.retries;
    }

    fn json_view(&self) -> ReportJson<'_> {
        ReportJson {
            source: Cow::Borrowed(&self.source),
            source_type: Cow::Borrowed(&self.source_type),
            run_id: Cow::Borrowed(&self.run_id),
            result: match (self.ok, self.skipped) {
                (_, true) => "skipped",
                (true, false) => "success",
                (false, false) => "failed",
            },
            device_count: self.device_count,
            duration_ms: self.duration_ms,
            error: self.error.as_deref().map(Cow::Borrowed),
            error_kind: self.error_kind.as_deref(),
            warning: self.warning.as_deref().map(Cow::Borrowed),
            skipped_no_ip: self.skipped_no_ip,
            blacklisted: self.blacklisted,
            skipped_duplicate: self.skipped_duplicate,
            skipped_invalid: self.skipped_invalid,
            pages: self.pages,
            retries: self.retries,
        }
    }

    /// The report as JSON of at most `max` bytes. Text is shortened, never
    /// the JSON: the error first, then (for absurdly long names) the other
    /// strings, longest first, each cut at a character boundary and marked.
    pub fn to_json_within(&self, max: usize) -> Vec<u8> {
        let mut view = self.json_view();
        let json = encode(&view);
        if json.len() <= max {
            return json;
        }
        let mut names = [Text::Source, Text::SourceType, Text::RunId];
        names.sort_by_key(|t| std::cmp::Reverse(t.get(&view).len()));
        for text in [Text::Warning, Text::Error].into_iter().chain(names) {
            let original = text.get(&view).to_owned();
            // The longest prefix that fits; JSON escaping makes the encoded
            // length hard to predict, so search (a report is built once a run).
            let (mut fits, mut too_long) = (None, original.len() + 1);
            let mut low = 0;
            while low < too_long {
                let keep = low + (too_long - low) / 2;
                text.set(&mut view, shortened(&original, keep));
                let candidate = encode(&view);
                if candidate.len() <= max {
                    fits = Some(candidate);
                    low = keep + 1;
                } else {
                    too_long = keep;
                }
            }
            if let Some(json) = fits {
                return json;
            }
            text.set(&mut view, String::new());
        }
        // Unreachable with numbers alone for any sane `max`: every string is
        // empty by now.
        encode(&view)
    }
}

/// Strings and integers always serialize; the fallback only keeps this path
/// free of panics.
fn encode(view: &ReportJson<'_>) -> Vec<u8> {
    serde_json::to_vec(view).unwrap_or_else(|_| b"{}".to_vec())
}

/// At most `keep` bytes of `text`, marked when something was cut.
fn shortened(text: &str, keep: usize) -> String {
    if keep >= text.len() {
        return text.to_owned();
    }
    let mut cut = text.to_owned();
    truncate_at_char_boundary(&mut cut, keep);
    if !cut.is_empty() {
        cut.push_str(TRUNCATED);
    }
    cut
}

/// The report strings that may be shortened.
#[derive(Clone, Copy)]
enum Text {
    Warning,
    Error,
    Source,
    SourceType,
    RunId,
}

impl Text {
    fn get<'v>(self, view: &'v ReportJson<'_>) -> &'v str {
        match self {
            Text::Warning => view.warning.as_deref().unwrap_or(""),
            Text::Error => view.error.as_deref().unwrap_or(""),
            Text::Source => &view.source,
            Text::SourceType => &view.source_type,
            Text::RunId => &view.run_id,
        }
    }

    fn set(self, view: &mut ReportJson<'_>, value: String) {
        let value = Cow::Owned(value);
        match self {
            // A missing error stays missing (`null`), an empty one is "".
            Text::Error => {
                if view.error.is_some() {
                    view.error = Some(value);
                }
            }
            Text::Warning => {
                if view.warning.is_some() {
                    view.warning = Some(value);
                }
            }
            Text::Source => view.source = value,
            Text::SourceType => view.source_type = value,
            Text::RunId => view.run_id = value,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> EnvelopeFields {
        EnvelopeFields {
            agent_id: "agent-1".into(),
            gateway_id: "gw-1".into(),
            partition: "default".into(),
            source_ip: "10.0.0.9".into(),
            version: "0.1.0".into(),
            hostname: "edge".into(),
            os: "linux".into(),
            arch: "x86_64".into(),
        }
    }

    fn report(error: Option<String>) -> RunReport {
        RunReport {
            source: "Armis Production".into(),
            source_type: "armis".into(),
            run_id: "run-7".into(),
            ok: error.is_none(),
            device_count: 12,
            duration_ms: 345,
            error,
            skipped_no_ip: 1,
            blacklisted: 2,
            ..RunReport::default()
        }
    }

    #[test]
    fn status_chunk_matches_wire_md() {
        let c = fields().status_chunk(2, 3, b"[]".to_vec(), 1_700_000_000);
        assert_eq!(c.chunk_index, 2);
        assert_eq!(c.total_chunks, 3);
        assert!(c.is_final);
        assert_eq!(c.timestamp, 1_700_000_000);
        assert_eq!(
            (
                c.agent_id.as_str(),
                c.gateway_id.as_str(),
                c.partition.as_str()
            ),
            ("agent-1", "gw-1", "default")
        );
        assert_eq!(
            (
                c.version.as_str(),
                c.hostname.as_str(),
                c.os.as_str(),
                c.arch.as_str()
            ),
            ("0.1.0", "edge", "linux", "x86_64")
        );
        assert_eq!(c.source_ip, "10.0.0.9");
        let [s] = c.services.as_slice() else {
            panic!("one service")
        };
        assert_eq!(
            (
                s.service_name.as_str(),
                s.service_type.as_str(),
                s.source.as_str()
            ),
            ("sync", "sync", "results")
        );
        assert!(s.available);
        assert_eq!(s.message, b"[]");
        assert_eq!(
            (
                s.agent_id.as_str(),
                s.gateway_id.as_str(),
                s.partition.as_str()
            ),
            ("agent-1", "gw-1", "default")
        );
        assert!(!fields().status_chunk(0, 3, Vec::new(), 0).is_final);
    }

    #[test]
    fn run_report_matches_wire_md() {
        let r = fields().run_report(&report(None), 5);
        assert_eq!(r.timestamp, 5);
        let [s] = r.services.as_slice() else {
            panic!("one service")
        };
        assert_eq!(
            (
                s.service_name.as_str(),
                s.service_type.as_str(),
                s.source.as_str()
            ),
            ("sync:Armis Production", "sync", "status")
        );
        assert!(s.available);
        let json: serde_json::Value = serde_json::from_slice(&s.message).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"source":"Armis Production","type":"armis","run_id":"run-7","result":"success",
                "device_count":12,"duration_ms":345,"error":null,"skipped_no_ip":1,"blacklisted":2,
                "skipped_duplicate":0,"skipped_invalid":0,"pages":0,"retries":0})
        );
        let failed = fields().run_report(&report(Some("HTTP 503 from /api/v1/search/".into())), 5);
        let s = &failed.services[0];
        assert!(!s.available);
        let json: serde_json::Value = serde_json::from_slice(&s.message).unwrap();
        assert_eq!(json["result"], "failed");
        assert_eq!(json["error"], "HTTP 503 from /api/v1/search/");
    }

    #[test]
    fn long_errors_are_cut_keeping_valid_json() {
        for unit in ["x", "\"", "\u{1}", "é", "😀"] {
            let r = report(Some(unit.repeat(10_000)));
            let json = r.to_json_within(MAX_REPORT_BYTES);
            assert!(json.len() <= MAX_REPORT_BYTES, "{unit:?}: {}", json.len());
            let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
            let error = v["error"].as_str().unwrap();
            assert!(
                error.ends_with(TRUNCATED) && json.len() > MAX_REPORT_BYTES - 16,
                "{unit:?}"
            );
            assert_eq!(v["device_count"], 12);
        }
    }

    #[test]
    fn absurd_names_are_cut_too_and_service_name_is_sanitized() {
        let mut r = report(Some("e".repeat(100)));
        r.source = "s\t\r\n".repeat(5_000);
        let json = r.to_json_within(MAX_REPORT_BYTES);
        assert!(json.len() <= MAX_REPORT_BYTES);
        serde_json::from_slice::<serde_json::Value>(&json).unwrap();
        let req = fields().run_report(&r, 0);
        let name = &req.services[0].service_name;
        assert!(name.len() <= 255 && !name.contains(['\r', '\n', '\t']));
        assert!(name.starts_with("sync:s"));
    }
}
