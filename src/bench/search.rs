//! Search alone, on one thread as the daemon searches: the daemon's index
//! over the synthetic reference sets (315 labels x {1, 20, 100} references
//! x {448, 2048} dimensions, see `reference_sets`) queried at batch 1 and
//! 16, next to a plain f32 matrix multiply of the same shape (queries x dim
//! times dim x references) by the `matrixmultiply` crate's sgemm, also on
//! one thread; and the optional f16 reference matrix: its bytes and its
//! top-1 agreement with the f32 matrix.
//!
//! Not measured: the reference DB's storage or start-up (see `memory`), the
//! search's share of a request (see `stages`), prototypes.

use serde::Serialize;

use super::memory::{build_index_measured, ReferenceSetMemory};
use super::reference_sets::{ReferenceSet, DIMS, LABELS, REFS_PER_LABEL};
use super::{repeat_for, BenchError, BenchSetup};
use crate::refdb::index::Precision;
use crate::refdb::{Index, Recognition};

/// Query batch sizes searched.
pub const SEARCH_BATCHES: [usize; 2] = [1, 16];

/// How [`search_queries`] searches a batch (reported with the figures).
pub const SEARCH_METHOD: &str = "Index::search_batch, one sgemm per batch";

/// Searches `queries` (`n * dim` values, row-major) as the daemon's
/// finisher does: the whole batch at once. One result per query, in order.
pub fn search_queries(
    index: &Index,
    queries: &[f32],
    top_k: usize,
    threshold: f32,
) -> Vec<Recognition> {
    index.search_batch(queries, top_k, threshold)
}

/// Bytes of an index's reference matrix.
pub fn f32_matrix_bytes(index: &Index) -> usize {
    index.matrix_bytes()
}

/// The index over `set` with its reference matrix in f16 (what
/// `recognition.reference_precision = "f16"` serves), and that matrix's bytes.
pub fn f16_reference_index(set: &ReferenceSet) -> (Index, usize) {
    let index = Index::build_with(set.dim, set.rows(), 0, Precision::F16);
    let bytes = index.matrix_bytes();
    (index, bytes)
}

#[derive(Debug, Clone, Serialize)]
pub struct SearchCase {
    pub labels: usize,
    pub refs_per_label: usize,
    pub dim: usize,
    pub refs: usize,
    pub batch: usize,
    /// Milliseconds to search the whole batch.
    pub search_ms: f64,
    /// Milliseconds for sgemm of the same shape (batch x dim x refs).
    pub gemm_ms: f64,
    pub search_over_gemm: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct F16Figures {
    pub refs_per_label: usize,
    pub dim: usize,
    pub refs: usize,
    pub f32_matrix_bytes: usize,
    pub f16_matrix_bytes: usize,
    pub queries: usize,
    /// Share of queries whose best label is the same with both matrices.
    pub top1_agreement: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SearchFigures {
    pub method: &'static str,
    pub cases: Vec<SearchCase>,
    pub f16: Vec<F16Figures>,
}

impl SearchFigures {
    pub fn case(&self, refs_per_label: usize, dim: usize, batch: usize) -> Option<&SearchCase> {
        self.cases
            .iter()
            .find(|c| c.refs_per_label == refs_per_label && c.dim == dim && c.batch == batch)
    }
}

/// Seed of the set with these sizes (the memory section uses the same).
pub fn set_seed(refs_per_label: usize, dim: usize) -> u64 {
    (dim * 1000 + refs_per_label) as u64
}

/// The figures, and each set's index memory (see `memory`), measured as
/// its index is built here.
pub fn measure(
    setup: &BenchSetup,
    progress: &dyn Fn(&str),
) -> Result<(SearchFigures, Vec<ReferenceSetMemory>), BenchError> {
    let d = setup.durations;
    let recognition = &setup.cfg.config.recognition;
    let (top_k, threshold) = (recognition.top_k, recognition.unknown_threshold);
    let mut cases = Vec::new();
    let mut f16 = Vec::new();
    let mut reference_sets = Vec::new();
    for dim in DIMS {
        for refs_per_label in REFS_PER_LABEL {
            progress(&format!(
                "search: {LABELS} labels x {refs_per_label} references x {dim} dimensions"
            ));
            let set =
                ReferenceSet::generate(LABELS, refs_per_label, dim, set_seed(refs_per_label, dim));
            let (index, memory) = build_index_measured(&set, refs_per_label)?;
            reference_sets.push(memory);
            let largest = SEARCH_BATCHES.iter().copied().max().unwrap_or(1);
            let (queries, _) = set.queries(largest, 11);
            let mut largest_batch_results = Vec::new();
            for batch in SEARCH_BATCHES {
                let q = &queries[..batch * dim];
                // A warm-up run, unless a single run is all that is asked.
                if d.search_runs > 1 {
                    std::hint::black_box(search_queries(&index, q, top_k, threshold));
                }
                let mut results = Vec::new();
                let (runs, t) = repeat_for(d.search_time, d.search_runs, || {
                    results = std::hint::black_box(search_queries(&index, q, top_k, threshold));
                    Ok::<(), BenchError>(())
                })?;
                if batch == largest {
                    largest_batch_results = results;
                }
                let search_ms = t.as_secs_f64() * 1e3 / runs as f64;
                let mut scores = vec![0f32; batch * set.len()];
                gemm(&set.vectors, dim, q, &mut scores)?;
                let (runs, t) = repeat_for(d.search_time, d.search_runs, || {
                    gemm(&set.vectors, dim, q, &mut scores)
                })?;
                let gemm_ms = t.as_secs_f64() * 1e3 / runs as f64;
                cases.push(SearchCase {
                    labels: LABELS,
                    refs_per_label,
                    dim,
                    refs: set.len(),
                    batch,
                    search_ms,
                    gemm_ms,
                    search_over_gemm: search_ms / gemm_ms,
                });
            }
            // The timed queries' f32 results serve when no more queries are
            // asked for (--quick); otherwise fresh queries, searched anew.
            f16.push(if d.agreement_queries <= largest {
                f16_agreement(
                    &set,
                    &index,
                    &queries,
                    Some(&largest_batch_results),
                    threshold,
                )
            } else {
                let (fresh, _) = set.queries(d.agreement_queries, 12);
                f16_agreement(&set, &index, &fresh, None, threshold)
            });
        }
    }
    Ok((
        SearchFigures {
            method: SEARCH_METHOD,
            cases,
            f16,
        },
        reference_sets,
    ))
}

/// Top-1 agreement of the f16 matrix with the f32 one over `queries`;
/// the f32 results are `f32_results` when given, else searched here (on a
/// second thread, while this one searches the f16 matrix).
fn f16_agreement(
    set: &ReferenceSet,
    index: &Index,
    queries: &[f32],
    f32_results: Option<&[Recognition]>,
    threshold: f32,
) -> F16Figures {
    let (f16_index, f16_bytes) = f16_reference_index(set);
    let (full, half) = std::thread::scope(|s| {
        let full = f32_results
            .is_none()
            .then(|| s.spawn(|| search_queries(index, queries, 1, threshold)));
        let half = search_queries(&f16_index, queries, 1, threshold);
        (full.map(|h| h.join()), half)
    });
    let full: Option<Vec<Recognition>> = match full {
        Some(Ok(searched)) => Some(searched),
        // The f32 search cannot panic on these inputs; if it did, nothing agrees.
        Some(Err(_)) => None,
        None => f32_results.map(<[Recognition]>::to_vec),
    };
    let agreeing = full.map_or(0, |full| {
        full.iter()
            .zip(&half)
            .filter(|(a, b)| best_label(a) == best_label(b))
            .count()
    });
    let n = half.len();
    F16Figures {
        refs_per_label: set.len() / set.labels.len().max(1),
        dim: set.dim,
        refs: set.len(),
        f32_matrix_bytes: f32_matrix_bytes(index),
        f16_matrix_bytes: f16_bytes,
        queries: n,
        top1_agreement: agreeing as f64 / n.max(1) as f64,
    }
}

fn best_label(r: &Recognition) -> Option<&str> {
    r.candidates.first().map(|c| &*c.label)
}

/// `scores` (queries x refs) = `queries` (n x dim) times `refs`ᵀ
/// (`refs` is refs x dim, row-major), by sgemm on this thread.
pub fn gemm(
    refs: &[f32],
    dim: usize,
    queries: &[f32],
    scores: &mut [f32],
) -> Result<(), BenchError> {
    if dim == 0 || refs.len() % dim != 0 || queries.len() % dim != 0 {
        return Err(BenchError::Gemm(format!(
            "{} reference and {} query values are not rows of {dim}",
            refs.len(),
            queries.len()
        )));
    }
    let (m, n) = (queries.len() / dim, refs.len() / dim);
    if scores.len() != m * n {
        return Err(BenchError::Gemm(format!(
            "{} scores for {m} queries x {n} references",
            scores.len()
        )));
    }
    // SAFETY: A is m x dim (row stride dim), B is dim x n read from the
    // row-major refs (element (k, j) at j * dim + k), C is m x n (row
    // stride n); the lengths were checked above, so every index sgemm
    // forms lies inside its slice, and C does not alias A or B.
    unsafe {
        matrixmultiply::sgemm(
            m,
            dim,
            n,
            1.0,
            queries.as_ptr(),
            dim as isize,
            1,
            refs.as_ptr(),
            1,
            dim as isize,
            0.0,
            scores.as_mut_ptr(),
            n as isize,
            1,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_scores_are_the_dot_products() {
        let refs = [1.0, 0.0, 2.0, 0.5, 1.0, -1.0]; // 3 refs of dim 2
        let queries = [1.0, 2.0, 0.0, 1.0]; // 2 queries
        let mut scores = [0f32; 6];
        gemm(&refs, 2, &queries, &mut scores).expect("shapes fit");
        // Query-major: (1,2)·each ref, then (0,1)·each ref.
        assert_eq!(scores, [1.0, 3.0, -1.0, 0.0, 0.5, -1.0]);
        assert!(gemm(&refs, 4, &queries, &mut scores).is_err());
    }

    #[test]
    fn the_f16_matrix_agrees_and_takes_half_the_bytes() {
        let set = ReferenceSet::generate(20, 3, 32, 5);
        let index = set.index();
        let (queries, _) = set.queries(50, 6);
        let f = f16_agreement(&set, &index, &queries, None, 0.0);
        assert_eq!(f.queries, 50);
        let searched = search_queries(&index, &queries, 1, 0.0);
        let reused = f16_agreement(&set, &index, &queries, Some(&searched), 0.0);
        assert_eq!(reused.top1_agreement, f.top1_agreement);
        assert_eq!(f.f16_matrix_bytes * 2, f.f32_matrix_bytes);
        assert!(f.top1_agreement > 0.95, "{f:?}");
    }

    #[test]
    fn a_batch_gets_one_result_per_query_in_order() {
        let set = ReferenceSet::generate(8, 2, 16, 3);
        let index = set.index();
        let (queries, _) = set.queries(3, 4);
        let batch = search_queries(&index, &queries, 2, 0.0);
        assert_eq!(batch.len(), 3);
        // The batch scores by GEMM, one query by dot products: the same
        // ranking, similarities equal to float rounding.
        for (q, r) in queries.chunks_exact(16).zip(&batch) {
            let one = index.search(q, 2, 0.0);
            assert_eq!(one.label, r.label);
            assert_eq!(one.candidates.len(), r.candidates.len());
            for (a, b) in one.candidates.iter().zip(&r.candidates) {
                assert_eq!((&a.label, &a.ref_id), (&b.label, &b.ref_id));
                assert!((a.similarity - b.similarity).abs() < 1e-5, "{a:?} {b:?}");
            }
        }
    }
}
