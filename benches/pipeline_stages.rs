//! Throughput of each stage of the agent's side of a Faker run (generate,
//! map + stage, plan + build every chunk), single-threaded, without the
//! network: `cargo bench --bench pipeline_stages`. The whole pipeline over
//! mTLS is measured by `serviceradar-agent bench` (see the README).

use std::time::Instant;

use serviceradar_agent::device::{DeviceUpdate, UpdateContext};
use serviceradar_agent::sources::armis::client::process_page;
use serviceradar_agent::sources::armis::encode::ArmisDeviceFast;
use serviceradar_agent::sources::faker::server::render_page;
use serviceradar_agent::sources::faker::{FakerGenerator, FakerSettings};
use serviceradar_agent::sources::faker_run;
use serviceradar_agent::sources::stager::DeviceSink;
use serviceradar_agent::upload::chunking::{plan, ChunkLimits, ChunkReader, RunIds};
use serviceradar_agent::upload::staging::RunWriter;

fn main() {
    let total = 500_000u64;
    let mut gen = FakerGenerator::new(FakerSettings {
        total_devices: total,
        seed: 1,
        churn_percent: 0.0,
    });
    gen.next_run();
    let ctx = UpdateContext {
        agent_id: "agent-edge-01".into(),
        gateway_id: "gw-1".into(),
        partition: "default".into(),
        source: "faker",
        timestamp: "2026-04-12T09:30:12.123456789Z".into(),
    };
    let dir = tempfile::tempdir().unwrap();

    let start = Instant::now();
    let generated = gen.devices().count();
    let generate = start.elapsed();

    let start = Instant::now();
    let mut writer = RunWriter::create(dir.path(), "bench").unwrap();
    let counts = faker_run(&gen, &ctx, &[], &mut |u: &DeviceUpdate| writer.write(u)).unwrap();
    let staged = writer.finish().unwrap();
    let stage = start.elapsed();

    let start = Instant::now();
    let ids = RunIds {
        sync_service_id: "svc".into(),
        sync_run_id: "bench".into(),
    };
    let plan = plan(&staged, &ids, &ChunkLimits::default()).unwrap();
    let mut bytes = 0;
    for chunk in ChunkReader::open(&staged, &plan, &ids).unwrap() {
        bytes += chunk.unwrap().json.len();
    }
    let chunk = start.elapsed();

    let rate = |d: std::time::Duration| total as f64 / d.as_secs_f64();
    println!(
        "generate only:        {generated} devices in {generate:?} ({:.0}/s)",
        rate(generate)
    );
    println!(
        "generate+map+stage:   {} updates, {} bytes in {stage:?} ({:.0}/s)",
        counts.devices,
        staged.bytes,
        rate(stage)
    );
    println!(
        "plan+build chunks:    {} chunks, {bytes} bytes in {chunk:?} ({:.0}/s)",
        plan.chunks.len(),
        rate(chunk)
    );
    println!("single-thread total:  {:.0} devices/s", rate(stage + chunk));

    // The Armis-over-HTTP path: what the Faker server renders, and what a
    // page worker does with it (parse, map, encode), without the network.
    let start = Instant::now();
    let pages: Vec<Vec<u8>> = (0..total)
        .step_by(5000)
        .map(|from| render_page(&gen, from, 5000).unwrap())
        .collect();
    let render = start.elapsed();
    let page_bytes: usize = pages.iter().map(Vec::len).sum();
    let armis_ctx = UpdateContext {
        source: "armis",
        ..ctx.clone()
    };
    #[derive(serde::Deserialize)]
    struct Page<'a> {
        #[serde(borrow)]
        data: PageData<'a>,
    }
    #[derive(serde::Deserialize)]
    struct PageData<'a> {
        #[serde(borrow)]
        results: Vec<ArmisDeviceFast<'a>>,
    }
    let start = Instant::now();
    let mut parsed = 0;
    for body in &pages {
        parsed += serde_json::from_slice::<Page<'_>>(body)
            .unwrap()
            .data
            .results
            .len();
    }
    let parse = start.elapsed();
    let start = Instant::now();
    let mut sink = DeviceSink::default();
    for body in &pages {
        process_page(
            body,
            Some("All"),
            "GET /api/v1/search/",
            &armis_ctx,
            &[],
            &mut sink,
        )
        .unwrap();
        sink = DeviceSink::default();
    }
    let process = start.elapsed();
    println!(
        "faker server render:  {} pages, {page_bytes} bytes in {render:?} ({:.0}/s)",
        pages.len(),
        rate(render)
    );
    println!(
        "armis page parse:     {parsed} devices in {parse:?} ({:.2} µs/device)",
        parse.as_secs_f64() * 1e6 / total as f64
    );
    println!(
        "armis page process:   parse+map+encode in {process:?} ({:.0}/s, {:.2} µs/device)",
        rate(process),
        process.as_secs_f64() * 1e6 / total as f64
    );
}
