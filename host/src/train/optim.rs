//! AdamW over the host's trainable tensors, with parameter groups (per role,
//! with and without weight decay). It follows `torch.optim.AdamW`
//! (decoupled weight decay, bias-corrected moments); frozen parameters never
//! enter it, so they carry no state.
//!
//! Every parameter it holds is updated at every step: an undefined gradient
//! (an expert no token was routed to) counts as zero, so the moments keep
//! decaying and moving the parameter. Whether a gradient is undefined or
//! zero depends on the process's history (a fresh run's zeroed gradients stay
//! defined; a resumed run starts with none), so skipping undefined ones would
//! make a resumed run diverge from an uninterrupted one.

use crate::config::OptimizerConfig;
use crate::model::HostModel;
use std::collections::HashMap;
use tch::Tensor;
use vlmhost_plugin_api::Role;

/// A parameter group: its tensors share a learning-rate scale and decay.
#[derive(Debug, Clone)]
pub struct Group {
    pub name: String,
    pub lr_scale: f64,
    pub weight_decay: f64,
}

struct Slot {
    name: String,
    param: Tensor,
    group: usize,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// The optimizer.
pub struct AdamW {
    pub groups: Vec<Group>,
    slots: Vec<Slot>,
    pub betas: (f64, f64),
    pub eps: f64,
    /// Steps taken.
    pub step: i64,
}

impl AdamW {
    /// An optimizer over everything that trains in `model`: one group per
    /// role and decay class, with the role's learning-rate scale.
    pub fn for_model(model: &HostModel, o: &OptimizerConfig) -> AdamW {
        let mut opt = AdamW::new((o.betas[0], o.betas[1]), o.eps);
        let mut groups: HashMap<(Role, bool), usize> = HashMap::new();
        for t in model.trainables() {
            let g = *groups.entry((t.role, t.decays)).or_insert_with(|| {
                opt.add_group(Group {
                    name: format!("{}{}", t.role, if t.decays { "" } else { "/no_decay" }),
                    lr_scale: model.plan().role_plans[&t.role].lr_scale,
                    weight_decay: if t.decays { o.weight_decay } else { 0.0 },
                })
            });
            opt.add(&t.name, &t.tensor, g);
        }
        opt
    }

    pub fn new(betas: (f64, f64), eps: f64) -> Self {
        AdamW { groups: Vec::new(), slots: Vec::new(), betas, eps, step: 0 }
    }

    /// Add a group; returns its index.
    pub fn add_group(&mut self, group: Group) -> usize {
        self.groups.push(group);
        self.groups.len() - 1
    }

    /// Add a trainable tensor (`requires_grad` must be set) to group `group`,
    /// under a unique `name` (its key in saved optimizer states).
    pub fn add(&mut self, name: &str, param: &Tensor, group: usize) {
        let _g = tch::no_grad_guard();
        self.slots.push(Slot {
            name: name.to_owned(),
            param: param.shallow_clone(),
            group,
            exp_avg: param.zeros_like(),
            exp_avg_sq: param.zeros_like(),
        });
    }

    /// The moments, by `{name}.exp_avg` / `{name}.exp_avg_sq`, for checkpoints.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.slots
            .iter()
            .flat_map(|s| {
                [(format!("{}.exp_avg", s.name), s.exp_avg.shallow_clone()), (format!("{}.exp_avg_sq", s.name), s.exp_avg_sq.shallow_clone())]
            })
            .collect()
    }

    /// Restore moments saved by [`AdamW::state_tensors`]; every tensor must be there.
    pub fn load_state(&mut self, tensors: &std::collections::HashMap<String, Tensor>, step: i64) -> Result<(), String> {
        let _g = tch::no_grad_guard();
        for s in &mut self.slots {
            for (suffix, dst) in [("exp_avg", &mut s.exp_avg), ("exp_avg_sq", &mut s.exp_avg_sq)] {
                let key = format!("{}.{suffix}", s.name);
                let src = tensors.get(&key).ok_or_else(|| format!("optimizer state has no {key}"))?;
                if src.size() != dst.size() {
                    return Err(format!("optimizer state {key} has shape {:?}, the parameter {:?}", src.size(), dst.size()));
                }
                dst.copy_(src);
            }
        }
        self.step = step;
        Ok(())
    }

    /// The global L2 norm of all gradients; scales them down to `max_norm`
    /// when above (as `torch.nn.utils.clip_grad_norm_`). Returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> Result<f64, tch::TchError> {
        let _g = tch::no_grad_guard();
        let mut total = 0f64;
        for s in &self.slots {
            let g = s.param.grad();
            if g.defined() {
                let n = g.f_norm()?.f_double_value(&[])?;
                total += n * n;
            }
        }
        let norm = total.sqrt();
        if max_norm > 0.0 && norm.is_finite() && norm > max_norm {
            let coef = max_norm / (norm + 1e-6);
            for s in &self.slots {
                let mut g = s.param.grad();
                if g.defined() {
                    let _ = g.f_mul_scalar_(coef)?;
                }
            }
        }
        Ok(norm)
    }

    /// Zero every gradient.
    pub fn zero_grad(&mut self) {
        for s in &mut self.slots {
            let mut g = s.param.grad();
            if g.defined() {
                let _ = g.detach_().zero_();
            }
        }
    }

    /// One update with base learning rate `lr`.
    pub fn step(&mut self, lr: f64) -> Result<(), tch::TchError> {
        let _g = tch::no_grad_guard();
        self.step += 1;
        let (b1, b2) = self.betas;
        let bc1 = 1.0 - b1.powi(self.step as i32);
        let bc2 = 1.0 - b2.powi(self.step as i32);
        for s in &mut self.slots {
            let grad = s.param.grad();
            let grad = if grad.defined() { grad } else { s.param.zeros_like() };
            let group = &self.groups[s.group];
            let lr = lr * group.lr_scale;
            if group.weight_decay != 0.0 {
                let _ = s.param.f_mul_scalar_(1.0 - lr * group.weight_decay)?;
            }
            let _ = s.exp_avg.f_lerp_(&grad, 1.0 - b1)?;
            let _ = s.exp_avg_sq.f_mul_scalar_(b2)?;
            let _ = s.exp_avg_sq.f_add_(&grad.f_square()?.f_mul_scalar(1.0 - b2)?)?;
            let denom = s.exp_avg_sq.f_sqrt()?.f_div_scalar(bc2.sqrt())?.f_add_scalar(self.eps)?;
            let update = s.exp_avg.f_div(&denom)?.f_mul_scalar(lr / bc1)?;
            let _ = s.param.f_sub_(&update)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// Two steps of AdamW on f(p) = sum(p^2), checked against the update rule
    /// computed by hand in f64.
    #[test]
    fn matches_the_adamw_rule() {
        let p = Tensor::from_slice(&[1.0f64, -2.0]).set_requires_grad(true);
        let mut opt = AdamW::new((0.9, 0.999), 1e-8);
        let g = opt.add_group(Group { name: "g".into(), lr_scale: 0.5, weight_decay: 0.1 });
        opt.add("p", &p, g);
        let (mut m, mut v, mut x) = ([0.0f64; 2], [0.0f64; 2], [1.0f64, -2.0]);
        for t in 1..=2 {
            opt.zero_grad();
            p.square().sum(Kind::Double).backward();
            opt.step(0.2).unwrap();
            let lr = 0.2 * 0.5;
            for i in 0..2 {
                let grad = 2.0 * x[i];
                x[i] *= 1.0 - lr * 0.1;
                m[i] = 0.9 * m[i] + 0.1 * grad;
                v[i] = 0.999 * v[i] + 0.001 * grad * grad;
                let mh = m[i] / (1.0 - 0.9f64.powi(t));
                let denom = v[i].sqrt() / (1.0 - 0.999f64.powi(t)).sqrt() + 1e-8;
                x[i] -= lr * mh / denom;
            }
        }
        let got: Vec<f64> = Vec::try_from(p.detach()).unwrap();
        for i in 0..2 {
            assert!((got[i] - x[i]).abs() < 1e-12, "{got:?} vs {x:?}");
        }
        let _ = Device::Cpu;
    }

    /// A parameter that gets no gradient in a step (an expert no token
    /// reached) moves the same whether its gradient is a zeroed tensor (an
    /// uninterrupted run) or undefined (the first step after a resume).
    #[test]
    fn a_missing_gradient_counts_as_zero_so_resume_is_exact() {
        let make = |x: &[f64]| {
            let p = Tensor::from_slice(x).set_requires_grad(true);
            let mut opt = AdamW::new((0.9, 0.999), 1e-8);
            let g = opt.add_group(Group { name: "g".into(), lr_scale: 1.0, weight_decay: 0.0 });
            opt.add("p", &p, g);
            (p, opt)
        };
        // Uninterrupted: step 1 with a gradient, step 2 without (zeroed, defined).
        let (p, mut opt) = make(&[1.0, -2.0]);
        p.square().sum(Kind::Double).backward();
        opt.step(0.1).unwrap();
        let after_one = p.detach().copy();
        let moments: std::collections::HashMap<String, Tensor> = opt.state_tensors().into_iter().map(|(k, t)| (k, t.copy())).collect();
        opt.zero_grad();
        opt.step(0.1).unwrap();
        // Resumed after step 1: same values and moments, gradient undefined.
        let (mut q, mut resumed) = make(&[0.0, 0.0]);
        tch::no_grad(|| q.copy_(&after_one));
        resumed.load_state(&moments, 1).unwrap();
        assert!(!q.grad().defined());
        resumed.zero_grad();
        resumed.step(0.1).unwrap();
        assert!(p.detach().equal(&q.detach()), "{p} vs {q}");
        assert!(!p.detach().equal(&after_one), "the moments move a parameter without a gradient");
    }
}
