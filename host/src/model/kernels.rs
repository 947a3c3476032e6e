//! Which attention kernel libtorch runs: an observer over RecordFunction
//! (`csrc/ops_observer.cpp`, the machinery torch.profiler is built on) that
//! counts the calls of `aten::scaled_dot_product_attention` and of the
//! kernel each one dispatched to. It is process-global, so it sees the SDPA
//! calls of the family plugins (their own tch, the same libtorch) and of
//! every thread.
//!
//! [`Observer::start`] registers the callback (nothing is registered
//! otherwise: no overhead); counts are kept only while a window is open
//! ([`Observer::window`]), which the trainer opens around each step's
//! forward and backward passes. The same callback reads the SDPA inputs'
//! shapes for the attention FLOPs of [`super::flops`].

use serde::{Deserialize, Serialize};

extern "C" {
    fn vlmhost_observer_enable(on: i32) -> i32;
    fn vlmhost_observer_count(on: i32);
    fn vlmhost_observer_only_this_thread(on: i32);
    fn vlmhost_attention_kernels(out: *mut i64, reset: i32);
    pub(super) fn vlmhost_attention_flops(out: *mut i64, reset: i32);
    pub(super) fn vlmhost_flops_pause(delta: i32);
    pub(super) fn vlmhost_grad_enabled() -> i32;
}

/// Calls of scaled-dot-product attention by the kernel libtorch chose
/// (forward calls; recomputed forwards included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttentionKernels {
    /// `aten::scaled_dot_product_attention` calls, whatever ran.
    pub calls: i64,
    /// FlashAttention on CUDA (`_scaled_dot_product_flash_attention`).
    pub flash: i64,
    /// The CPU's flash kernel (`_scaled_dot_product_flash_attention_for_cpu`).
    pub flash_cpu: i64,
    /// Memory-efficient attention on CUDA (`_scaled_dot_product_efficient_attention`).
    pub efficient: i64,
    /// cuDNN attention (`_scaled_dot_product_cudnn_attention`).
    pub cudnn: i64,
    /// The unfused math path (`_scaled_dot_product_attention_math`):
    /// materialises the `[L, S]` scores; slow and memory-hungry on CUDA.
    pub math: i64,
    /// Other fused kernels (`_fused_attention_overrideable`, MPS's math).
    pub other: i64,
}

impl AttentionKernels {
    /// The counts so far; `reset` starts them anew.
    pub fn read(reset: bool) -> AttentionKernels {
        let mut c = [0i64; 7];
        // SAFETY: `c` holds the seven counts the shim writes.
        unsafe { vlmhost_attention_kernels(c.as_mut_ptr(), reset as i32) };
        AttentionKernels { calls: c[0], flash: c[1], flash_cpu: c[2], efficient: c[3], cudnn: c[4], math: c[5], other: c[6] }
    }

    /// Each count plus `other`'s.
    pub fn add(&self, o: &AttentionKernels) -> AttentionKernels {
        AttentionKernels {
            calls: self.calls + o.calls,
            flash: self.flash + o.flash,
            flash_cpu: self.flash_cpu + o.flash_cpu,
            efficient: self.efficient + o.efficient,
            cudnn: self.cudnn + o.cudnn,
            math: self.math + o.math,
            other: self.other + o.other,
        }
    }

    /// `flash 96, math 0`-style: the kernels that ran, in one line.
    pub fn line(&self) -> String {
        let parts: Vec<String> = [
            ("flash", self.flash),
            ("flash_cpu", self.flash_cpu),
            ("efficient", self.efficient),
            ("cudnn", self.cudnn),
            ("math", self.math),
            ("other", self.other),
        ]
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
        if parts.is_empty() { "none".to_owned() } else { parts.join(", ") }
    }

    /// The warning a CUDA run deserves when attention took the math path.
    pub fn cuda_warning(&self) -> Option<String> {
        (self.math > 0).then(|| {
            format!(
                "attention took the math path {} of {} time(s) on CUDA (no fused kernel for these inputs: an explicit mask, \
                 an unsupported dtype or head size, or non-4-D inputs); it materialises the scores and is slower",
                self.math, self.calls
            )
        })
    }
}

/// The registered observer; dropping it removes the callback.
pub struct Observer(());

impl Observer {
    /// Register the process-global callback. One at a time is meant (a
    /// second start shares the first's callback; the first drop removes it).
    pub fn start() -> anyhow::Result<Observer> {
        // SAFETY: registers a RecordFunction callback; -1 on a libtorch error.
        if unsafe { vlmhost_observer_enable(1) } != 0 {
            anyhow::bail!("cannot register the attention-kernel observer with libtorch's RecordFunction");
        }
        Ok(Observer(()))
    }

    /// Count (attention kernels, attention FLOPs, and the host's linear
    /// FLOPs of [`super::flops`]) until the window is dropped.
    pub fn window(&self) -> Window<'_> {
        set_counting(true);
        Window(self)
    }

    /// [`Observer::window`] counting the attention calls of this thread only
    /// (a CPU backward runs on the caller's thread): for tests, whose
    /// neighbours in other threads run attention too.
    pub fn window_on_this_thread(&self) -> Window<'_> {
        // SAFETY: stores this thread's key in the shim.
        unsafe { vlmhost_observer_only_this_thread(1) };
        self.window()
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        set_counting(false);
        // SAFETY: removes the callback registered by `start`.
        let _ = unsafe { vlmhost_observer_enable(0) };
    }
}

/// An open counting window.
pub struct Window<'a>(#[allow(dead_code)] &'a Observer);

impl Drop for Window<'_> {
    fn drop(&mut self) {
        set_counting(false);
        // SAFETY: as above; every thread counts again.
        unsafe { vlmhost_observer_only_this_thread(0) };
    }
}

fn set_counting(on: bool) {
    // SAFETY: stores a flag in the shim.
    unsafe { vlmhost_observer_count(on as i32) };
    super::flops::set_counting(on);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind, Tensor};

    fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, causal: bool) -> Tensor {
        Tensor::scaled_dot_product_attention(q, k, v, mask, 0.0, causal, None, false)
    }

    // One test for the observer (it is process-global, and unit tests run in parallel threads).
    #[test]
    fn counts_the_kernel_libtorch_dispatches_to() {
        let _g = crate::model::flops::TEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let o = (Kind::Float, Device::Cpu);
        let (q, k, v) = (Tensor::randn([2, 4, 8, 16], o), Tensor::randn([2, 4, 8, 16], o), Tensor::randn([2, 4, 8, 16], o));
        // Before the observer is started, nothing is counted.
        let _ = AttentionKernels::read(true);
        let _ = sdpa(&q, &k, &v, None, true);
        assert_eq!(AttentionKernels::read(true), AttentionKernels::default());

        let obs = Observer::start().unwrap();
        {
            let _w = obs.window();
            // 4-D inputs, causal, fp32 and bf16: the CPU flash kernel (as torch 2.11 dispatches; cf. torch.profiler).
            let _ = sdpa(&q, &k, &v, None, true);
            let _ = sdpa(&q.to_kind(Kind::BFloat16), &k.to_kind(Kind::BFloat16), &v.to_kind(Kind::BFloat16), None, true);
            // An explicit boolean mask: still the CPU flash kernel on 2.11.
            let mask = Tensor::ones([8, 8], (Kind::Bool, Device::Cpu)).tril(0);
            let _ = sdpa(&q, &k, &v, Some(&mask), false);
            // 3-D inputs: no fused kernel, the math path.
            let _ = sdpa(&q.select(0, 0), &k.select(0, 0), &v.select(0, 0), None, true);
            // Under bf16 autocast the entry op runs twice (the outer call, autocast's re-dispatch): one attention.
            crate::model::autocast::bf16(Device::Cpu, || sdpa(&q, &k, &v, None, true));
        }
        // Outside the window: not counted.
        let _ = sdpa(&q, &k, &v, None, true);
        let c = AttentionKernels::read(true);
        assert_eq!(c, AttentionKernels { calls: 5, flash_cpu: 4, math: 1, ..Default::default() });
        assert_eq!(c.line(), "flash_cpu 4, math 1");
        assert!(c.cuda_warning().unwrap().contains("math path 1 of 5"));
        drop(obs);
        let _ = sdpa(&q, &k, &v, None, true);
        assert_eq!(AttentionKernels::read(true), AttentionKernels::default());
    }
}
