//! Throwaway measurement: pull an inventory through the Faker server with a
//! plain reqwest loop and print pages/s and MB/s.
//!
//! `cargo run --release --example faker_throughput -- [DEVICES] [LENGTH] [CLIENTS]`
//! (defaults 1000000 5000 1). With several clients each walks its own share
//! of the pages at once.

use std::time::Instant;

use serde::de::IgnoredAny;
use serde::Deserialize;
use serviceradar_agent::sources::faker::server::{FakerServer, FakerServerConfig};
use serviceradar_agent::sources::faker::{FakerGenerator, FakerSettings};

#[derive(Deserialize)]
struct Page {
    data: Data,
}

#[derive(Deserialize)]
struct Data {
    count: u64,
    next: u64,
    total: u64,
    #[allow(dead_code)]
    results: IgnoredAny,
}

/// Devices of a range, serialised one at a time (as the server does).
struct Devices<'a>(&'a FakerGenerator, std::ops::Range<u64>);

impl serde::Serialize for Devices<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(None)?;
        for i in self.1.clone() {
            seq.serialize_element(&self.0.device(i))?;
        }
        seq.end()
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let devices: u64 = args.next().map_or(Ok(1_000_000), |a| a.parse())?;
    let length: u64 = args.next().map_or(Ok(5000), |a| a.parse())?;
    let clients: u64 = args.next().map_or(Ok(1), |a| a.parse())?;
    serviceradar_agent::tls::install_crypto_provider();
    let settings = FakerSettings {
        total_devices: devices,
        seed: 1,
        churn_percent: 0.0,
    };

    // The same work without HTTP: generate + serialise every device.
    let gen = {
        let mut g = FakerGenerator::new(settings);
        g.next_run();
        g
    };
    let started = Instant::now();
    let mut buf = Vec::with_capacity(length as usize * 512);
    let mut serialised = 0usize;
    for first in (0..devices).step_by(length as usize) {
        buf.clear();
        let page = Devices(&gen, first..(first + length).min(devices));
        serde_json::to_writer(&mut buf, &page)?;
        serialised += buf.len();
    }
    let local = started.elapsed();
    println!(
        "in-process generate+serialise: {devices} devices in {local:.2?} ({:.0} MB/s, {:.0} devices/s)",
        serialised as f64 / 1e6 / local.as_secs_f64(),
        devices as f64 / local.as_secs_f64()
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let server = FakerServer::start(FakerServerConfig {
            settings,
            max_page: length.max(1) as u32,
            ..Default::default()
        })
        .await?;
        let base = server.url();
        let client = reqwest::Client::new();
        let resp = client
            .post(format!("{base}/api/v1/access_token/"))
            .header("content-type", "application/json")
            .body(r#"{"api_key":"k","api_secret":"s"}"#)
            .send()
            .await?;
        let token: serde_json::Value = serde_json::from_slice(&resp.bytes().await?)?;
        let token = token["data"]["access_token"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("no token"))?
            .to_owned();

        // Sanity: one parsed page.
        let body = client
            .get(format!("{base}/api/v1/search/?from=0&length={length}"))
            .bearer_auth(&token)
            .send()
            .await?
            .bytes()
            .await?;
        let page: Page = serde_json::from_slice(&body)?;
        assert_eq!(page.data.total, devices);
        assert_eq!(page.data.count, length.min(devices));
        assert_eq!(page.data.next, if length < devices { length } else { 0 });

        let started = Instant::now();
        let mut tasks = Vec::new();
        for c in 0..clients {
            let (client, base, token) = (client.clone(), base.clone(), token.clone());
            tasks.push(tokio::spawn(async move {
                let (mut pages, mut bytes) = (0u64, 0u64);
                let mut from = c * length;
                while from < devices {
                    let body = client
                        .get(format!("{base}/api/v1/search/?aql=in%3Adevices&from={from}&length={length}"))
                        .bearer_auth(&token)
                        .send()
                        .await?
                        .error_for_status()?
                        .bytes()
                        .await?;
                    pages += 1;
                    bytes += body.len() as u64;
                    from += clients * length;
                }
                anyhow::Ok((pages, bytes))
            }));
        }
        let (mut pages, mut bytes) = (0u64, 0u64);
        for t in tasks {
            let (p, b) = t.await??;
            pages += p;
            bytes += b;
        }
        let elapsed = started.elapsed();
        println!(
            "HTTP, {clients} client(s): {pages} pages of {length} ({devices} devices, {:.1} MB) in {elapsed:.2?}: {:.1} pages/s, {:.0} MB/s, {:.0} devices/s",
            bytes as f64 / 1e6,
            pages as f64 / elapsed.as_secs_f64(),
            bytes as f64 / 1e6 / elapsed.as_secs_f64(),
            devices as f64 / elapsed.as_secs_f64(),
        );
        server.shutdown().await;
        anyhow::Ok(())
    })
}
