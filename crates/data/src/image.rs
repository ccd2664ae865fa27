//! The decoded image every transform works on: 8-bit RGB, interleaved, row-major.
//!
//! The DINO pipeline runs on PIL images, which are 8-bit between every operation; keeping
//! `u8` between our transforms reproduces PIL's intermediate rounding, and the only float
//! conversion is the final normalisation into the output buffer.

/// An 8-bit RGB image (`data.len() == 3 * width * height`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl RgbImage {
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Option<Self> {
        (data.len() == 3 * width * height && width > 0 && height > 0).then_some(Self {
            width,
            height,
            data,
        })
    }

    /// A grey image entering the colour pipeline: three equal channels (PIL `convert("RGB")`).
    pub fn from_gray(width: usize, height: usize, gray: &[u8]) -> Option<Self> {
        if gray.len() != width * height {
            return None;
        }
        let mut data = Vec::with_capacity(3 * gray.len());
        for &v in gray {
            data.extend_from_slice(&[v, v, v]);
        }
        Self::new(width, height, data)
    }
}

/// ImageNet channel means and standard deviations (docs/algorithm.md §1.2).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// `ToTensor` + `Normalize`: interleaved u8 HWC → planar normalised f32 CHW in `out`
/// (`out.len() == pixels.len()`).
pub fn normalize_into(pixels: &[u8], out: &mut [f32]) {
    let n = pixels.len() / 3;
    debug_assert_eq!(out.len(), pixels.len());
    let (r, rest) = out.split_at_mut(n);
    let (g, b) = rest.split_at_mut(n);
    // (v/255 − mean)/std as one multiply-add per value; matches torchvision to ~1e-7.
    let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * IMAGENET_STD[c]));
    let shift: [f32; 3] = std::array::from_fn(|c| -IMAGENET_MEAN[c] / IMAGENET_STD[c]);
    for (k, px) in pixels.chunks_exact(3).enumerate() {
        r[k] = px[0] as f32 * scale[0] + shift[0];
        g[k] = px[1] as f32 * scale[1] + shift[1];
        b[k] = px[2] as f32 * scale[2] + shift[2];
    }
}
