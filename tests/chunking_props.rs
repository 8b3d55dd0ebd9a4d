//! Properties of the chunker (wire.md §6), checked against an independent
//! reference: every chunk is rebuilt here from the staged lines and a
//! `sync_meta` serialized here, and compared byte for byte.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use proptest::prelude::*;
use serviceradar_agent::device::{DeviceUpdate, SyncMeta, UpdateContext};
use serviceradar_agent::upload::chunking::{
    plan, Chunk, ChunkLimits, ChunkPlan, ChunkReader, RunIds,
};
use serviceradar_agent::upload::envelope::EnvelopeFields;
use serviceradar_agent::upload::staging::{RunWriter, StagedRun};

fn ctx() -> UpdateContext {
    UpdateContext {
        agent_id: "agent-edge-01".into(),
        gateway_id: "gw-1".into(),
        partition: "default".into(),
        source: "faker",
        timestamp: "2026-04-12T09:30:12.123456789Z".into(),
    }
}

/// Update `i` whose JSON is `base_len(i) + pad` bytes.
fn update(i: usize, pad: usize) -> DeviceUpdate {
    let metadata = BTreeMap::from([
        ("integration_type".into(), "faker".to_owned()),
        ("pad".into(), "x".repeat(pad)),
    ]);
    let ip = format!("10.{}.{}.{}", i / 65536 % 256, i / 256 % 256, i % 256);
    ctx().update(ip, Some("3C:97:0E:00:00:01".into()), None, metadata)
}

fn base_len(i: usize) -> usize {
    serde_json::to_vec(&update(i, 0)).unwrap().len()
}

/// Stages the updates; returns the run and its staged lines.
fn stage(dir: &Path, updates: &[DeviceUpdate]) -> (StagedRun, Vec<Vec<u8>>) {
    let mut writer = RunWriter::create(dir, "run").unwrap();
    for u in updates {
        writer.write(u).unwrap();
    }
    let staged = writer.finish().unwrap();
    let data = fs::read(&staged.data_path).unwrap();
    let lines: Vec<Vec<u8>> = data
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    assert_eq!(lines.len(), updates.len());
    (staged, lines)
}

fn meta(
    ids: &RunIds,
    index: usize,
    total: usize,
    total_devices: usize,
    is_final: bool,
) -> SyncMeta {
    SyncMeta {
        sync_service_id: ids.sync_service_id.clone(),
        sync_run_id: ids.sync_run_id.clone(),
        chunk_index: index as u32,
        total_chunks: total as u32,
        total_devices: total_devices as u64,
        is_final,
    }
}

/// The reference chunk: `[line-with-meta, …]`, built the obvious way.
fn reference_chunk(lines: &[Vec<u8>], meta: &SyncMeta) -> Vec<u8> {
    let meta = serde_json::to_vec(meta).unwrap();
    let mut out = b"[".to_vec();
    for (k, line) in lines.iter().enumerate() {
        if k > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&line[..line.len() - 1]);
        out.extend_from_slice(b",\"sync_meta\":");
        out.extend_from_slice(&meta);
        out.push(b'}');
    }
    out.push(b']');
    out
}

fn read_all(staged: &StagedRun, plan: &ChunkPlan, ids: &RunIds) -> Vec<Chunk> {
    ChunkReader::open(staged, plan, ids)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

/// Checks every property of wire.md §6 for one staged run; returns the plan.
fn check_run(updates: &[DeviceUpdate], ids: &RunIds, limits: &ChunkLimits) -> ChunkPlan {
    let dir = tempfile::tempdir().unwrap();
    let (staged, lines) = stage(dir.path(), updates);
    let plan = plan(&staged, ids, limits).unwrap();
    let chunks = read_all(&staged, &plan, ids);
    let n = chunks.len();
    let total = updates.len();
    assert_eq!(n, plan.chunks.len());
    assert_eq!(plan.total_devices, total as u64);
    assert_eq!(n == 0, total == 0);

    let mut next_update = 0usize;
    for (c, (chunk, span)) in chunks.iter().zip(&plan.chunks).enumerate() {
        let (first, count) = (span.first as usize, span.count as usize);
        assert_eq!(
            (chunk.index as usize, chunk.total as usize, chunk.is_final),
            (c, n, c + 1 == n)
        );
        assert_eq!(first, next_update, "chunks cover the run in order");
        assert!(
            count >= 1 && count <= limits.max_updates,
            "chunk {c} holds {count}"
        );
        assert_eq!(span.bytes, chunk.json.len(), "planned size is exact");
        assert!(
            chunk.json.len() <= limits.max_bytes || count == 1,
            "chunk {c} is {} bytes with {count} updates",
            chunk.json.len()
        );

        // Byte-exact against the reference, which also proves order, the
        // splice and the per-run numbering.
        let m = meta(ids, c, n, total, c + 1 == n);
        assert_eq!(
            chunk.json,
            reference_chunk(&lines[first..first + count], &m),
            "chunk {c}"
        );
        let parsed: Vec<DeviceUpdate> = serde_json::from_slice(&chunk.json).unwrap();
        for (k, got) in parsed.iter().enumerate() {
            let want = DeviceUpdate {
                sync_meta: Some(m.clone()),
                ..updates[first + k].clone()
            };
            assert_eq!(got, &want);
        }

        // Greedy: the next update would have broken a limit (with the meta
        // the chunk would then have carried).
        if c + 1 < n {
            let next = first + count;
            let would_be_final = next + 1 == total;
            let grown = reference_chunk(
                &lines[first..=next],
                &meta(ids, c, n, total, would_be_final),
            );
            assert!(
                count == limits.max_updates || grown.len() > limits.max_bytes,
                "chunk {c} closed early: {} bytes with the next update",
                grown.len()
            );
        }
        next_update = first + count;
    }
    assert_eq!(next_update, total, "every update is in exactly one chunk");

    let streams = plan.streams(limits);
    let mut expected_start = 0u32;
    for s in &streams {
        assert_eq!(s.start, expected_start);
        assert!(!s.is_empty() && s.len() <= limits.max_chunks_per_stream);
        expected_start = s.end;
    }
    assert_eq!(expected_start as usize, n);
    plan
}

#[derive(Debug, Clone)]
enum Size {
    Pad(usize),
    /// Roughly `max_bytes + delta` as a single-update chunk: near the edge.
    Edge(i32),
}

fn size_strategy() -> impl Strategy<Value = Size> {
    prop_oneof![
        6 => (0usize..300).prop_map(Size::Pad),
        2 => (300usize..3000).prop_map(Size::Pad),
        1 => (4000usize..9000).prop_map(Size::Pad),
        2 => (-4i32..=4).prop_map(Size::Edge),
    ]
}

fn ids_strategy() -> impl Strategy<Value = RunIds> {
    // Quotes, backslashes and non-ASCII make serialized lengths differ from
    // raw ones.
    ("[a-f0-9\\-]{0,36}", "[a-z0-9\"\\\\é]{0,20}").prop_map(|(sync_service_id, sync_run_id)| {
        RunIds {
            sync_service_id,
            sync_run_id,
        }
    })
}

fn limits_strategy() -> impl Strategy<Value = ChunkLimits> {
    (300usize..4000, 1usize..12, 1usize..8).prop_map(
        |(max_bytes, max_updates, max_chunks_per_stream)| ChunkLimits {
            max_bytes,
            max_updates,
            max_chunks_per_stream,
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn chunks_respect_wire_md(
        sizes in prop::collection::vec(size_strategy(), 0..70),
        ids in ids_strategy(),
        limits in limits_strategy(),
    ) {
        // A single-update chunk costs about base + 14 + meta + 1 bytes.
        let meta_len = serde_json::to_vec(&meta(&ids, 0, 1, sizes.len(), true)).unwrap().len();
        let updates: Vec<DeviceUpdate> = sizes
            .iter()
            .enumerate()
            .map(|(i, size)| {
                let pad = match *size {
                    Size::Pad(p) => p,
                    Size::Edge(delta) => {
                        let target = limits.max_bytes as i64 + i64::from(delta) - 15 - meta_len as i64 - base_len(i) as i64;
                        target.max(0) as usize
                    }
                };
                update(i, pad)
            })
            .collect();
        check_run(&updates, &ids, &limits);
    }
}

fn default_ids() -> RunIds {
    RunIds {
        sync_service_id: "3f1c2a9e-7b4d-4c1e-9a8f-2d5e6b7c8d90".into(),
        sync_run_id: "run-0001".into(),
    }
}

/// Pad that makes a run of `count` updates (indices from `first`) an exact
/// `target`-byte chunk with the given meta.
fn pad_for(target: usize, first: usize, count: usize, meta: &SyncMeta) -> usize {
    let lines: Vec<Vec<u8>> = (first..first + count)
        .map(|i| serde_json::to_vec(&update(i, 0)).unwrap())
        .collect();
    let empty = reference_chunk(&lines, meta).len();
    assert!(
        target >= empty && (target - empty) % count == 0,
        "choose a reachable target"
    );
    (target - empty) / count
}

#[test]
fn default_limits_exact_edges() {
    let limits = ChunkLimits::default();
    assert_eq!(
        (
            limits.max_bytes,
            limits.max_updates,
            limits.max_chunks_per_stream
        ),
        (1_048_576, 1000, 5000)
    );
    let ids = default_ids();

    // Two updates that fill exactly 1 MiB together as the final chunk share
    // it; this only works if the planner counts `true` as 1 byte shorter.
    let fits = meta(&ids, 0, 1, 2, true);
    let base: usize = (0..2).map(base_len).sum();
    let empty = reference_chunk(
        &[
            serde_json::to_vec(&update(0, 0)).unwrap(),
            serde_json::to_vec(&update(1, 0)).unwrap(),
        ],
        &fits,
    )
    .len();
    let spare = limits.max_bytes - empty;
    let exact = vec![update(0, spare / 2), update(1, spare - spare / 2)];
    assert_eq!(
        serde_json::to_vec(&exact[0]).unwrap().len() + serde_json::to_vec(&exact[1]).unwrap().len(),
        base + spare
    );
    let plan = check_run(&exact, &ids, &limits);
    assert_eq!(plan.chunks.len(), 1);
    assert_eq!(plan.chunks[0].bytes, limits.max_bytes);

    // One byte more and they split.
    let over = vec![update(0, spare / 2 + 1), update(1, spare - spare / 2)];
    let plan = check_run(&over, &ids, &limits);
    assert_eq!(plan.chunks.len(), 2);

    // A single update of exactly 1 MiB as a non-final chunk, then a small one.
    let pad = pad_for(limits.max_bytes, 0, 1, &meta(&ids, 0, 2, 2, false));
    let plan = check_run(&[update(0, pad), update(1, 10)], &ids, &limits);
    assert_eq!(
        plan.chunks.iter().map(|c| c.bytes).next(),
        Some(limits.max_bytes)
    );
    assert_eq!(plan.chunks.len(), 2);

    // Updates over 1 MiB go alone; small ones around them are packed.
    let mut mixed = Vec::new();
    for i in 0..7 {
        let pad = match i {
            2 => 2 * 1024 * 1024,
            3 => limits.max_bytes,
            _ => 100,
        };
        mixed.push(update(i, pad));
    }
    let plan = check_run(&mixed, &ids, &limits);
    let counts: Vec<u32> = plan.chunks.iter().map(|c| c.count).collect();
    assert_eq!(counts, [2, 1, 1, 3]);
    assert!(plan.chunks[1].bytes > 2 * 1024 * 1024);

    // The update limit: 2500 small updates make 1000 + 1000 + 500.
    let many: Vec<DeviceUpdate> = (0..2500).map(|i| update(i, 0)).collect();
    let plan = check_run(&many, &ids, &limits);
    let counts: Vec<u32> = plan.chunks.iter().map(|c| c.count).collect();
    assert_eq!(counts, [1000, 1000, 500]);
}

#[test]
fn total_chunks_digit_growth_is_planned_exactly() {
    // With each chunk barely holding its updates, a longer total_chunks
    // (10 instead of 9) pushes updates out: planning must settle on a count
    // consistent with itself. Sweeping the size around the edge hits it.
    let ids = default_ids();
    for extra in 0..6 {
        let limits = ChunkLimits {
            max_bytes: 0,
            max_updates: 2,
            max_chunks_per_stream: 4,
        };
        let target_two = {
            let lines: Vec<Vec<u8>> = (0..2)
                .map(|i| serde_json::to_vec(&update(i, 0)).unwrap())
                .collect();
            reference_chunk(&lines, &meta(&ids, 0, 9, 18, false)).len() + extra
        };
        let limits = ChunkLimits {
            max_bytes: target_two,
            ..limits
        };
        let updates: Vec<DeviceUpdate> = (0..19).map(|i| update(i, 0)).collect();
        check_run(&updates, &ids, &limits);
    }
}

#[test]
fn more_than_5000_chunks_split_into_valid_streams() {
    let ids = default_ids();
    let limits = ChunkLimits {
        max_bytes: 1024 * 1024,
        max_updates: 1,
        max_chunks_per_stream: 5000,
    };
    let updates: Vec<DeviceUpdate> = (0..5003).map(|i| update(i, 0)).collect();
    let dir = tempfile::tempdir().unwrap();
    let (staged, _) = stage(dir.path(), &updates);
    let plan = plan(&staged, &ids, &limits).unwrap();
    assert_eq!(plan.total_chunks(), 5003);
    let streams = plan.streams(&limits);
    assert_eq!(streams, [0..5000, 5000..5003]);
    let small = ChunkLimits {
        max_chunks_per_stream: 7,
        ..limits
    };
    assert!(plan.streams(&small).iter().all(|s| s.len() <= 7));
    assert_eq!(plan.streams(&small).len(), 5003usize.div_ceil(7));

    // Envelopes are numbered per stream, sync_meta per run.
    let fields = EnvelopeFields {
        agent_id: "agent-edge-01".into(),
        ..Default::default()
    };
    let mut reader = ChunkReader::open(&staged, &plan, &ids).unwrap();
    for stream in &streams {
        let stream_total = stream.len() as i32;
        for (k, run_index) in stream.clone().enumerate() {
            let chunk = reader.next().unwrap().unwrap();
            assert_eq!(chunk.index, run_index);
            let envelope = fields.status_chunk(k as i32, stream_total, chunk.json.clone(), 0);
            assert_eq!(
                (envelope.chunk_index, envelope.total_chunks),
                (k as i32, stream_total)
            );
            assert_eq!(envelope.is_final, k as i32 == stream_total - 1);
            let parsed: Vec<DeviceUpdate> =
                serde_json::from_slice(&envelope.services[0].message).unwrap();
            let m = parsed[0].sync_meta.as_ref().unwrap();
            assert_eq!(
                (m.chunk_index, m.total_chunks, m.total_devices),
                (run_index, 5003, 5003)
            );
            assert_eq!(m.is_final, run_index == 5002);
        }
    }
    assert!(reader.next().is_none());

    // A later stream can be re-read on its own.
    let again: Vec<Chunk> = ChunkReader::open_at(&staged, &plan, &ids, 5000)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        again.iter().map(|c| c.index).collect::<Vec<_>>(),
        [5000, 5001, 5002]
    );
    let last: Vec<DeviceUpdate> = serde_json::from_slice(&again[2].json).unwrap();
    assert_eq!(last[0].ip, updates[5002].ip);
}

#[test]
fn empty_run_has_no_chunks_and_no_streams() {
    let plan = check_run(&[], &default_ids(), &ChunkLimits::default());
    assert!(plan.chunks.is_empty());
    assert!(plan.streams(&ChunkLimits::default()).is_empty());
}

#[test]
fn corrupt_sidecar_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (staged, _) = stage(dir.path(), &[update(0, 0), update(1, 0)]);
    let wrong = StagedRun {
        device_count: 3,
        ..staged.clone()
    };
    assert!(plan(&wrong, &default_ids(), &ChunkLimits::default()).is_err());
    let plan = plan(&staged, &default_ids(), &ChunkLimits::default()).unwrap();
    // Lengths that no longer match the data: the reader refuses.
    let lens = fs::read(&staged.lengths_path).unwrap();
    let first = u32::from_le_bytes(lens[0..4].try_into().unwrap());
    let second = u32::from_le_bytes(lens[4..8].try_into().unwrap());
    let shifted = [(first - 1).to_le_bytes(), (second + 1).to_le_bytes()].concat();
    fs::write(&staged.lengths_path, shifted).unwrap();
    let result: Result<Vec<Chunk>, _> = ChunkReader::open(&staged, &plan, &default_ids())
        .unwrap()
        .collect();
    assert!(result.is_err());
}
