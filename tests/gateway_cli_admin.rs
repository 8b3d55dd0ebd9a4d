//! The admin CLI (`serviceradar-agent gateway --config F tenant|agent|source
//! …`) as an operator runs it: the real binary against a gateway config
//! with a database. Agents are registered through the library, as the
//! gateway does on Hello (the onboarding test runs the real thing). Both
//! tests run on both store backends.

use std::path::Path;
use std::process::Output;

use serde_json::{json, Value};
use serviceradar_agent::gateway::open_store;
use serviceradar_agent::gateway::registry::AgentRecord;

mod admin_cli_support;
mod backend_support;
mod gateway_support;

use admin_cli_support::{expect_failure, expect_success, AdminCli};
use backend_support::Backend;
use gateway_support::{assert_nowhere_in_clear, database_contents};

/// Credential values that must never show up in output or on disk.
const SECRETS: [&str; 3] = [
    "armis-secret-4f7c1d",
    "armis-key-9b2e55",
    "file-secret-77aa31",
];

/// The admin CLI, checking that no command ever prints a credential.
struct Gateway {
    cli: AdminCli,
}

impl Gateway {
    async fn on(backend: Backend) -> Self {
        Self {
            cli: AdminCli::on(backend).await,
        }
    }

    fn path(&self) -> &Path {
        self.cli.path()
    }

    fn run(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let out = self.cli.run(args, stdin);
        // Whatever the command, no credential value is ever printed or logged.
        for text in [&out.stdout, &out.stderr] {
            let text = String::from_utf8_lossy(text);
            for secret in SECRETS {
                assert!(!text.contains(secret), "{args:?} printed {secret}:\n{text}");
            }
        }
        out
    }

    /// Runs a command that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        self.ok_with_stdin(args, None)
    }

    fn ok_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> String {
        expect_success(args, &self.run(args, stdin))
    }

    /// Runs a command that must fail; returns its `error: …` line.
    fn fails(&self, args: &[&str]) -> String {
        expect_failure(args, &self.run(args, None))
    }

    fn show(&self, tenant: &str, source: &str) -> Value {
        serde_json::from_str(&self.ok(&["source", "show", "--tenant", tenant, source])).unwrap()
    }

    /// Registers agents of tenant `slug` the way a Hello does.
    async fn register(&self, slug: &str, agents: &[(&str, &[&str])]) {
        let store = open_store(self.cli.database()).await.unwrap();
        let tenant = store.tenant_by_slug(slug).await.unwrap().unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        for (agent_id, capabilities) in agents {
            store
                .upsert_agent(AgentRecord {
                    tenant: tenant.id.clone(),
                    agent_id: agent_id.to_string(),
                    partition: "site-a".into(),
                    version: "0.1.0".into(),
                    hostname: "edge-host".into(),
                    os: "linux".into(),
                    arch: "amd64".into(),
                    capabilities: capabilities.iter().map(|c| c.to_string()).collect(),
                    first_seen: now,
                    last_seen: now,
                })
                .await
                .unwrap();
        }
    }
}

fn row<'a>(table: &'a str, needle: &str) -> &'a str {
    table
        .lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no row with {needle:?} in\n{table}"))
}

async fn tenants_are_added_and_listed_and_reserved_names_refused(backend: Backend) {
    let gw = Gateway::on(backend).await;
    let added = gw.ok(&["tenant", "add", "acme", "--name", "Acme Corp"]);
    assert!(added.starts_with("tenant acme added (id "), "{added}");
    gw.ok(&[
        "tenant",
        "add",
        "globex",
        "--id",
        "6f1c2a9e-7b4d-4c1e-9a8f-2d5e6b7c8d90",
    ]);

    let list = gw.ok(&["tenant", "list"]);
    let header = list.lines().next().unwrap();
    for column in ["SLUG", "NAME", "ID", "KIND", "CA", "CREATED"] {
        assert!(header.contains(column), "{header}");
    }
    assert!(
        list.lines().nth(1).unwrap().starts_with("platform "),
        "platform first:\n{list}"
    );
    assert!(row(&list, "acme").contains("Acme Corp"));
    assert!(row(&list, "globex").contains("6f1c2a9e-7b4d-4c1e-9a8f-2d5e6b7c8d90"));
    assert!(row(&list, "default").contains("tenant"));

    for reserved in ["platform", "serviceradar-operator"] {
        let err = gw.fails(&["tenant", "add", reserved]);
        assert!(err.contains("reserved"), "{err}");
    }
    let err = gw.fails(&[
        "tenant",
        "add",
        "initech",
        "--id",
        "00000000-0000-0000-0000-000000000000",
    ]);
    assert!(err.contains("nil UUID"), "{err}");
    let err = gw.fails(&["tenant", "add", "acme"]);
    assert!(err.contains("already exists"), "{err}");
    let err = gw.fails(&["tenant", "add", "Not_A_Slug"]);
    assert!(err.contains("lower-case"), "{err}");
    assert!(!gw.ok(&["tenant", "list"]).contains("initech"));
}

async fn sources_are_managed_and_their_credentials_never_leave_sealed(backend: Backend) {
    let gw = Gateway::on(backend).await;
    gw.ok(&["tenant", "add", "acme"]);
    gw.ok(&["tenant", "add", "globex"]);

    // No sync-capable agent yet: the error says to onboard one.
    let faker = [
        "source",
        "add",
        "--tenant",
        "acme",
        "--name",
        "Acme Faker",
        "--type",
        "faker",
    ];
    let err = gw.fails(&faker);
    assert!(
        err.contains("no sync-capable agent") && err.contains("onboard-agent --tenant acme"),
        "{err}"
    );
    let err = gw.fails(&[
        "source", "add", "--tenant", "nobody", "--name", "x", "--type", "faker",
    ]);
    assert!(err.contains("tenant add nobody"), "{err}");
    let err = gw.fails(&[
        "source", "add", "--tenant", "platform", "--name", "x", "--type", "faker",
    ]);
    assert!(err.contains("platform tenant"), "{err}");

    gw.register("acme", &[("edge-1", &["sync"]), ("edge-2", &[])])
        .await;
    gw.register("globex", &[("edge-g", &["sync"])]).await;

    let agents = gw.ok(&["agent", "list"]);
    let header = agents.lines().next().unwrap();
    for column in ["TENANT", "AGENT", "PARTITION", "STATUS", "SYNC"] {
        assert!(header.contains(column), "{header}");
    }
    let edge1 = row(&agents, "edge-1");
    assert!(
        edge1.starts_with("acme ") && edge1.contains("online") && edge1.ends_with("yes"),
        "{edge1}"
    );
    assert!(row(&agents, "edge-2").ends_with("no"));
    let only_globex = gw.ok(&["agent", "list", "--tenant", "globex"]);
    assert!(
        only_globex.contains("edge-g") && !only_globex.contains("edge-1"),
        "{only_globex}"
    );

    // Field errors name the field.
    let err = gw.fails(&[
        "source", "add", "--tenant", "acme", "--name", "Bad", "--type", "armis",
    ]);
    assert!(err.contains("`endpoint`"), "{err}");

    gw.ok(&faker);
    let added = gw.ok(&[
        "source",
        "add",
        "--tenant",
        "acme",
        "--name",
        "Armis Prod",
        "--type",
        "armis",
        "--endpoint",
        "https://acme.armis.example",
        "--agent",
        "edge-1",
        "--partition",
        "site-a",
        "--poll-interval",
        "5m",
        "--discovery-interval",
        "1h",
        "--page-size",
        "500",
        "--query",
        "Corporate=in:devices boundaries:\"Corporate\"",
        "--blacklist",
        "10.255.0.0/16",
        "--setting",
        "prefix=armis/",
        "--setting",
        "insecure_skip_verify=true",
        "--credential",
        &format!("api_secret={}", SECRETS[0]),
    ]);
    assert!(
        added.starts_with("source \"Armis Prod\" added to tenant acme (id ")
            && added.contains("assigned to agent edge-1"),
        "{added}"
    );
    // Assigning to an agent that is not sync-capable, or of another tenant.
    let err = gw.fails(&[
        "source", "add", "--tenant", "acme", "--name", "N", "--type", "faker", "--agent", "edge-2",
    ]);
    assert!(err.contains("`sync` capability"), "{err}");

    let list = gw.ok(&["source", "list"]);
    let header = list.lines().next().unwrap();
    for column in [
        "TENANT",
        "NAME",
        "TYPE",
        "ENABLED",
        "AGENT",
        "PARTITION",
        "STATUS",
        "LAST-SYNC",
        "DEVICES",
        "FAILURES",
    ] {
        assert!(header.contains(column), "{header}");
    }
    let armis = row(&list, "Armis Prod");
    for cell in ["acme", "armis", "yes", "edge-1", "site-a", "idle"] {
        assert!(armis.contains(cell), "{cell} missing from {armis:?}");
    }
    assert!(row(&list, "Acme Faker").contains("unassigned"));
    assert!(
        gw.ok(&["source", "list", "--tenant", "globex"])
            .lines()
            .count()
            == 1
    );

    let shown = gw.show("acme", "Armis Prod");
    assert_eq!(shown["type"], "armis");
    assert_eq!(shown["endpoint"], "https://acme.armis.example");
    assert_eq!(shown["agent_id"], "edge-1");
    assert_eq!(shown["page_size"], 500);
    assert_eq!(shown["credential_keys"], json!(["api_secret"]));
    assert_eq!(
        shown["settings"],
        json!({"prefix": "armis/", "insecure_skip_verify": true})
    );
    assert_eq!(shown["network_blacklist"], json!(["10.255.0.0/16"]));
    assert_eq!(
        shown["queries"],
        json!([{"label": "Corporate", "query": "in:devices boundaries:\"Corporate\""}])
    );
    let id = shown["id"].as_str().unwrap().to_owned();
    assert_eq!(gw.show("acme", &id)["name"], "Armis Prod", "by id too");

    // Update: one credential set, one removed, settings merged.
    let updated = gw.ok(&[
        "source",
        "update",
        "--tenant",
        "acme",
        "Armis Prod",
        "--credential",
        &format!("api_key={}", SECRETS[1]),
        "--unset-credential",
        "api_secret",
        "--page-size",
        "1000",
        "--setting",
        "prefix=armis2/",
        "--unset-setting",
        "insecure_skip_verify",
    ]);
    assert!(updated.contains("updated"), "{updated}");
    let shown = gw.show("acme", "Armis Prod");
    assert_eq!(shown["credential_keys"], json!(["api_key"]));
    assert_eq!(shown["page_size"], 1000);
    assert_eq!(shown["settings"], json!({"prefix": "armis2/"}));
    assert_eq!(shown["poll_interval"], "5m", "untouched fields stay");

    // --credentials-file replaces them all (here from stdin).
    let creds = json!({"secret_key": SECRETS[2], "api_key": "k"}).to_string();
    gw.ok_with_stdin(
        &[
            "source",
            "update",
            "--tenant",
            "acme",
            &id,
            "--credentials-file",
            "-",
        ],
        Some(&creds),
    );
    assert_eq!(
        gw.show("acme", &id)["credential_keys"],
        json!(["api_key", "secret_key"])
    );
    std::fs::write(gw.path().join("bad.json"), format!("[\"{}\"]", SECRETS[2])).unwrap();
    let err = gw.fails(&[
        "source",
        "update",
        "--tenant",
        "acme",
        &id,
        "--credentials-file",
        "bad.json",
    ]);
    assert!(
        err.contains("bad.json") && err.contains("JSON object"),
        "{err}"
    );
    let err = gw.fails(&["source", "update", "--tenant", "acme", &id]);
    assert!(err.contains("nothing to update"), "{err}");

    // Enable / disable.
    assert!(gw
        .ok(&["source", "disable", "--tenant", "acme", "Armis Prod"])
        .contains("disabled"));
    assert_eq!(gw.show("acme", &id)["enabled"], false);
    assert!(row(&gw.ok(&["source", "list"]), "Armis Prod").contains("disabled"));
    gw.ok(&["source", "enable", "--tenant", "acme", "Armis Prod"]);
    assert_eq!(gw.show("acme", &id)["enabled"], true);

    // Assign / unassign; only sync-capable agents of the same tenant.
    let out = gw.ok(&[
        "source",
        "assign",
        "--tenant",
        "acme",
        "Armis Prod",
        "--unassign",
    ]);
    assert!(out.contains("unassigned"), "{out}");
    assert_eq!(gw.show("acme", &id)["agent_id"], Value::Null);
    let err = gw.fails(&[
        "source", "assign", "--tenant", "acme", &id, "--agent", "edge-2",
    ]);
    assert!(err.contains("`sync` capability"), "{err}");
    let err = gw.fails(&[
        "source", "assign", "--tenant", "acme", &id, "--agent", "edge-g",
    ]);
    assert!(err.contains("has no agent \"edge-g\""), "{err}");
    gw.ok(&[
        "source", "assign", "--tenant", "acme", &id, "--agent", "edge-1",
    ]);
    assert_eq!(gw.show("acme", &id)["agent_id"], "edge-1");
    // update --agent reassigns too.
    gw.ok(&[
        "source",
        "update",
        "--tenant",
        "acme",
        "Acme Faker",
        "--agent",
        "edge-1",
    ]);
    assert_eq!(gw.show("acme", "Acme Faker")["agent_id"], "edge-1");

    // Another tenant does not see it.
    let err = gw.fails(&["source", "show", "--tenant", "globex", &id]);
    assert!(err.contains("has no source"), "{err}");

    // What the database holds (the files on disk, PostgreSQL's rows):
    // sealed values only.
    let contents = database_contents(gw.cli.database()).await;
    assert!(!contents.is_empty(), "the database was read");
    for secret in SECRETS {
        assert_nowhere_in_clear(&contents, secret);
    }

    let out = gw.ok(&["source", "delete", "--tenant", "acme", "Armis Prod"]);
    assert!(out.contains("deleted"), "{out}");
    assert!(!gw.ok(&["source", "list"]).contains("Armis Prod"));
    let err = gw.fails(&["source", "delete", "--tenant", "acme", "Armis Prod"]);
    assert!(err.contains("has no source \"Armis Prod\""), "{err}");
}

on_both_backends!(
    tenants_are_added_and_listed_and_reserved_names_refused,
    sources_are_managed_and_their_credentials_never_leave_sealed,
);
