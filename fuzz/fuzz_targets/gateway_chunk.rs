//! The gateway's `results` message parser (wire.md §5–6, gateway.md §4):
//! any bytes, never a panic; its three readers (scanner, serde reader,
//! reference) agree wherever they answer; keeping devices or not changes
//! nothing but the devices; a refusal is INVALID_ARGUMENT and says where.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serviceradar_agent::gateway::ingest::{
    each_reader, parse_results, ParsedResults, UpdatePolicy,
};
use serviceradar_agent::gateway::validate::Violation;

fn without_devices(parsed: &ParsedResults) -> ParsedResults {
    let mut parsed = parsed.clone();
    for part in &mut parsed.parts {
        part.devices.clear();
    }
    parsed
}

fuzz_target!(|data: &[u8]| {
    let policy = UpdatePolicy::new("site-a", ["lab".to_owned()]);
    let mut outcomes = Vec::new();
    for keep in [false, true] {
        let answers = each_reader(data, &policy, keep);
        match (&answers.reference, &answers.serde) {
            (Ok(expected), Some(Ok(got))) => assert_eq!(got, expected, "serde reader, keep={keep}"),
            (Err(_), Some(Err(_)) | None) => {}
            (Ok(_), _) => panic!("the serde reader refuses a valid message (keep={keep})"),
            (Err(_), Some(Ok(_))) => {
                panic!("the serde reader accepts an invalid message (keep={keep})")
            }
        }
        if let Some(scanned) = &answers.scanner {
            assert_eq!(Ok(scanned), answers.reference.as_ref(), "scanner");
        }
        let parsed = parse_results(data, &policy, keep);
        assert_eq!(parsed, answers.reference, "parse_results, keep={keep}");
        match &parsed {
            Err(violation) => {
                assert_eq!(violation.code, Violation::invalid("").code);
                assert!(
                    violation
                        .reason
                        .starts_with("results message is not a JSON array: ")
                        && violation.reason.contains(" line "),
                    "{}",
                    violation.reason
                );
            }
            Ok(parsed) => {
                for part in &parsed.parts {
                    assert!(part.chunk_index < part.total_chunks && !part.run_id.is_empty());
                    if keep {
                        assert_eq!(part.devices.len() as u64, part.accepted);
                    } else {
                        assert!(part.devices.is_empty());
                    }
                }
            }
        }
        outcomes.push(parsed.map(|p| without_devices(&p)));
    }
    assert_eq!(
        outcomes[0], outcomes[1],
        "keeping devices changed the outcome"
    );
});
