//! `scripts/paper-chain.sh --smoke` end to end on the CPU: MDLM -> IM-SDTT -> couplings ->
//! IM-ReDi, plus the MDLM+SDTT baseline; then a second invocation that skips every complete
//! stage, and a third that redoes only the stage whose output was removed.

use std::path::Path;
use std::process::Command;

use imdm_engine::model::checkpoint;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_imdm-engine")
}

fn chain(out: &Path) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/paper-chain.sh");
    let o = Command::new("bash")
        .arg(script)
        .args(["--smoke", "--device", "cpu", "--bin", bin(), "--out"])
        .arg(out)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "paper-chain failed:\n{text}");
    text
}

fn stages(out: &Path) -> serde_json::Value {
    let s = std::fs::read_to_string(out.join("summary.json")).unwrap();
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("summary.json: {e}\n{s}"))
}

#[test]
fn smoke_chain_runs_every_stage_and_resumes_by_skipping_complete_ones() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("chain");
    chain(&out);
    let names = ["mdlm", "imsdtt", "couplings", "imredi", "sdtt-mdlm"];
    let js = stages(&out);
    let got: Vec<&str> = js["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(got, names);
    for s in js["stages"].as_array().unwrap() {
        assert_eq!(s["status"], "done", "{s}");
        for f in s["files"].as_array().unwrap() {
            assert!(Path::new(f.as_str().unwrap()).is_file(), "{s}");
        }
    }
    let redi = &js["stages"][3]["losses"];
    assert!(redi["loss"].as_f64().unwrap() > 0.0, "{redi}");
    assert!(redi["val_nelbo"].as_f64().unwrap() > 0.0, "{redi}");
    assert!(js["stages"][0]["losses"]["loss"].as_f64().is_some());
    let table = std::fs::read_to_string(out.join("summary.txt")).unwrap();
    for n in names {
        assert!(table.contains(n), "{table}");
    }
    // Everything complete: nothing runs again.
    let load = || checkpoint::load(out.join("imredi.safetensors"), None).unwrap();
    let before = load();
    let text = chain(&out);
    assert!(!text.contains("+ "), "a complete stage ran again:\n{text}");
    let js = stages(&out);
    for s in js["stages"].as_array().unwrap() {
        assert_eq!(s["status"], "skipped (done earlier)", "{s}");
    }
    // A removed output: only its stage runs, reproducing it.
    std::fs::remove_file(out.join("imredi.safetensors")).unwrap();
    let text = chain(&out);
    let ran: Vec<&str> = text.lines().filter(|l| l.starts_with("+ ")).collect();
    assert_eq!(ran.len(), 1, "{text}");
    assert!(ran[0].contains("redi-train"), "{text}");
    assert!(load() == before, "the redone stage gave other weights");
}
