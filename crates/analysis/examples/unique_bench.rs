//! Times the unique-prototype analysis at the paper's scale (K = 65536, d = 256): a freshly
//! initialised head (Kaiming-uniform rows) and a partially collapsed one (K rows drawn around
//! `--groups` directions with a spread far below ε = 0.025).
//!
//! `cargo run -p protodino-analysis --example unique_bench -- [K] [groups]`

use std::time::Instant;

use protodino_analysis::unique::{UniqueOptions, analyze_unique};
use tch::{Kind, Tensor};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let k: i64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(65536);
    let groups: i64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1000);
    tch::manual_seed(0);
    let opts = UniqueOptions::default();

    let fresh = (Tensor::rand([k, 256], (Kind::Float, tch::Device::Cpu)) * 2.0 - 1.0) / 16.0;
    let t = Instant::now();
    let a = analyze_unique(&fresh, &opts).expect("analysis");
    println!(
        "fresh head K={k}: {:.2} s\n{}",
        t.elapsed().as_secs_f64(),
        serde_json::to_string(&a.report).expect("json")
    );

    let centres = Tensor::randn([groups, 256], (Kind::Float, tch::Device::Cpu));
    let which = Tensor::randint(groups, [k], (Kind::Int64, tch::Device::Cpu));
    let collapsed = centres.index_select(0, &which)
        + Tensor::randn([k, 256], (Kind::Float, tch::Device::Cpu)) * 1e-4;
    let t = Instant::now();
    let a = analyze_unique(&collapsed, &opts).expect("analysis");
    println!(
        "collapsed head K={k} around {groups} directions: {:.2} s\n{}",
        t.elapsed().as_secs_f64(),
        serde_json::to_string(&a.report).expect("json")
    );
}
