//! `protodino prototypes CHECKPOINT`: unique-prototype counts (greedy and connected components)
//! over a list of ε and nearest-neighbour statistics of a checkpoint's prototype layer. Works on
//! any safetensors file holding `<head>.head.last_layer.weight_v` (`weight_g` optional). The
//! counts use the normalised directions; the norms `‖w_k‖` are reported too — for a DINO-vMF
//! head (trained `weight_g`) they set the concentrations `κ_k = ‖w_k‖/τ`.

use std::path::Path;

use anyhow::Result;
use protodino_analysis::{Head, NormStats, Prototypes, UniqueOptions, analyze_unique};

pub fn run(checkpoint: &Path, eps: Vec<f64>, head: Head, json: bool) -> Result<()> {
    let protos = Prototypes::load(checkpoint, head)?;
    let norms = NormStats::of(&protos.norms)?;
    let analysis = analyze_unique(
        &protos.normalized,
        &UniqueOptions {
            eps,
            ..UniqueOptions::default()
        },
    )?;
    let r = &analysis.report;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "checkpoint": checkpoint,
                "source": protos.source,
                "norms": norms,
                "report": r
            })
        );
        return Ok(());
    }
    println!(
        "{}: {} head ({}), K = {}, d = {}",
        checkpoint.display(),
        protos.source.head,
        protos.source.weight_v,
        r.k,
        r.dim
    );
    println!("{norms}");
    println!(
        "{:>8}  {:>14}  {:>22}",
        "eps", "unique (greedy)", "unique (conn. comp.)"
    );
    for c in &r.counts {
        println!(
            "{:>8}  {:>8} {:>5.1}%  {:>15} {:>5.1}%",
            c.eps,
            c.greedy,
            100.0 * c.greedy_fraction,
            c.connected_components,
            100.0 * c.cc_fraction
        );
    }
    println!(
        "nearest-neighbour distance: mean {:.4}, min {:.4}, max {:.4}; KoLeo-proto {:.4}",
        r.nn.mean, r.nn.min, r.nn.max, r.nn.koleo_proto
    );
    Ok(())
}
