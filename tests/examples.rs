//! The shipped example configs parse.

use std::path::Path;

use serviceradar_agent::config::bootstrap::SourceHttpPolicy;
use serviceradar_agent::config::sources::{parse_config_json, SourceEntry};
use serviceradar_agent::sources::runner::SourceRunner;

#[test]
fn example_configs_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples");
    let agent =
        serviceradar_agent::config::bootstrap::Bootstrap::load(&dir.join("agent.json")).unwrap();
    assert!(agent.warnings.is_empty(), "{:?}", agent.warnings);
    let gateway =
        serviceradar_agent::gateway::GatewayConfig::load(&dir.join("gateway.json")).unwrap();
    assert_eq!(gateway.agents.len(), 1);

    // Every example source is valid and its client builds.
    for agent in gateway.agents.values() {
        let payload = serde_json::json!({"sources": agent.sources}).to_string();
        let config = parse_config_json(payload.as_bytes()).unwrap();
        assert_eq!(config.sources.len(), 3);
        for (name, entry) in config.sources {
            match entry {
                SourceEntry::Valid(source) => {
                    assert!(source.warnings.is_empty(), "{name}: {:?}", source.warnings);
                    if let Err(e) = SourceRunner::new(&source, &SourceHttpPolicy::default()) {
                        panic!("{name}: {e}");
                    }
                }
                SourceEntry::Invalid { reason, .. } => panic!("{name}: {reason}"),
            }
        }
    }
}
