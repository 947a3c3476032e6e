//! Where this process stands in a data-parallel launch, read from the
//! environment: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
//! `MASTER_PORT` (what `torchrun --no-python` sets), or under `srun`
//! `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID` (with `MASTER_ADDR` set by
//! the job script). Neither set: not launched, a plain run.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::time::Duration;

/// The default bound on every wait for other ranks (rendezvous, store,
/// collectives), overridden by `VLMHOST_DIST_TIMEOUT` (seconds).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// This process's place in a launch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Launch {
    /// Who launched it: "torchrun" (or any launcher setting `RANK`) or "slurm".
    pub launcher: &'static str,
    pub rank: usize,
    pub world: usize,
    /// The rank on this node: the CUDA device it trains on.
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// torchrun's agent already serves the store at `MASTER_ADDR:MASTER_PORT`
    /// (`TORCHELASTIC_USE_AGENT_STORE`): every rank connects as a client.
    pub agent_store: bool,
    /// torchrun's restart count: keys of an earlier attempt are not reused.
    pub restart: u32,
    /// The bound on every wait for other ranks.
    #[serde(serialize_with = "seconds")]
    pub timeout: Duration,
}

fn seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl Launch {
    /// The launch this process's environment describes, if any.
    pub fn from_env() -> Result<Option<Launch>> {
        Launch::from_vars(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// As [`Launch::from_env`], with the variables from `var`.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        let num = |k: &str| -> Result<Option<usize>> {
            var(k).map(|v| v.trim().parse::<usize>().with_context(|| format!("{k}={v:?} is not a number (a data-parallel launch sets it)"))).transpose()
        };
        let (launcher, rank, world, local) = if let (Some(rank), Some(world)) = (num("RANK")?, num("WORLD_SIZE")?) {
            ("torchrun", rank, world, num("LOCAL_RANK")?.unwrap_or(rank))
        } else if var("RANK").is_some() || var("WORLD_SIZE").is_some() {
            bail!("RANK and WORLD_SIZE must be set together (as torchrun sets them); unset both for a plain run");
        } else if let (Some(rank), Some(world), Some(_step)) = (num("SLURM_PROCID")?, num("SLURM_NTASKS")?, var("SLURM_STEP_ID")) {
            if world < 2 {
                return Ok(None);
            }
            ("slurm", rank, world, num("SLURM_LOCALID")?.unwrap_or(0))
        } else {
            return Ok(None);
        };
        if world == 0 || rank >= world {
            bail!("rank {rank} is outside a world of {world} ({launcher}'s variables)");
        }
        let Some(master_addr) = var("MASTER_ADDR") else {
            bail!("MASTER_ADDR is not set: a data-parallel launch ({launcher}, rank {rank} of {world}) needs the address of rank 0's node (torchrun sets it; under srun export it, e.g. MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1))");
        };
        let master_port = match var("MASTER_PORT") {
            Some(p) => p.trim().parse::<u16>().with_context(|| format!("MASTER_PORT={p:?} is not a port number"))?,
            None => 29500,
        };
        let timeout = match var("VLMHOST_DIST_TIMEOUT") {
            Some(s) => {
                let secs: f64 = s.trim().parse().ok().filter(|v: &f64| *v > 0.0 && v.is_finite()).with_context(|| format!("VLMHOST_DIST_TIMEOUT={s:?}: give seconds, above 0"))?;
                Duration::from_secs_f64(secs)
            }
            None => DEFAULT_TIMEOUT,
        };
        Ok(Some(Launch {
            launcher,
            rank,
            world,
            local_rank: local,
            master_addr,
            master_port,
            agent_store: var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1"),
            restart: num("TORCHELASTIC_RESTART_COUNT")?.unwrap_or(0) as u32,
            timeout,
        }))
    }

    /// The `--device` this rank trains on, given the CUDA devices this
    /// process sees: `auto` (when there are any) and `cuda` become
    /// `cuda:LOCAL_RANK`, or `cuda:0` when the process sees a single GPU
    /// (`srun --gpus-per-task 1`, or `CUDA_VISIBLE_DEVICES` set per rank);
    /// anything else is kept.
    pub fn device_arg(&self, asked: &str, cuda_devices: i64) -> String {
        let index = if cuda_devices == 1 { 0 } else { self.local_rank };
        match asked {
            "auto" if cuda_devices > 0 => format!("cuda:{index}"),
            "cuda" => format!("cuda:{index}"),
            other => other.to_owned(),
        }
    }
}

impl std::fmt::Display for Launch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rank {} of {} (local rank {}) launched by {}, rendezvous at {}:{}{}, timeout {:.0} s",
            self.rank,
            self.world,
            self.local_rank,
            self.launcher,
            self.master_addr,
            self.master_port,
            if self.agent_store { " (torchrun's store)" } else { "" },
            self.timeout.as_secs_f64()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn launch(vars: &[(&str, &str)]) -> Result<Option<Launch>> {
        let m: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Launch::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn nothing_set_is_a_plain_run() {
        assert_eq!(launch(&[]).unwrap(), None);
        // sbatch's own shell, or a one-task step: not a launch.
        assert_eq!(launch(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1"), ("SLURM_STEP_ID", "0")]).unwrap(), None);
        assert_eq!(launch(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "4")]).unwrap(), None);
    }

    #[test]
    fn torchrun_and_slurm_variables() {
        let l = launch(&[("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "n0"), ("MASTER_PORT", "1234"), ("TORCHELASTIC_USE_AGENT_STORE", "True")])
            .unwrap()
            .unwrap();
        assert_eq!((l.launcher, l.rank, l.world, l.local_rank, l.master_port, l.agent_store), ("torchrun", 3, 4, 1, 1234, true));
        assert_eq!(l.device_arg("auto", 8), "cuda:1");
        assert_eq!(l.device_arg("auto", 1), "cuda:0", "one GPU per task");
        assert_eq!(l.device_arg("auto", 0), "auto");
        assert_eq!(l.device_arg("cpu", 8), "cpu");
        let s = launch(&[("SLURM_PROCID", "5"), ("SLURM_NTASKS", "8"), ("SLURM_LOCALID", "1"), ("SLURM_STEP_ID", "0"), ("MASTER_ADDR", "n0")]).unwrap().unwrap();
        assert_eq!((s.launcher, s.rank, s.world, s.local_rank, s.master_port, s.agent_store), ("slurm", 5, 8, 1, 29500, false));
    }

    #[test]
    fn bad_variables_are_named() {
        let e = launch(&[("RANK", "0"), ("WORLD_SIZE", "2")]).unwrap_err().to_string();
        assert!(e.contains("MASTER_ADDR"), "{e}");
        let e = launch(&[("RANK", "x"), ("WORLD_SIZE", "2")]).unwrap_err().to_string();
        assert!(e.contains("RANK=\"x\""), "{e}");
        let e = launch(&[("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "a")]).unwrap_err().to_string();
        assert!(e.contains("outside"), "{e}");
        let e = launch(&[("RANK", "0")]).unwrap_err().to_string();
        assert!(e.contains("together"), "{e}");
        let e = launch(&[("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "a"), ("VLMHOST_DIST_TIMEOUT", "0")]).unwrap_err().to_string();
        assert!(e.contains("VLMHOST_DIST_TIMEOUT"), "{e}");
    }
}
