//! Open-set operating points: how well the best-similarity score separates
//! enrolled products from products that are not in the reference DB, and
//! which `recognition.unknown_threshold` gives a chosen false-unknown rate.
//!
//! The score is the one the daemon thresholds: the cosine similarity of a
//! query's best reference. A query is *unknown* when that score is strictly
//! below the threshold (as in [`crate::refdb::Index::search`]).
//!
//! Threshold picking, exactly: with the enrolled queries' best similarities
//! sorted ascending, `s[0] <= s[1] <= … <= s[n-1]`, the threshold for a
//! false-unknown target `q` (0 <= q < 1) is `s[floor(q * n)]`, the
//! q-quantile of those scores. It is the largest threshold for which at most
//! `q * n` enrolled queries fall strictly below it, so the measured
//! false-unknown rate never exceeds the target (ties can make it lower).
//!
//! Pure arithmetic on scores; embedding and searching belong to
//! [`crate::eval`] and the CLI.

use serde::Serialize;

/// False-unknown targets of the operating-point table.
pub const FALSE_UNKNOWN_TARGETS: [f64; 5] = [0.01, 0.02, 0.05, 0.10, 0.20];

/// An enrolled query's best similarity and whether its best label is its
/// true label.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KnownScore {
    pub similarity: f32,
    pub correct: bool,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OpenSetError {
    #[error("no enrolled queries to calibrate on (no query label has references)")]
    NoKnownQueries,
    #[error("false-unknown target {0} is not in [0, 1)")]
    BadTarget(f64),
}

/// What a threshold does on a set of queries.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OperatingPoint {
    /// The false-unknown target this point was chosen for; at the configured
    /// threshold, the measured rate.
    pub false_unknown: f64,
    pub threshold: f32,
    /// Share of unenrolled queries called unknown (absent without any).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unknown_detection: Option<f64>,
    /// Share of enrolled queries answered with their true label.
    pub accuracy_known: f64,
    /// Share of enrolled queries called unknown, measured.
    pub false_unknown_measured: f64,
}

/// The open-set section of an evaluation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OpenSetReport {
    /// Area under the ROC curve of enrolled vs unenrolled (absent without
    /// unenrolled queries).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auroc: Option<f64>,
    pub known_queries: usize,
    pub unknown_queries: usize,
    pub operating_points: Vec<OperatingPoint>,
    pub at_configured_threshold: OperatingPoint,
    /// (false-unknown, detection) pairs for the plot, thresholds ascending.
    #[serde(skip)]
    pub curve: Vec<(f64, f64)>,
}

/// Enrolled and unenrolled scores, ready for queries.
pub struct Scores {
    known: Vec<KnownScore>,
    /// Enrolled best similarities, ascending.
    known_sorted: Vec<f32>,
    /// Unenrolled best similarities, ascending.
    unknown_sorted: Vec<f32>,
}

fn sorted(mut v: Vec<f32>) -> Vec<f32> {
    v.sort_by(f32::total_cmp);
    v
}

/// Share of `sorted` strictly below `t`.
fn share_below(sorted: &[f32], t: f32) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted.partition_point(|&s| s < t) as f64 / sorted.len() as f64
}

impl Scores {
    pub fn new(known: Vec<KnownScore>, unknown: Vec<f32>) -> Result<Self, OpenSetError> {
        if known.is_empty() {
            return Err(OpenSetError::NoKnownQueries);
        }
        Ok(Self {
            known_sorted: sorted(known.iter().map(|k| k.similarity).collect()),
            known,
            unknown_sorted: sorted(unknown),
        })
    }

    /// Enrolled queries scored.
    pub fn known_queries(&self) -> usize {
        self.known.len()
    }

    /// The threshold whose false-unknown rate on the enrolled queries is at
    /// most `q`, as large as possible (see the module docs).
    pub fn threshold_for(&self, q: f64) -> Result<f32, OpenSetError> {
        if !(0.0..1.0).contains(&q) {
            return Err(OpenSetError::BadTarget(q));
        }
        let n = self.known_sorted.len();
        let k = ((q * n as f64).floor() as usize).min(n - 1);
        Ok(self.known_sorted[k])
    }

    /// What threshold `t` does; `target` is recorded as its false-unknown.
    fn point(&self, t: f32, target: Option<f64>) -> OperatingPoint {
        let measured = share_below(&self.known_sorted, t);
        let right = self
            .known
            .iter()
            .filter(|k| k.correct && k.similarity >= t)
            .count();
        OperatingPoint {
            false_unknown: target.unwrap_or(measured),
            threshold: t,
            unknown_detection: (!self.unknown_sorted.is_empty())
                .then(|| share_below(&self.unknown_sorted, t)),
            accuracy_known: right as f64 / self.known.len() as f64,
            false_unknown_measured: measured,
        }
    }

    /// The operating point for a false-unknown target.
    pub fn at_target(&self, q: f64) -> Result<OperatingPoint, OpenSetError> {
        Ok(self.point(self.threshold_for(q)?, Some(q)))
    }

    /// The operating point of a given threshold.
    pub fn at_threshold(&self, t: f32) -> OperatingPoint {
        self.point(t, None)
    }

    /// Probability that a random enrolled query scores higher than a random
    /// unenrolled one (ties count half): the AUROC of the score.
    pub fn auroc(&self) -> Option<f64> {
        let u = &self.unknown_sorted;
        if u.is_empty() {
            return None;
        }
        let mut wins = 0.0f64;
        for &s in &self.known_sorted {
            let below = u.partition_point(|&x| x < s);
            let equal = u[below..].partition_point(|&x| x <= s);
            wins += below as f64 + 0.5 * equal as f64;
        }
        Some(wins / (self.known_sorted.len() as f64 * u.len() as f64))
    }

    /// Detection against false-unknown for every distinct threshold (at most
    /// `max_points`), from (0, 0) to (1, 1).
    pub fn curve(&self, max_points: usize) -> Vec<(f64, f64)> {
        let mut thresholds: Vec<f32> = self
            .known_sorted
            .iter()
            .chain(&self.unknown_sorted)
            .copied()
            .collect();
        thresholds.sort_by(f32::total_cmp);
        thresholds.dedup();
        let step = thresholds.len().div_ceil(max_points.max(2)).max(1);
        let mut out = vec![(0.0, 0.0)];
        out.extend(thresholds.iter().step_by(step).map(|&t| {
            (
                share_below(&self.known_sorted, t),
                share_below(&self.unknown_sorted, t),
            )
        }));
        out.push((1.0, 1.0));
        out
    }

    /// The full report: AUROC, the standard targets and the configured
    /// threshold.
    pub fn report(&self, configured_threshold: f32) -> OpenSetReport {
        OpenSetReport {
            auroc: self.auroc(),
            known_queries: self.known.len(),
            unknown_queries: self.unknown_sorted.len(),
            operating_points: FALSE_UNKNOWN_TARGETS
                .iter()
                .map(|&q| self.point(self.threshold_for(q).unwrap_or(f32::NAN), Some(q)))
                .collect(),
            at_configured_threshold: self.at_threshold(configured_threshold),
            curve: self.curve(400),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(v: &[(f32, bool)]) -> Vec<KnownScore> {
        v.iter()
            .map(|&(similarity, correct)| KnownScore {
                similarity,
                correct,
            })
            .collect()
    }

    #[test]
    fn threshold_is_the_q_quantile_and_never_exceeds_the_target() {
        let k: Vec<(f32, bool)> = (1..=20).map(|i| (i as f32 / 20.0, true)).collect();
        let s = Scores::new(known(&k), vec![]).unwrap();
        // n = 20: q = 0.05 -> s[1] = 0.10; exactly one query (0.05) below.
        assert_eq!(s.threshold_for(0.05).unwrap(), 0.10);
        assert_eq!(s.at_target(0.05).unwrap().false_unknown_measured, 0.05);
        // q = 0.01 -> s[0]: nothing below.
        assert_eq!(s.threshold_for(0.01).unwrap(), 0.05);
        assert_eq!(s.at_target(0.01).unwrap().false_unknown_measured, 0.0);
        // Raising the threshold by any amount breaks the target.
        let t = s.threshold_for(0.10).unwrap();
        assert!(s.at_threshold(t).false_unknown_measured <= 0.10);
        assert!(s.at_threshold(t + 1e-6).false_unknown_measured > 0.10);
        assert!(s.threshold_for(1.0).is_err());
        assert!(s.threshold_for(-0.1).is_err());
    }

    #[test]
    fn ties_keep_the_measured_rate_under_the_target() {
        let s = Scores::new(known(&[(0.5, true); 10]), vec![0.4]).unwrap();
        let p = s.at_target(0.2).unwrap();
        assert_eq!(p.threshold, 0.5);
        assert_eq!(p.false_unknown_measured, 0.0);
        assert_eq!(p.unknown_detection, Some(1.0));
    }

    #[test]
    fn auroc_matches_a_pairwise_count_with_ties_as_half() {
        let k = known(&[(0.9, true), (0.7, true), (0.5, false), (0.3, true)]);
        let u = vec![0.5, 0.4, 0.95, 0.1, 0.3];
        let s = Scores::new(k.clone(), u.clone()).unwrap();
        let mut wins = 0.0;
        for a in &k {
            for &b in &u {
                wins += if a.similarity > b {
                    1.0
                } else if a.similarity == b {
                    0.5
                } else {
                    0.0
                };
            }
        }
        assert_eq!(s.auroc(), Some(wins / 20.0));
        assert_eq!(Scores::new(k, vec![]).unwrap().auroc(), None);
    }

    #[test]
    fn accuracy_counts_correct_answers_above_the_threshold_only() {
        let k = known(&[(0.9, true), (0.8, false), (0.6, true), (0.2, true)]);
        let s = Scores::new(k, vec![0.1, 0.5]).unwrap();
        let p = s.at_threshold(0.5);
        assert_eq!(p.accuracy_known, 0.5); // 0.9 and 0.6 right; 0.2 unknown
        assert_eq!(p.false_unknown_measured, 0.25);
        assert_eq!(p.unknown_detection, Some(0.5)); // 0.1 < 0.5, 0.5 is not
        assert_eq!(p.false_unknown, 0.25);
    }

    #[test]
    fn no_enrolled_queries_is_an_error() {
        assert!(matches!(
            Scores::new(vec![], vec![0.3]),
            Err(OpenSetError::NoKnownQueries)
        ));
    }

    #[test]
    fn curve_runs_from_origin_to_one_and_never_decreases() {
        let k: Vec<(f32, bool)> = (0..1000).map(|i| (i as f32 / 1000.0, true)).collect();
        let u: Vec<f32> = (0..700).map(|i| i as f32 / 1400.0).collect();
        let s = Scores::new(known(&k), u).unwrap();
        let c = s.curve(100);
        assert!(c.len() <= 103);
        assert_eq!(c.first(), Some(&(0.0, 0.0)));
        assert_eq!(c.last(), Some(&(1.0, 1.0)));
        assert!(c.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
    }
}
