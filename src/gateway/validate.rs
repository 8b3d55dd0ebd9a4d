//! The rules of wire.md §7 as pure functions: a per-stream state machine for
//! the StreamStatus envelope and per-service checks shared with PushStatus.

use tonic::Code;

use crate::proto::{GatewayServiceStatus, GatewayStatusChunk};

pub const MAX_SERVICES_PER_STREAM: usize = 5000;
pub const MAX_SERVICE_NAME_BYTES: usize = 255;
pub const MAX_SERVICE_TYPE_BYTES: usize = 64;
pub const MAX_SOURCE_BYTES: usize = 64;
pub const MAX_RESULTS_MESSAGE_BYTES: usize = 15 * 1024 * 1024;
pub const MAX_STATUS_MESSAGE_BYTES: usize = 4096;
/// gRPC decoding limit: a 15 MiB results message plus envelope headroom.
pub const MAX_DECODING_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// `source` of services carrying sync results.
pub const RESULTS_SOURCE: &str = "results";

/// A broken rule: the gRPC code to answer with and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub code: Code,
    pub reason: String,
}

impl Violation {
    pub fn invalid(reason: impl Into<String>) -> Self {
        Self {
            code: Code::InvalidArgument,
            reason: reason.into(),
        }
    }
    pub fn denied(reason: impl Into<String>) -> Self {
        Self {
            code: Code::PermissionDenied,
            reason: reason.into(),
        }
    }
    pub fn exhausted(reason: impl Into<String>) -> Self {
        Self {
            code: Code::ResourceExhausted,
            reason: reason.into(),
        }
    }
    pub fn to_status(&self) -> tonic::Status {
        tonic::Status::new(self.code, self.reason.clone())
    }
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.reason)
    }
}

/// `agent_id` of a request against the certificate's component id: blank is
/// INVALID_ARGUMENT, any other difference PERMISSION_DENIED.
pub fn check_agent_id(claimed: &str, certified: &str) -> Result<(), Violation> {
    if claimed.trim().is_empty() {
        return Err(Violation::invalid("agent_id is required"));
    }
    if claimed != certified {
        return Err(Violation::denied(format!(
            "agent_id {claimed:?} does not match the client certificate ({certified:?})"
        )));
    }
    Ok(())
}

/// Per-service rules. Status messages (any source but `results`) are truncated
/// to 4096 bytes in place; oversized results messages are RESOURCE_EXHAUSTED.
pub fn check_service(service: &mut GatewayServiceStatus) -> Result<(), Violation> {
    let name = &service.service_name;
    if name.trim().is_empty() {
        return Err(Violation::invalid("service_name is required"));
    }
    if name.len() > MAX_SERVICE_NAME_BYTES {
        return Err(Violation::invalid(format!(
            "service_name exceeds {MAX_SERVICE_NAME_BYTES} bytes"
        )));
    }
    if has_line_control(name) {
        return Err(Violation::invalid("service_name contains CR, LF or TAB"));
    }
    if service.service_type.len() > MAX_SERVICE_TYPE_BYTES
        || has_line_control(&service.service_type)
    {
        return Err(Violation::invalid(format!(
            "service_type of {name:?} is longer than {MAX_SERVICE_TYPE_BYTES} bytes or contains CR, LF or TAB"
        )));
    }
    if service.source.len() > MAX_SOURCE_BYTES || has_line_control(&service.source) {
        return Err(Violation::invalid(format!(
            "source of {name:?} is longer than {MAX_SOURCE_BYTES} bytes or contains CR, LF or TAB"
        )));
    }
    if service.source == RESULTS_SOURCE {
        if service.message.len() > MAX_RESULTS_MESSAGE_BYTES {
            return Err(Violation::exhausted(format!(
                "results message of {name:?} is {} bytes (max {MAX_RESULTS_MESSAGE_BYTES})",
                service.message.len()
            )));
        }
    } else {
        truncate_status_message(&mut service.message);
    }
    Ok(())
}

/// Cuts a status message to 4096 bytes, backing off to a UTF-8 character
/// boundary when the message is text so the result stays valid text.
pub fn truncate_status_message(message: &mut Vec<u8>) {
    if message.len() <= MAX_STATUS_MESSAGE_BYTES {
        return;
    }
    let mut cut = MAX_STATUS_MESSAGE_BYTES;
    if std::str::from_utf8(message).is_ok() {
        // Continuation bytes are 0b10xx_xxxx; at most 3 of them to skip.
        while cut > 0 && (message[cut] & 0xC0) == 0x80 {
            cut -= 1;
        }
    }
    message.truncate(cut);
}

fn has_line_control(s: &str) -> bool {
    s.contains(['\r', '\n', '\t'])
}

/// The envelope state machine of one StreamStatus call.
#[derive(Debug)]
pub struct StreamValidator {
    certified_id: String,
    stream_agent_id: Option<String>,
    total_chunks: Option<i32>,
    next_index: i32,
    services: usize,
    final_seen: bool,
}

impl StreamValidator {
    /// `certified_id`: the component id from the client certificate.
    pub fn new(certified_id: &str) -> Self {
        Self {
            certified_id: certified_id.to_owned(),
            stream_agent_id: None,
            total_chunks: None,
            next_index: 0,
            services: 0,
            final_seen: false,
        }
    }

    /// Checks one chunk (and its services, truncating status messages).
    pub fn accept(&mut self, chunk: &mut GatewayStatusChunk) -> Result<(), Violation> {
        if self.final_seen {
            return Err(Violation::invalid("chunk received after the final chunk"));
        }
        let agent_id = chunk.agent_id.as_str();
        if agent_id.trim().is_empty() {
            return Err(Violation::invalid("agent_id is required"));
        }
        match &self.stream_agent_id {
            Some(first) if first != agent_id => {
                return Err(Violation::invalid("agent_id changed mid-stream"));
            }
            Some(_) => {}
            None => {
                check_agent_id(agent_id, &self.certified_id)?;
                self.stream_agent_id = Some(agent_id.to_owned());
            }
        }
        self.services += chunk.services.len();
        if self.services > MAX_SERVICES_PER_STREAM {
            return Err(Violation::exhausted(format!(
                "too many services in one stream (max {MAX_SERVICES_PER_STREAM})"
            )));
        }
        let total = chunk.total_chunks;
        if total <= 0 {
            return Err(Violation::invalid("total_chunks must be > 0"));
        }
        match self.total_chunks {
            Some(pinned) if pinned != total => {
                return Err(Violation::invalid("total_chunks changed mid-stream"))
            }
            Some(_) => {}
            None => self.total_chunks = Some(total),
        }
        let index = chunk.chunk_index;
        if index < 0 || index >= total {
            return Err(Violation::invalid(format!(
                "chunk_index {index} outside 0..{total}"
            )));
        }
        if index != self.next_index {
            return Err(Violation::invalid(format!(
                "unexpected chunk_index {index} (expected {})",
                self.next_index
            )));
        }
        if chunk.is_final && index != total - 1 {
            return Err(Violation::invalid(format!(
                "is_final on chunk {index} of {total} (only the last chunk is final)"
            )));
        }
        for service in &mut chunk.services {
            check_service(service)?;
        }
        self.next_index += 1;
        self.final_seen = chunk.is_final;
        Ok(())
    }

    /// At the end of the stream: it must have ended with the final chunk.
    /// Returns the number of chunks.
    pub fn finish(&self) -> Result<u32, Violation> {
        if !self.final_seen {
            return Err(Violation::invalid("stream ended without the final chunk"));
        }
        Ok(self.next_index as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(source: &str, message: &[u8]) -> GatewayServiceStatus {
        GatewayServiceStatus {
            service_name: "sync".into(),
            service_type: "sync".into(),
            source: source.into(),
            available: true,
            message: message.to_vec(),
            ..Default::default()
        }
    }

    fn chunk(agent: &str, index: i32, total: i32, is_final: bool) -> GatewayStatusChunk {
        GatewayStatusChunk {
            agent_id: agent.into(),
            chunk_index: index,
            total_chunks: total,
            is_final,
            services: vec![service("results", b"[]")],
            ..Default::default()
        }
    }

    fn run(chunks: Vec<GatewayStatusChunk>) -> Result<u32, Violation> {
        let mut v = StreamValidator::new("a1");
        for mut c in chunks {
            v.accept(&mut c)?;
        }
        v.finish()
    }

    fn code(r: Result<u32, Violation>) -> Code {
        r.unwrap_err().code
    }

    #[test]
    fn valid_streams() {
        assert_eq!(run(vec![chunk("a1", 0, 1, true)]), Ok(1));
        assert_eq!(
            run(vec![
                chunk("a1", 0, 3, false),
                chunk("a1", 1, 3, false),
                chunk("a1", 2, 3, true)
            ]),
            Ok(3)
        );
    }

    #[test]
    fn sequence_errors_are_invalid_argument() {
        let cases = vec![
            vec![],
            vec![chunk("a1", 0, 2, false), chunk("a1", 2, 2, true)],
            vec![chunk("a1", 1, 2, false)],
            vec![chunk("a1", 0, 3, true)],
            vec![chunk("a1", 0, 2, false), chunk("a1", 1, 2, false)],
            vec![chunk("a1", 0, 2, false)],
            vec![chunk("a1", 0, 0, true)],
            vec![chunk("a1", 0, 2, false), chunk("a1", 1, 3, true)],
            vec![chunk("a1", 0, 1, true), chunk("a1", 1, 1, true)],
            vec![chunk("a1", -1, 1, true)],
            vec![chunk(" ", 0, 1, true)],
            vec![chunk("a1", 0, 1, false), chunk("a1", 0, 1, true)],
        ];
        for (i, c) in cases.into_iter().enumerate() {
            assert_eq!(code(run(c)), Code::InvalidArgument, "case {i}");
        }
    }

    #[test]
    fn identity_mismatch_is_permission_denied() {
        assert_eq!(
            code(run(vec![chunk("a2", 0, 1, true)])),
            Code::PermissionDenied
        );
        // A change after the first chunk is a sequence error.
        assert_eq!(
            code(run(vec![chunk("a1", 0, 2, false), chunk("a2", 1, 2, true)])),
            Code::InvalidArgument
        );
    }

    #[test]
    fn service_limit_is_per_stream() {
        let mut first = chunk("a1", 0, 2, false);
        first.services = vec![service("results", b"[]"); 3000];
        let mut second = chunk("a1", 1, 2, true);
        second.services = vec![service("results", b"[]"); 2000];
        assert_eq!(run(vec![first.clone(), second.clone()]), Ok(2));
        second.services.push(service("results", b"[]"));
        assert_eq!(code(run(vec![first, second])), Code::ResourceExhausted);
    }

    #[test]
    fn service_rules() {
        let mut ok = service("results", b"[]");
        assert!(check_service(&mut ok).is_ok());
        for (name, ty, source) in [
            ("", "sync", "results"),
            ("  ", "sync", "results"),
            ("a\nb", "sync", "results"),
            ("a\tb", "sync", "results"),
            ("a\rb", "sync", "results"),
            (&"n".repeat(256) as &str, "sync", "results"),
            ("sync", &"t".repeat(65) as &str, "results"),
            ("sync", "sync", &"s".repeat(65) as &str),
        ] {
            let mut s = service(source, b"[]");
            s.service_name = name.into();
            s.service_type = ty.into();
            assert_eq!(
                check_service(&mut s).unwrap_err().code,
                Code::InvalidArgument,
                "{name:?}"
            );
        }
        let mut max = service("results", b"");
        max.service_name = "n".repeat(255);
        assert!(check_service(&mut max).is_ok());
    }

    #[test]
    fn results_size_limit_and_status_truncation() {
        let mut big = service("results", &vec![b' '; MAX_RESULTS_MESSAGE_BYTES + 1]);
        assert_eq!(
            check_service(&mut big).unwrap_err().code,
            Code::ResourceExhausted
        );
        let mut at_limit = service("results", &vec![b' '; MAX_RESULTS_MESSAGE_BYTES]);
        assert!(check_service(&mut at_limit).is_ok());

        let mut status = service("status", &vec![b'x'; 10_000]);
        check_service(&mut status).unwrap();
        assert_eq!(status.message.len(), MAX_STATUS_MESSAGE_BYTES);

        // 4095 ASCII bytes then a 2-byte character straddling the limit.
        let mut text = vec![b'x'; 4095];
        text.extend_from_slice("é and more".as_bytes());
        let mut status = service("status", &text);
        check_service(&mut status).unwrap();
        assert_eq!(status.message.len(), 4095);
        assert!(std::str::from_utf8(&status.message).is_ok());
    }

    #[test]
    fn agent_id_check() {
        assert_eq!(
            check_agent_id("", "a").unwrap_err().code,
            Code::InvalidArgument
        );
        assert_eq!(
            check_agent_id("b", "a").unwrap_err().code,
            Code::PermissionDenied
        );
        assert!(check_agent_id("a", "a").is_ok());
    }
}
