//! The daemon's thread budget: how the CPU cores are shared between ONNX
//! Runtime's intra-op threads (the inference thread and its pool), the
//! decode workers and the async runtime that carries MQTT.
//!
//! Every figure can be set in the config (`runtime.intra_threads`,
//! `runtime.allow_spinning`, `runtime.io_threads`,
//! `pipeline.decode_workers`); 0 or unset means derived here from the core
//! count:
//!
//! - intra-op threads: every core. On CPU, inference is the costly stage
//!   (with the bundled test model a crop's decode and resize take about
//!   0.35 ms of one core, its inference about 2 ms of core time at batch
//!   1; real models cost more), and on 2 cores 2 threads gave 1.3x the
//!   saturated throughput of 1 and a lower unloaded latency;
//! - decode workers: what inference leaves, a quarter of the cores, at
//!   least 1 — sharing the cores with the intra-op pool, whose threads
//!   sleep between batches (spinning off). With a GPU provider, every core
//!   but the inference thread's;
//! - spinning: off when the intra-op pool and the decode workers together
//!   ask for more than every core (a spinning pool thread burns the core a
//!   decode worker needs); on only when the pool has cores of its own;
//! - async runtime: 1 worker thread up to 4 cores, 2 beyond (it only moves
//!   MQTT packets).
//!
//! On 2 cores: 2 intra-op threads, no spinning, 1 decode worker, 1 async
//! worker.
//!
//! The offline commands (`recognize`, `enroll`, `eval`) run nothing beside
//! inference and keep ONNX Runtime's own defaults.

use crate::config::{PipelineConfig, RuntimeConfig};

/// Threads the daemon runs, per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadBudget {
    /// Cores the budget shares out.
    pub cores: usize,
    /// ONNX Runtime threads inside one operator, the calling (inference)
    /// thread included.
    pub intra_threads: usize,
    /// Whether ONNX Runtime's idle intra-op threads spin waiting for work.
    pub allow_spinning: bool,
    /// Decode/preprocess worker threads.
    pub decode_workers: usize,
    /// Worker threads of the async runtime.
    pub io_threads: usize,
}

/// Cores this process may use (1 when that cannot be told).
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl ThreadBudget {
    /// The budget for `cores` cores: what `runtime` and `pipeline` set,
    /// the rest derived. `gpu`: inference runs on a GPU provider, so the
    /// inference thread mostly waits and decode workers get the other cores.
    pub fn derive(
        cores: usize,
        runtime: &RuntimeConfig,
        pipeline: &PipelineConfig,
        gpu: bool,
    ) -> Self {
        let cores = cores.max(1);
        let intra_threads = match runtime.intra_threads {
            0 => cores,
            n => n,
        };
        let decode_workers = match pipeline.decode_workers {
            0 if gpu => cores.saturating_sub(1).max(1),
            0 => (cores / 4).max(1),
            n => n,
        };
        let allow_spinning = runtime
            .allow_spinning
            .unwrap_or(intra_threads > 1 && intra_threads + decode_workers <= cores);
        let io_threads = match runtime.io_threads {
            0 if cores <= 4 => 1,
            0 => 2,
            n => n,
        };
        Self {
            cores,
            intra_threads,
            allow_spinning,
            decode_workers,
            io_threads,
        }
    }

    /// The budget for this machine's cores.
    pub fn for_this_machine(runtime: &RuntimeConfig, pipeline: &PipelineConfig, gpu: bool) -> Self {
        Self::derive(available_cores(), runtime, pipeline, gpu)
    }

    /// `runtime` with the budget's ONNX Runtime threading filled in, for
    /// the daemon's engine.
    pub fn apply(&self, runtime: &RuntimeConfig) -> RuntimeConfig {
        RuntimeConfig {
            intra_threads: self.intra_threads,
            allow_spinning: Some(self.allow_spinning),
            io_threads: self.io_threads,
            ..runtime.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(cores: usize, gpu: bool) -> ThreadBudget {
        ThreadBudget::derive(
            cores,
            &RuntimeConfig::default(),
            &PipelineConfig::default(),
            gpu,
        )
    }

    #[test]
    fn two_cores_give_two_intra_op_threads_one_decode_worker_and_no_spinning() {
        let b = budget(2, false);
        assert_eq!(
            (
                b.intra_threads,
                b.decode_workers,
                b.allow_spinning,
                b.io_threads
            ),
            (2, 1, false, 1)
        );
    }

    #[test]
    fn decode_workers_share_the_cores_with_a_pool_that_does_not_spin() {
        for cores in 1..=64 {
            let b = budget(cores, false);
            assert_eq!(b.intra_threads, cores, "{b:?}");
            assert!(
                b.decode_workers >= 1 && b.decode_workers <= cores.div_ceil(4),
                "{b:?}"
            );
            assert!(
                !b.allow_spinning,
                "the decode workers share the cores: {b:?}"
            );
            assert!(b.io_threads <= 2, "{b:?}");
        }
    }

    #[test]
    fn a_gpu_provider_leaves_every_core_but_one_to_the_decode_workers() {
        assert_eq!(budget(6, true).decode_workers, 5);
        assert_eq!(budget(1, true).decode_workers, 1);
    }

    #[test]
    fn configured_values_win_over_derived_ones() {
        let runtime = RuntimeConfig {
            intra_threads: 3,
            allow_spinning: Some(true),
            io_threads: 4,
            ..RuntimeConfig::default()
        };
        let pipeline = PipelineConfig {
            decode_workers: 5,
            ..PipelineConfig::default()
        };
        let b = ThreadBudget::derive(2, &runtime, &pipeline, false);
        assert_eq!(
            (
                b.intra_threads,
                b.decode_workers,
                b.allow_spinning,
                b.io_threads
            ),
            (3, 5, true, 4)
        );
    }

    #[test]
    fn spinning_is_on_only_when_the_pool_has_cores_of_its_own() {
        let runtime = RuntimeConfig {
            intra_threads: 6,
            ..RuntimeConfig::default()
        };
        let b = ThreadBudget::derive(8, &runtime, &PipelineConfig::default(), false);
        assert_eq!((b.decode_workers, b.allow_spinning), (2, true));
        let pipeline = PipelineConfig {
            decode_workers: 3,
            ..PipelineConfig::default()
        };
        let b = ThreadBudget::derive(8, &runtime, &pipeline, false);
        assert!(!b.allow_spinning, "{b:?}");
    }

    #[test]
    fn the_daemon_engine_gets_the_budget_and_keeps_other_runtime_settings() {
        let runtime = RuntimeConfig {
            device_index: 1,
            ..RuntimeConfig::default()
        };
        let b = ThreadBudget::derive(4, &runtime, &PipelineConfig::default(), false);
        let applied = b.apply(&runtime);
        assert_eq!(applied.intra_threads, 4);
        assert_eq!(applied.allow_spinning, Some(false));
        assert_eq!(applied.device_index, 1);
    }
}
