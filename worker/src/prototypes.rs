//! `protodino prototypes CHECKPOINT`: unique-prototype counts (greedy and connected components)
//! over a list of ε and nearest-neighbour statistics of a checkpoint's prototype layers — every
//! layer the head has by default (`last_layer`; an iBOT head's `last_layer2` too), each reported
//! on its own. Works on protodino checkpoints and on official DINO / iBOT checkpoints converted
//! by `cargo xtask convert` (docs/checkpoints.md). The counts use the normalised directions; the
//! norms `‖w_k‖` are reported too — for a DINO-vMF head (trained `weight_g`) they set the
//! concentrations `κ_k = ‖w_k‖/τ`.
//!
//! Output: the reports' text, or with `--json` one line per layer:
//! `{"checkpoint", "layer", "source", "norms", "report"}` (`report` is the unique analysis).

use std::path::Path;

use anyhow::{Context, Result};
use protodino_analysis::prototypes::LayerSelection;
use protodino_analysis::report::prototype_reports;
use protodino_analysis::{Head, UniqueOptions};

pub fn run(
    checkpoint: &Path,
    eps: Vec<f64>,
    head: Head,
    layers: LayerSelection,
    json: bool,
) -> Result<()> {
    let opts = UniqueOptions {
        eps,
        ..UniqueOptions::default()
    };
    let reports = prototype_reports(checkpoint, head, layers, &opts)
        .with_context(|| format!("prototypes of {}", checkpoint.display()))?;
    if json {
        for r in &reports {
            println!(
                "{}",
                serde_json::json!({
                    "checkpoint": checkpoint,
                    "layer": r.source.layer,
                    "source": r.source,
                    "norms": r.norms,
                    "report": r.unique,
                })
            );
        }
        return Ok(());
    }
    let names: Vec<String> = reports.iter().map(|r| r.source.layer.to_string()).collect();
    println!(
        "{}: {} head, prototype layers: {}",
        checkpoint.display(),
        head,
        names.join(", ")
    );
    for r in &reports {
        println!();
        print!("{r}");
    }
    Ok(())
}
