//! Tests of the trace writer and summary (CPU only: spans are built by hand).

use super::*;

fn span(name: &str, depth: usize, start_ms: f64, dur_ms: f64, flops: f64, bytes: f64) -> Span {
    Span {
        name: name.into(),
        depth,
        start_ms,
        dur_ms,
        flops,
        bytes,
    }
}

/// Two steps of a forward: "block 0"/"block 1" inside "forward", an op with declared work.
fn two_steps() -> Vec<Span> {
    let mut v = Vec::new();
    for step in 0..2 {
        let t = 10.0 * step as f64;
        v.push(span("forward", 0, t, 8.0, 0.0, 0.0));
        v.push(span("block 0", 1, t, 3.0, 0.0, 0.0));
        v.push(span("block 1", 1, t + 3.0, 3.0, 0.0, 0.0));
        v.push(span("final layer", 1, t + 6.0, 2.0, 4e9, 2e9));
    }
    v
}

#[test]
fn chrome_trace_has_one_complete_event_per_span_in_microseconds() {
    let spans = two_steps();
    let j = chrome_json(&spans, "test device");
    let ev = j["traceEvents"].as_array().unwrap();
    assert_eq!(ev.len(), spans.len());
    for (e, s) in ev.iter().zip(&spans) {
        assert_eq!(e["ph"], "X");
        assert_eq!(e["name"], s.name.as_str());
        assert_eq!(e["tid"], s.depth);
        assert_eq!(e["ts"].as_f64().unwrap(), s.start_ms * 1e3);
        assert_eq!(e["dur"].as_f64().unwrap(), s.dur_ms * 1e3);
    }
    // 4e9 FLOPs in 2 ms = 2 TFLOP/s; 2e9 bytes in 2 ms = 1000 GB/s.
    let fl = &ev[3]["args"];
    assert!((fl["TFLOP/s"].as_f64().unwrap() - 2.0).abs() < 1e-12);
    assert!((fl["GB/s"].as_f64().unwrap() - 1000.0).abs() < 1e-9);
    assert!(ev[0]["args"].as_object().unwrap().is_empty());
    assert_eq!(j["otherData"]["device"], "test device");
    // It round-trips as JSON text (what Perfetto reads).
    let back: serde_json::Value = serde_json::from_str(&j.to_string()).unwrap();
    assert_eq!(back, j);
}

#[test]
fn summary_groups_numbered_ranges_and_shares_the_outer_time() {
    let rows = summary(&two_steps());
    let names: Vec<_> = rows.iter().map(|r| (r.op.as_str(), r.depth)).collect();
    assert_eq!(
        names,
        vec![("forward", 0), ("block #", 1), ("final layer", 1)]
    );
    let (fwd, blocks, fl) = (&rows[0], &rows[1], &rows[2]);
    assert_eq!((fwd.count, fwd.ms, fwd.share), (2, 16.0, 100.0));
    assert_eq!((blocks.count, blocks.ms, blocks.share), (4, 12.0, 75.0));
    assert_eq!((fl.count, fl.ms, fl.share), (2, 4.0, 25.0));
    assert!((fl.tflops - 2.0).abs() < 1e-12 && (fl.gbps - 1000.0).abs() < 1e-9);
    assert_eq!((blocks.tflops, blocks.gbps), (0.0, 0.0));
    let table = summary_table(&rows);
    assert_eq!(table.lines().count(), 1 + rows.len());
    assert!(
        table.contains("block # (1)") && table.contains("25.0%"),
        "{table}"
    );
}

#[test]
fn op_names_fold_digit_runs() {
    assert_eq!(op_name("block 11"), "block #");
    assert_eq!(op_name("bwd mlp1"), "bwd mlp#");
    assert_eq!(op_name("subs"), "subs");
    assert!(summary(&[]).is_empty());
}

#[test]
fn writing_a_trace_is_atomic_and_names_the_file() {
    let dir = std::env::temp_dir().join(format!("imdm-trace-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("t.json");
    write(&p, &two_steps(), 0, "dev").unwrap();
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    assert_eq!(j["traceEvents"].as_array().unwrap().len(), 8);
    assert!(!p.with_extension("json.tmp").exists());
    let bad = dir.join("missing-dir").join("t.json");
    let e = write(&bad, &two_steps(), 0, "dev").unwrap_err().to_string();
    assert!(e.contains("missing-dir"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Without a started trace, ranges record nothing and finishing is an error, not a panic.
#[test]
fn ranges_without_a_trace_record_nothing() {
    if active() {
        return;
    }
    assert_eq!(open("x", 0.0, 0.0), None);
    close(0);
    assert!(finish().is_err());
}
