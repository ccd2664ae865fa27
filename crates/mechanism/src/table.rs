//! The short table the binary prints after a run: for each head the unique prototypes (greedy
//! and connected components) at every ε, NN distances, the KoLeo-proto value and the
//! displacement from step 0; then the teacher's target sharpness and its cluster use.

use std::fmt::Write;

use protodino_analysis::HeadFigures;

use crate::experiment::{AnalysisRecord, MechanismRecord};

fn head_line(h: &HeadFigures, k: i64) -> String {
    let mut s = format!("{:<8}", h.head);
    for c in &h.report.counts {
        let _ = write!(s, " {:>6}/{:<6}", c.greedy, c.connected_components);
    }
    let disp = h.displacement.as_ref().map_or(f64::NAN, |d| d.mean);
    let _ = write!(
        s,
        " | NN mean {:.4} min {:.4} | KoLeo {:>8.4} | displacement {:.4} | K {k}",
        h.report.nn.mean, h.report.nn.min, h.report.nn.koleo_proto, disp
    );
    s
}

/// The table of one analysis.
pub fn analysis_table(a: &AnalysisRecord, k: i64) -> String {
    let mut s = String::new();
    let mut header = format!("{:<8}", "eps");
    for c in &a.teacher.report.counts {
        let _ = write!(header, " {:>13}", format!("{}", c.eps));
    }
    let _ = writeln!(s, "step {}: unique prototypes greedy/components", a.step);
    let _ = writeln!(s, "{header}");
    let _ = writeln!(s, "{}", head_line(&a.teacher, k));
    let _ = writeln!(s, "{}", head_line(&a.student, k));
    let u = &a.usage;
    let _ = writeln!(
        s,
        "teacher targets: mean entropy {:.3} nats vs ln K {:.3} (ratio {:.3}, {:.1} prototypes per target)",
        a.sharpness.mean_sample_entropy,
        a.sharpness.ln_k,
        a.sharpness.relative,
        a.sharpness.effective_per_sample
    );
    let grouped = u.grouped.as_ref().map_or(String::new(), |g| {
        format!(
            "; grouped at eps {}: {} of {} groups used, grouped MLCD effective {:.1}",
            g.eps, g.used_groups, g.groups, g.mlcd.effective_number
        )
    });
    let _ = writeln!(
        s,
        "usage over {} samples: {} clusters used, MLCD effective {:.1}{grouped}",
        u.n_samples, u.used_clusters, u.mlcd.effective_number
    );
    s
}

/// The table of a run: its setting, then the final analysis.
pub fn run_table(r: &MechanismRecord) -> String {
    let o = &r.options;
    format!(
        "{} features: {} samples, dim {}, {} classes | K {} lambda {} | {} steps ({} per epoch), batch {}, lr {} | {:.1} s\n{}",
        r.features.source,
        r.features.samples,
        r.features.dim,
        r.features.classes,
        o.k,
        o.lambda,
        r.steps_run,
        r.steps_per_epoch,
        o.batch,
        o.lr,
        r.seconds,
        analysis_table(&r.final_figures, o.k)
    )
}
