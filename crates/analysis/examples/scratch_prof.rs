use std::time::Instant;
use tch::{Kind, Tensor};
fn main() {
    let k = 65536;
    let b = 2048;
    let mu = Tensor::randn([k, 256], (Kind::Float, tch::Device::Cpu));
    let mu = &mu / mu.norm_scalaropt_dim(2.0, [1i64].as_slice(), true);
    let t = Instant::now();
    let s = mu.narrow(0, 0, b).matmul(&mu.tr());
    println!("gemm {:.3}", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let _ = s.max_dim(1, false);
    println!("rowmax {:.3}", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let _ = s.amax([0i64].as_slice(), false);
    println!("amax0 {:.3}", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let st = s.tr().contiguous();
    let _ = st.max_dim(1, false);
    println!("tr+rowmax {:.3}", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let m = s.gt(0.3);
    let nz = m.nonzero();
    println!(
        "gt+nonzero {:.3} {:?}",
        t.elapsed().as_secs_f64(),
        nz.size()
    );
    let t = Instant::now();
    let mut buf = vec![0f32; (b * k) as usize];
    s.copy_data(&mut buf, (b * k) as usize);
    let c = buf.iter().filter(|&&v| v > 0.3).count();
    println!("copy+scan {:.3} {c}", t.elapsed().as_secs_f64());
}
