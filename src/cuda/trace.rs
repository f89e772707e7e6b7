//! A GPU timeline without Nsight Systems (`--trace FILE.json`): while tracing is on, every NVTX
//! range ([`super::nvtx::range`]) also records a CUDA event on the traced stream when it opens
//! and when it closes, so each range gets its GPU time. [`finish`] turns the events into spans,
//! written as a Chrome trace (Perfetto and chrome://tracing open it) and summed per op into a
//! table (ms, share of the traced time, GB/s or TFLOP/s where a range declared its work).
//!
//! The NVTX ranges themselves stay, so `nsys profile` still sees them where nsys exists.

use std::path::Path;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaContext, CudaEvent, CudaStream};

use crate::error::{Error, Result};

/// Most ranges one trace holds; later ones are counted, not recorded (a long `train` run).
pub const MAX_SPANS: usize = 1 << 20;

/// One closed range: GPU milliseconds from the trace's start, nesting depth, declared work.
#[derive(Clone, Debug, PartialEq)]
pub struct Span {
    pub name: String,
    pub depth: usize,
    pub start_ms: f64,
    pub dur_ms: f64,
    /// FLOPs and bytes the range's kernels must do and move, when the caller knows them.
    pub flops: f64,
    pub bytes: f64,
}

struct Open {
    name: String,
    depth: usize,
    start: CudaEvent,
    end: Option<CudaEvent>,
    flops: f64,
    bytes: f64,
}

struct Tracer {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    base: CudaEvent,
    spans: Vec<Open>,
    open: Vec<usize>,
    dropped: usize,
}

static TRACER: Mutex<Option<Tracer>> = Mutex::new(None);

fn event(ctx: &Arc<CudaContext>) -> Result<CudaEvent> {
    Ok(ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?)
}

/// Starts tracing the ranges of work queued on `stream` (one trace per process at a time).
pub fn start(ctx: &Arc<CudaContext>, stream: &Arc<CudaStream>) -> Result<()> {
    let base = event(ctx)?;
    base.record(stream)?;
    let mut t = TRACER.lock().unwrap_or_else(|e| e.into_inner());
    *t = Some(Tracer {
        ctx: ctx.clone(),
        stream: stream.clone(),
        base,
        spans: Vec::new(),
        open: Vec::new(),
        dropped: 0,
    });
    Ok(())
}

/// Whether a trace is being recorded.
pub fn active() -> bool {
    TRACER.lock().map(|t| t.is_some()).unwrap_or(false)
}

/// Opens a traced range; its index, or None when not tracing (or the trace is full).
pub(crate) fn open(name: &str, flops: f64, bytes: f64) -> Option<usize> {
    let mut g = TRACER.lock().ok()?;
    let t = g.as_mut()?;
    if t.spans.len() >= MAX_SPANS {
        t.dropped += 1;
        return None;
    }
    let start = event(&t.ctx).ok()?;
    start.record(&t.stream).ok()?;
    let depth = t.open.len();
    t.spans.push(Open {
        name: name.to_string(),
        depth,
        start,
        end: None,
        flops,
        bytes,
    });
    t.open.push(t.spans.len() - 1);
    Some(t.spans.len() - 1)
}

/// Closes range `i` (opened by [`open`]).
pub(crate) fn close(i: usize) {
    let Ok(mut g) = TRACER.lock() else { return };
    let Some(t) = g.as_mut() else { return };
    if let (Some(pos), Ok(end)) = (t.open.iter().rposition(|&j| j == i), event(&t.ctx)) {
        t.open.remove(pos);
        if end.record(&t.stream).is_ok() {
            t.spans[i].end = Some(end);
        }
    }
}

/// Stops tracing: waits for the stream and returns every closed range, in opening order, and
/// the number of ranges left out because the trace was full.
pub fn finish() -> Result<(Vec<Span>, usize)> {
    let t = TRACER
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .ok_or_else(|| Error::Cuda("trace: finish without start".into()))?;
    t.stream.synchronize()?;
    let mut out = Vec::with_capacity(t.spans.len());
    for s in &t.spans {
        let Some(end) = &s.end else { continue };
        let start_ms = t.base.elapsed_ms(&s.start)? as f64;
        let end_ms = t.base.elapsed_ms(end)? as f64;
        out.push(Span {
            name: s.name.clone(),
            depth: s.depth,
            start_ms,
            dur_ms: (end_ms - start_ms).max(0.0),
            flops: s.flops,
            bytes: s.bytes,
        });
    }
    Ok((out, t.dropped))
}

/// The Chrome trace of `spans` (JSON object format, complete "X" events in microseconds; one
/// track per nesting depth so that Perfetto shows blocks above their ops).
pub fn chrome_json(spans: &[Span], device: &str) -> serde_json::Value {
    let events: Vec<serde_json::Value> = spans
        .iter()
        .map(|s| {
            let mut args = serde_json::Map::new();
            if s.flops > 0.0 {
                args.insert("TFLOP/s".into(), (s.flops / (s.dur_ms * 1e9)).into());
            }
            if s.bytes > 0.0 {
                args.insert("GB/s".into(), (s.bytes / (s.dur_ms * 1e6)).into());
            }
            serde_json::json!({
                "name": s.name, "ph": "X", "pid": 0, "tid": s.depth,
                "ts": s.start_ms * 1e3, "dur": s.dur_ms * 1e3, "args": args,
            })
        })
        .collect();
    serde_json::json!({
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": { "device": device, "clock": "CUDA events on the traced stream" },
    })
}

/// One row of the per-op summary.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct OpRow {
    /// The range name with its digits replaced by `#` ("block 3" and "block 4" are one op).
    pub op: String,
    pub depth: usize,
    pub count: usize,
    pub ms: f64,
    /// Share of the traced time (the sum of the outermost ranges), percent.
    pub share: f64,
    /// Achieved rates over the ranges that declared work (0 when none did).
    pub tflops: f64,
    pub gbps: f64,
}

fn op_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if c.is_ascii_digit() {
            if !out.ends_with('#') {
                out.push('#');
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Sums `spans` per op, largest first within each depth, outermost first.
pub fn summary(spans: &[Span]) -> Vec<OpRow> {
    let total: f64 = spans
        .iter()
        .filter(|s| s.depth == 0)
        .map(|s| s.dur_ms)
        .sum();
    let mut rows: Vec<(OpRow, f64, f64, f64)> = Vec::new();
    for s in spans {
        let op = op_name(&s.name);
        let i = match rows
            .iter()
            .position(|(r, ..)| r.op == op && r.depth == s.depth)
        {
            Some(i) => i,
            None => {
                rows.push((
                    OpRow {
                        op,
                        depth: s.depth,
                        count: 0,
                        ms: 0.0,
                        share: 0.0,
                        tflops: 0.0,
                        gbps: 0.0,
                    },
                    0.0,
                    0.0,
                    0.0,
                ));
                rows.len() - 1
            }
        };
        let (r, flops, bytes, work_ms) = &mut rows[i];
        r.count += 1;
        r.ms += s.dur_ms;
        if s.flops > 0.0 || s.bytes > 0.0 {
            *flops += s.flops;
            *bytes += s.bytes;
            *work_ms += s.dur_ms;
        }
    }
    let mut out: Vec<OpRow> = rows
        .into_iter()
        .map(|(mut r, flops, bytes, work_ms)| {
            r.share = if total > 0.0 {
                100.0 * r.ms / total
            } else {
                0.0
            };
            if work_ms > 0.0 {
                r.tflops = flops / (work_ms * 1e9);
                r.gbps = bytes / (work_ms * 1e6);
            }
            r
        })
        .collect();
    out.sort_by(|a, b| a.depth.cmp(&b.depth).then(b.ms.total_cmp(&a.ms)));
    out
}

/// The summary as an aligned table.
pub fn summary_table(rows: &[OpRow]) -> String {
    let mut s = format!(
        "{:<32} {:>7} {:>11} {:>7} {:>9} {:>9}\n",
        "range (depth)", "count", "ms", "share", "TFLOP/s", "GB/s"
    );
    let f = |x: f64| {
        if x > 0.0 {
            format!("{x:.1}")
        } else {
            "-".into()
        }
    };
    for r in rows {
        s.push_str(&format!(
            "{:<32} {:>7} {:>11.3} {:>6.1}% {:>9} {:>9}\n",
            format!("{}{} ({})", "  ".repeat(r.depth), r.op, r.depth),
            r.count,
            r.ms,
            r.share,
            f(r.tflops),
            f(r.gbps)
        ));
    }
    s
}

/// Writes the Chrome trace of `spans` to `path` (atomically) and prints the summary.
pub fn write(path: &Path, spans: &[Span], dropped: usize, device: &str) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string(&chrome_json(spans, device))
        .map_err(|e| Error::Config(format!("--trace {}: {e}", path.display())))?;
    std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    print!("{}", summary_table(&summary(spans)));
    if dropped > 0 {
        println!("trace: {dropped} ranges past the first {MAX_SPANS} were not recorded");
    }
    println!("wrote trace {} ({} ranges)", path.display(), spans.len());
    Ok(())
}

#[cfg(test)]
#[path = "trace_tests.rs"]
mod tests;
