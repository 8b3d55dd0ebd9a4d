//! The shipped example configs parse.

use std::path::Path;

#[test]
fn example_configs_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples");
    let agent =
        serviceradar_agent::config::bootstrap::Bootstrap::load(&dir.join("agent.json")).unwrap();
    assert!(agent.warnings.is_empty(), "{:?}", agent.warnings);
    let gateway =
        serviceradar_agent::gateway::GatewayConfig::load(&dir.join("gateway.json")).unwrap();
    assert_eq!(gateway.agents.len(), 1);
}
