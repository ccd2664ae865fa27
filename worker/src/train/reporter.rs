//! What a training run tells its user: a progress bar on the terminal, one JSON line per logged
//! step in `<output_dir>/metrics.jsonl` (and on stdout with `--json`), and a final report.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::Path;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

pub struct Reporter {
    bar: ProgressBar,
    log: BufWriter<File>,
    json: bool,
}

impl Reporter {
    /// `total_steps` sizes the bar; `json` prints every record on stdout instead of a bar.
    pub fn new(output_dir: &Path, total_steps: u64, json: bool) -> std::io::Result<Self> {
        std::fs::create_dir_all(output_dir)?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(output_dir.join("metrics.jsonl"))?;
        let bar = if json {
            ProgressBar::with_draw_target(Some(total_steps), ProgressDrawTarget::hidden())
        } else {
            ProgressBar::with_draw_target(Some(total_steps), ProgressDrawTarget::stderr())
        };
        bar.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} steps  {msg}")
                .expect("static template")
                .progress_chars("=> "),
        );
        Ok(Self {
            bar,
            log: BufWriter::new(log),
            json,
        })
    }

    /// Prints nothing (the ranks other than 0 of a data-parallel run); the log file stays.
    pub fn silent(mut self) -> Self {
        self.bar.set_draw_target(ProgressDrawTarget::hidden());
        self.json = false;
        self
    }

    /// Record one JSON object (a step, an analysis, an evaluation).
    pub fn record(&mut self, value: &Value) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.log, value)?;
        self.log.write_all(b"\n")?;
        self.log.flush()?;
        if self.json {
            println!("{value}");
        }
        Ok(())
    }

    pub fn set_step(&self, step: u64, message: String) {
        self.bar.set_position(step);
        self.bar.set_message(message);
    }

    /// A line above the bar (human mode only).
    pub fn println(&self, line: impl AsRef<str>) {
        if !self.json {
            self.bar.println(line.as_ref());
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
