//! Resident memory of a process, from `/proc/<pid>/status` (Linux).

use super::BenchError;

/// A process's resident memory now and at its peak, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resident {
    /// `VmRSS`.
    pub now: u64,
    /// `VmHWM`: the most it has been resident since it started.
    pub peak: u64,
}

impl Resident {
    /// This process's.
    pub fn of_self() -> Result<Self, BenchError> {
        Self::read("/proc/self/status")
    }

    /// Process `pid`'s.
    pub fn of_process(pid: u32) -> Result<Self, BenchError> {
        Self::read(&format!("/proc/{pid}/status"))
    }

    fn read(path: &str) -> Result<Self, BenchError> {
        let text =
            std::fs::read_to_string(path).map_err(BenchError::io(format!("reading {path}")))?;
        let field = |name: &str| -> Result<u64, BenchError> {
            text.lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.trim().strip_suffix("kB"))
                .and_then(|kb| kb.trim().parse::<u64>().ok())
                .map(|kb| kb * 1024)
                .ok_or_else(|| BenchError::Io {
                    what: format!("reading {path}"),
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("no {name} line in kB"),
                    ),
                })
        };
        Ok(Self {
            now: field("VmRSS:")?,
            peak: field("VmHWM:")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_resident_and_its_peak_is_at_least_that() {
        let r = Resident::of_self().expect("/proc/self/status");
        assert!(r.now > 0 && r.peak >= r.now, "{r:?}");
    }
}
