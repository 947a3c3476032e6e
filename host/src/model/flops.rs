//! Model FLOPs of a training step, counted from what ran, and the peak
//! FLOP/s of known GPUs for MFU.
//!
//! The formula (floating-point operations; a multiply-add is 2):
//!
//! * Every linear layer the host runs (`ops::run_linear`: all the families'
//!   linear layers) on `rows` input rows, weight `[out, in]`:
//!   forward `2 * rows * in * out`; backward `2 * rows * in * out` for the
//!   input's gradient when the input requires grad (something upstream
//!   trains) plus the same for the weight's gradient when the weight trains.
//!   A LoRA adapter of rank `r` adds its two products the same way
//!   (`2 * rows * in * r` and `2 * rows * r * out`; `A` and `B` train).
//! * Every `scaled_dot_product_attention` call (any caller: seen by
//!   [`super::kernels::Observer`]), query `[B, H, L, E]`, key `[B, Hk, S, E]`,
//!   value `[B, Hk, S, Ev]`: forward `2 * B * H * L * S * (E + Ev)`, halved
//!   when causal without a mask; backward twice the forward when grad mode
//!   is on and q, k or v requires grad.
//! * Not counted: bias additions, norms, activations, softmax inside the
//!   linear/attention formulas, convolutions (patch embeddings), the loss,
//!   the optimizer: together a few per cent at most of a transformer's
//!   step at real sizes.
//!
//! These are model FLOPs: recomputation (activation checkpointing) runs
//! inside [`pause`], which the recompute code holds while it re-runs a
//! segment's forward, so the count of a step is the same with and without
//! checkpointing. The counters are process-global (atomics), not
//! thread-local, because autograd may run the recomputation on its own
//! thread (CUDA); they count only while the trainer's window is open
//! ([`super::kernels::Observer::window`]).
//!
//! MFU = model FLOPs of the step / step time / peak FLOP/s of the device;
//! [`peak_tflops`] knows the dense bf16 and fp32 peaks of common GPUs.

use super::kernels::{vlmhost_attention_flops, vlmhost_flops_pause, vlmhost_grad_enabled};
use super::lora::LoraAdapter;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use tch::Tensor;

static COUNTING: AtomicBool = AtomicBool::new(false);
static PAUSED: AtomicUsize = AtomicUsize::new(0);
static LINEAR_FORWARD: AtomicI64 = AtomicI64::new(0);
static LINEAR_BACKWARD: AtomicI64 = AtomicI64::new(0);

/// Serialises the unit tests that use the process-global counters.
#[cfg(test)]
pub(crate) static TEST_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub(super) fn set_counting(on: bool) {
    COUNTING.store(on, Ordering::SeqCst);
}

/// While the returned guard lives, nothing is counted as model FLOPs (the
/// host's linear layers and the attention calls alike). For activation
/// checkpointing's recomputation: `let _p = crate::model::flops::pause();`
/// before re-running a segment's forward in backward. Guards nest; they are
/// process-global, so a pause on autograd's thread pauses the counts of
/// every thread (the forward and backward of a step do not overlap).
#[must_use = "the pause ends when the guard is dropped"]
pub fn pause() -> Pause {
    PAUSED.fetch_add(1, Ordering::SeqCst);
    // SAFETY: an atomic add in the shim.
    unsafe { vlmhost_flops_pause(1) };
    Pause(())
}

/// A pause of the FLOP counts ([`pause`]).
pub struct Pause(());

impl Drop for Pause {
    fn drop(&mut self) {
        PAUSED.fetch_sub(1, Ordering::SeqCst);
        // SAFETY: an atomic add in the shim.
        unsafe { vlmhost_flops_pause(-1) };
    }
}

fn counting() -> bool {
    COUNTING.load(Ordering::Relaxed) && PAUSED.load(Ordering::Relaxed) == 0
}

/// Whether autograd records operations on this thread.
pub fn grad_enabled() -> bool {
    // SAFETY: reads c10's thread-local GradMode.
    unsafe { vlmhost_grad_enabled() != 0 }
}

/// The (forward, backward) FLOPs of `x W^T` with weight `[out, in]` on
/// `rows` rows, plus its LoRA adapter of rank `r` when given as
/// `(r, a_trains, b_trains)`, by the formula of this module.
pub fn linear_flops(rows: i64, in_f: i64, out_f: i64, x_grad: bool, w_grad: bool, lora: Option<(i64, bool, bool)>) -> (i64, i64) {
    let base = 2 * rows * in_f * out_f;
    let mut fwd = base;
    let mut bwd = base * (x_grad as i64 + w_grad as i64);
    if let Some((r, a_grad, b_grad)) = lora {
        let (fa, fb) = (2 * rows * in_f * r, 2 * rows * r * out_f);
        fwd += fa + fb;
        // A's output (B's input) needs grad when x or A does.
        bwd += fa * (x_grad as i64 + a_grad as i64) + fb * ((x_grad || a_grad) as i64 + b_grad as i64);
    }
    (fwd, bwd)
}

/// Count one host linear layer (`ops::run_linear`): input `x`, weight `w`, adapter.
pub(super) fn count_linear(x: &Tensor, w: &Tensor, adapter: Option<&LoraAdapter>) {
    if !counting() {
        return;
    }
    let (Ok((out_f, in_f)), n) = (w.size2(), x.numel() as i64) else { return };
    if in_f == 0 {
        return;
    }
    let grad = grad_enabled();
    let lora = adapter.map(|a| (a.a.size()[0], grad && a.a.requires_grad(), grad && a.b.requires_grad()));
    let (f, b) = linear_flops(n / in_f, in_f, out_f, grad && x.requires_grad(), grad && w.requires_grad(), lora);
    LINEAR_FORWARD.fetch_add(f, Ordering::Relaxed);
    LINEAR_BACKWARD.fetch_add(b, Ordering::Relaxed);
}

/// The model FLOPs counted since the last [`StepFlops::take`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepFlops {
    pub linear_forward: i64,
    pub linear_backward: i64,
    pub attention_forward: i64,
    pub attention_backward: i64,
}

impl StepFlops {
    /// The counts so far, and start them anew.
    pub fn take() -> StepFlops {
        let mut a = [0i64; 2];
        // SAFETY: `a` holds the two counts the shim writes.
        unsafe { vlmhost_attention_flops(a.as_mut_ptr(), 1) };
        StepFlops {
            linear_forward: LINEAR_FORWARD.swap(0, Ordering::SeqCst),
            linear_backward: LINEAR_BACKWARD.swap(0, Ordering::SeqCst),
            attention_forward: a[0],
            attention_backward: a[1],
        }
    }

    pub fn total(&self) -> i64 {
        self.linear_forward + self.linear_backward + self.attention_forward + self.attention_backward
    }
}

/// Dense peak TFLOP/s of a GPU by its name (as NVML or `nvidia-smi` give it):
/// `(bf16 tensor cores, fp32 without TF32)`, from NVIDIA's data sheets
/// (SXM parts unless the name says PCIe). `None` for an unknown GPU.
pub fn known_peak_tflops(name: &str) -> Option<(f64, f64)> {
    let n = name.to_ascii_uppercase();
    let has = |w: &str| n.split(|c: char| !c.is_ascii_alphanumeric()).any(|t| t == w);
    let pcie = n.contains("PCIE");
    // The most specific first (GH200 is an H100-class GPU; H200 before H20).
    let table: &[(&str, (f64, f64))] = &[
        ("B200", (2250.0, 80.0)),
        ("GH200", (989.0, 67.0)),
        ("H200", (989.0, 67.0)),
        ("H100", if pcie { (756.0, 51.0) } else { (989.0, 67.0) }),
        ("H800", if pcie { (756.0, 51.0) } else { (989.0, 67.0) }),
        ("H20", (148.0, 44.0)),
        ("A100", (312.0, 19.5)),
        ("A800", (312.0, 19.5)),
        ("L40S", (362.0, 91.6)),
        ("L40", (181.0, 90.5)),
        ("L4", (121.0, 30.3)),
        ("A10G", (70.0, 31.2)),
        ("A10", (125.0, 31.2)),
        ("A6000", (154.8, 38.7)),
        ("4090", (165.2, 82.6)),
        ("3090", (71.0, 35.6)),
    ];
    table.iter().find(|(k, _)| has(k)).map(|(_, v)| *v)
}

/// The peak TFLOP/s an MFU is taken against: `override_tflops` when given,
/// else the known peak of the CUDA device's GPU for the precision; `None`
/// on the CPU (no table) or an unknown GPU.
pub fn peak_tflops(device: tch::Device, bf16: bool, override_tflops: Option<f64>) -> Option<f64> {
    if override_tflops.is_some() {
        return override_tflops;
    }
    let tch::Device::Cuda(index) = device else { return None };
    let gpus = crate::plugin::torch_env::nvidia_gpus().ok()?;
    // CUDA_VISIBLE_DEVICES renumbers; every GPU of a node is usually the same model, else take the visible one.
    let visible: Option<usize> = std::env::var("CUDA_VISIBLE_DEVICES")
        .ok()
        .and_then(|v| v.split(',').nth(index).and_then(|s| s.trim().parse().ok()));
    let gpu = gpus.iter().find(|g| g.index as usize == visible.unwrap_or(index))?;
    known_peak_tflops(&gpu.name).map(|(b, f)| if bf16 { b } else { f })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::Observer;
    use tch::{Device, Kind};

    #[test]
    fn linear_formula() {
        // Frozen base, input without grad: forward only.
        assert_eq!(linear_flops(3, 4, 5, false, false, None), (120, 0));
        // Input grad and weight grad: 2x forward.
        assert_eq!(linear_flops(3, 4, 5, true, true, None), (120, 240));
        // LoRA r=2 on a frozen base whose input needs no grad: A's weight grad, B's input and weight grads.
        let (fa, fb) = (2 * 3 * 4 * 2, 2 * 3 * 2 * 5);
        assert_eq!(linear_flops(3, 4, 5, false, false, Some((2, true, true))), (120 + fa + fb, fa + 2 * fb));
        assert_eq!(linear_flops(3, 4, 5, true, false, Some((2, true, true))), (120 + fa + fb, 120 + 2 * fa + 2 * fb));
    }

    #[test]
    fn peaks_by_name() {
        assert_eq!(known_peak_tflops("NVIDIA H200"), Some((989.0, 67.0)));
        assert_eq!(known_peak_tflops("NVIDIA H100 80GB HBM3"), Some((989.0, 67.0)));
        assert_eq!(known_peak_tflops("NVIDIA H100 PCIe"), Some((756.0, 51.0)));
        assert_eq!(known_peak_tflops("NVIDIA H20"), Some((148.0, 44.0)));
        assert_eq!(known_peak_tflops("NVIDIA A100-SXM4-80GB"), Some((312.0, 19.5)));
        assert_eq!(known_peak_tflops("NVIDIA L40S"), Some((362.0, 91.6)));
        assert_eq!(known_peak_tflops("NVIDIA GeForce RTX 4090"), Some((165.2, 82.6)));
        assert_eq!(known_peak_tflops("Tesla T4"), None);
        assert_eq!(peak_tflops(Device::Cpu, true, None), None);
        assert_eq!(peak_tflops(Device::Cpu, false, Some(1.5)), Some(1.5));
    }

    // The host's linear layers and SDPA, counted in a window, paused, and not outside it.
    #[test]
    fn counts_linear_and_attention_in_the_window_only() {
        let _g = TEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let o = (Kind::Float, Device::Cpu);
        let obs = Observer::start().unwrap();
        let _ = StepFlops::take();
        let w = Tensor::randn([5, 4], o).set_requires_grad(true);
        let x = Tensor::randn([2, 3, 4], o);
        let (q, k, v) = (Tensor::randn([2, 4, 8, 16], o).set_requires_grad(true), Tensor::randn([2, 2, 8, 16], o), Tensor::randn([2, 2, 8, 32], o));
        count_linear(&x, &w, None);
        let _ = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<&Tensor>, 0.0, true, None, true);
        assert_eq!(StepFlops::take(), StepFlops::default(), "no window open");
        {
            let _w = obs.window();
            count_linear(&x, &w, None); // 6 rows: 240 forward, weight grad 240
            // GQA, causal: 2 * (2*4) * 8 * 8 * (16 + 32) / 2, backward twice that (q requires grad).
            let _ = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<&Tensor>, 0.0, true, None, true);
            {
                let _p = pause();
                count_linear(&x, &w, None);
                let _ = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<&Tensor>, 0.0, true, None, true);
            }
            // Under bf16 autocast: the same attention once (autocast re-dispatches the entry op).
            let _ = crate::model::autocast::bf16(Device::Cpu, || {
                Tensor::scaled_dot_product_attention(&q, &k, &v, None::<&Tensor>, 0.0, true, None, true)
            });
            // Without grad mode: forward only.
            let _ng = tch::no_grad_guard();
            count_linear(&x, &w, None);
        }
        let att = 2 * 8 * 8 * 8 * 48 / 2;
        assert_eq!(StepFlops::take(), StepFlops { linear_forward: 480, linear_backward: 240, attention_forward: 2 * att, attention_backward: 4 * att });
        drop(obs);
    }
}
