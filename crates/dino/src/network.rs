//! What the step needs from a network: crop-major logits and the effective prototypes, and for
//! iBOT the CLS and patch logits with masked global crops and the patch prototypes.
//!
//! [`DinoNetwork`] is implemented for `protodino_models::MultiCrop` (in `multicrop`), and by
//! the tiny reference network of the golden tests, so the very same step code is checked against
//! PyTorch. Also here: device parsing and the bf16 autocast switch.

use protodino_models::{ForwardCtx, IbotLogits};
use tch::{Device, Tensor};

use crate::error::{DinoError, Result};

/// A DINO network: backbone + projection head behind a multi-crop wrapper.
pub trait DinoNetwork {
    /// Logits `[Σ N_crop, K]` of crops given in the official order (global-1, global-2,
    /// locals), crop-major.
    fn forward(&self, crops: &[Tensor], ctx: &ForwardCtx) -> Tensor;
    /// The effective prototypes `w_k = g_k v_k/‖v_k‖`, `[K, d]`, in the autograd graph.
    fn prototypes(&self) -> Tensor;
    /// iBOT (docs/algorithm.md §5.3): CLS logits `[Σ N_crop, K]` of every crop and patch logits
    /// `[n_global·B, P, K₂]` of the first `n_global` crops, whose patch embeddings are replaced
    /// by the mask token where `masks` (`[B, h, w]` bool per global crop) is true. `None` (the
    /// default) for a network without patch tokens.
    fn forward_ibot(
        &self,
        _crops: &[Tensor],
        _n_global: usize,
        _masks: Option<&[Tensor]>,
        _ctx: &ForwardCtx,
    ) -> Option<IbotLogits> {
        None
    }
    /// iBOT: the effective rows of a separate patch prototype layer (`last_layer2`), `[K₂, d]`
    /// in the autograd graph; `None` (the default) when the patch tokens use [`Self::prototypes`].
    fn separate_patch_prototypes(&self) -> Option<Tensor> {
        None
    }
    /// The prototypes of the patch logits: the separate layer's, else [`Self::prototypes`].
    fn patch_prototypes(&self) -> Tensor {
        self.separate_patch_prototypes()
            .unwrap_or_else(|| self.prototypes())
    }
}

/// `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .map(Device::Cuda)
            .ok_or_else(|| DinoError::Config(format!("train.device: unknown device `{s}`"))),
    }
}

// `at::autocast::set_autocast_dtype(c10::DeviceType, c10::ScalarType)`, exported by
// libtorch_cpu (a stable ATen API). tch 0.24 only toggles autocast, whose CUDA dtype defaults
// to fp16; DINO without a GradScaler needs bf16. Both enums are `int8_t` enum classes, passed as
// integers under the SysV ABI.
unsafe extern "C" {
    #[link_name = "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"]
    fn at_autocast_set_autocast_dtype(device_type: i8, dtype: i8);
}

const C10_DEVICE_CUDA: i8 = 1;
const C10_SCALAR_BFLOAT16: i8 = 15;

/// Make CUDA autocast regions (tch's `autocast(true, …)`) compute in bf16. A process-wide setting
/// of libtorch; harmless on a CPU-only build.
pub fn use_bf16_autocast() {
    // SAFETY: a plain setter of a thread-local/global ATen value with two integer arguments;
    // the symbol exists in every libtorch 2.x (checked with `nm -D` for 2.11.0).
    unsafe { at_autocast_set_autocast_dtype(C10_DEVICE_CUDA, C10_SCALAR_BFLOAT16) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        assert_eq!(parse_device("cuda").unwrap(), Device::Cuda(0));
        assert_eq!(parse_device("cuda:3").unwrap(), Device::Cuda(3));
        assert!(parse_device("tpu").is_err());
    }

    #[test]
    fn bf16_autocast_switch_links_and_runs() {
        // Sets the CUDA autocast dtype of this thread; links against libtorch_cpu's symbol and
        // must not disturb CPU computation.
        use_bf16_autocast();
        let x = Tensor::ones([2, 2], (tch::Kind::Float, Device::Cpu));
        let y = tch::autocast(true, || x.mm(&x));
        assert_eq!(y.kind(), tch::Kind::Float);
        assert_eq!(y.double_value(&[0, 0]), 2.0);
    }
}
