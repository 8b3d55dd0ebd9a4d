//! The bootstrap file (`agent.json`, wire.md §3) and the Go durations it
//! holds: any bytes, never a panic; a refusal always says why; what is
//! accepted satisfies the checks `Bootstrap::parse` promises.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use serviceradar_agent::config::bootstrap::{Bootstrap, Security};
use serviceradar_agent::config::duration::parse_go_duration_str;

fuzz_target!(|data: &[u8]| {
    // The file is read with `read_to_string`: non-UTF-8 never gets here.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = parse_go_duration_str(text) {
        assert!(
            e.contains("duration"),
            "duration error without context: {e}"
        );
    }
    let base = Path::new("/etc/serviceradar");
    match Bootstrap::parse(text, base) {
        Err(reason) => assert!(!reason.trim().is_empty(), "empty error for {text:?}"),
        Ok(b) => {
            assert!(!b.agent_id.is_empty() && !b.agent_id.contains('.'));
            assert!(!b.partition.is_empty() && b.partition.len() <= 128);
            assert!(b.gateway_addr.contains(':'));
            assert!((1..=1000).contains(&b.gateway.chunk_max_updates));
            assert!(b.restart.max_restarts >= 1);
            assert!(b.restart.backoff_cap >= b.restart.backoff_base);
            assert!(b.source_http.retry_cap >= b.source_http.retry_base);
            assert!(b.state_dir.is_absolute());
            if let Security::Mtls { files, server_name } = &b.security {
                // Relative names resolve against an absolute base.
                assert!(files.cert_file.is_absolute());
                assert!(files.key_file.is_absolute());
                assert!(files.ca_file.is_absolute());
                assert!(!server_name.is_empty());
            }
        }
    }
});
