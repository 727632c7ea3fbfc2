//! The in-memory search index: every reference embedding in one contiguous,
//! L2-normalised matrix (f32, or f16 to halve its memory), exact
//! nearest-neighbour search with one candidate per label, and optional
//! per-label k-means prototypes.
//!
//! A batch of queries is scored with one matrix multiply (the
//! `matrixmultiply` crate's sgemm; an f16 matrix is widened block by block
//! into a scratch buffer first), then reduced to the best reference per
//! label. Labels and ref_ids are shared strings: a result clones pointers,
//! not text. Built from the store's records and immutable afterwards: an
//! update builds a new index and swaps it in, so searches never wait for
//! writers.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use half::f16;
use serde::{Deserialize, Serialize};

/// Scales `v` to unit L2 norm (a zero vector stays zero).
pub fn l2_normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 && norm.is_finite() {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent accumulators let the compiler vectorise the loop.
    let mut acc = [0f32; 8];
    let (ca, ra) = a.split_at(a.len() - a.len() % 8);
    let (cb, rb) = b.split_at(ca.len());
    for (x, y) in ca.chunks_exact(8).zip(cb.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// `c[n x m] = a[n x k] * b[m x k]^T`, all row-major, `c` with row stride
/// `ldc` (a column block of a wider matrix).
fn gemm_nt(a: &[f32], n: usize, k: usize, b: &[f32], m: usize, c: &mut [f32], ldc: usize) {
    if n == 0 || m == 0 || k == 0 {
        return;
    }
    assert!(a.len() >= n * k && b.len() >= m * k && c.len() >= (n - 1) * ldc + m);
    // SAFETY: the assertion above keeps every index sgemm computes from
    // these strides (a: n x k row-major; b read as k x m with row stride 1
    // and column stride k; c: n x m with row stride ldc) inside the slices.
    unsafe {
        matrixmultiply::sgemm(
            n,
            k,
            m,
            1.0,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            1,
            k as isize,
            0.0,
            c.as_mut_ptr(),
            ldc as isize,
            1,
        );
    }
}

/// How the reference matrix is stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 4 bytes per value (default).
    #[default]
    F32,
    /// 2 bytes per value: half the memory; similarities differ by about
    /// 1e-3 (top-1 agreement measured by `retail-agent bench`).
    F16,
}

#[derive(Debug, Clone)]
enum Matrix {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

impl Default for Matrix {
    fn default() -> Self {
        Matrix::F32(Vec::new())
    }
}

/// Rows of an f16 matrix widened at a time.
const WIDEN_BLOCK: usize = 128;

thread_local! {
    /// Per-thread scratch: the similarity matrix of a batch, and widened rows.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// L2 distance between unit vectors with cosine similarity `s`.
pub fn distance_from_similarity(s: f32) -> f32 {
    (2.0 - 2.0 * s).max(0.0).sqrt()
}

/// One row of the matrix: which reference it is.
#[derive(Debug, Clone, PartialEq)]
pub struct RowInfo {
    pub ref_id: Arc<str>,
    pub label: u32,
}

/// A candidate label for a query.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub label: Arc<str>,
    pub similarity: f32,
    pub ref_id: Arc<str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Match,
    Unknown,
}

/// The answer for one query embedding.
#[derive(Debug, Clone, PartialEq)]
pub struct Recognition {
    pub decision: Decision,
    pub label: Option<Arc<str>>,
    /// Cosine similarity of the best reference; -1 for an empty index.
    pub similarity: f32,
    /// L2 distance of the best reference; 2 for an empty index.
    pub distance: f32,
    /// Best first, one per label.
    pub candidates: Vec<Candidate>,
}

#[derive(Debug, Clone, Default)]
struct Prototypes {
    vectors: Vec<f32>,
    labels: Vec<u32>,
    /// Row of the reference nearest to each prototype (reported as its ref_id).
    representative: Vec<u32>,
}

/// Immutable nearest-neighbour index over normalised embeddings.
#[derive(Debug, Clone, Default)]
pub struct Index {
    dim: usize,
    matrix: Matrix,
    rows: Vec<RowInfo>,
    labels: Vec<Arc<str>>,
    prototypes: Option<Prototypes>,
}

impl Index {
    /// Builds an f32 index from `(ref_id, label, embedding)` rows;
    /// embeddings are normalised here. All embeddings must have length `dim`.
    pub fn build<'a>(
        dim: usize,
        rows: impl IntoIterator<Item = (&'a str, &'a str, &'a [f32])>,
        prototypes_per_class: usize,
    ) -> Self {
        Self::build_with(dim, rows, prototypes_per_class, Precision::F32)
    }

    /// [`Index::build`] with the matrix stored at `precision`.
    pub fn build_with<'a>(
        dim: usize,
        rows: impl IntoIterator<Item = (&'a str, &'a str, &'a [f32])>,
        prototypes_per_class: usize,
        precision: Precision,
    ) -> Self {
        let mut label_ids: HashMap<&'a str, u32> = HashMap::new();
        let mut labels: Vec<Arc<str>> = Vec::new();
        let rows = rows.into_iter();
        // At most this many rows: reserved once rather than grown by copies
        // (pages reserved and never written cost no memory).
        let most = rows.size_hint().1.unwrap_or(0);
        let mut vectors: Vec<f32> = Vec::with_capacity(most.saturating_mul(dim));
        let mut infos = Vec::with_capacity(most);
        for (ref_id, label, emb) in rows {
            debug_assert_eq!(emb.len(), dim);
            let id = *label_ids.entry(label).or_insert_with(|| {
                labels.push(Arc::from(label));
                (labels.len() - 1) as u32
            });
            let start = vectors.len();
            vectors.extend_from_slice(emb);
            l2_normalize(&mut vectors[start..]);
            infos.push(RowInfo {
                ref_id: Arc::from(ref_id),
                label: id,
            });
        }
        vectors.shrink_to_fit();
        let mut index = Self {
            dim,
            matrix: Matrix::F32(vectors),
            rows: infos,
            labels,
            prototypes: None,
        };
        if prototypes_per_class > 0 {
            index.prototypes = Some(index.build_prototypes(prototypes_per_class));
        }
        if precision == Precision::F16 {
            if let Matrix::F32(v) = &index.matrix {
                index.matrix = Matrix::F16(v.iter().map(|&x| f16::from_f32(x)).collect());
            }
        }
        index
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn labels(&self) -> &[Arc<str>] {
        &self.labels
    }

    pub fn rows(&self) -> &[RowInfo] {
        &self.rows
    }

    pub fn precision(&self) -> Precision {
        match self.matrix {
            Matrix::F32(_) => Precision::F32,
            Matrix::F16(_) => Precision::F16,
        }
    }

    /// Bytes of the reference matrix (prototypes not included).
    pub fn matrix_bytes(&self) -> usize {
        match &self.matrix {
            Matrix::F32(v) => v.len() * 4,
            Matrix::F16(v) => v.len() * 2,
        }
    }

    /// The normalised embedding of row `i` (widened from f16 if stored so).
    pub fn vector(&self, i: usize) -> Cow<'_, [f32]> {
        let span = i * self.dim..(i + 1) * self.dim;
        match &self.matrix {
            Matrix::F32(v) => Cow::Borrowed(&v[span]),
            Matrix::F16(v) => Cow::Owned(v[span].iter().map(|x| x.to_f32()).collect()),
        }
    }

    /// Number of vectors a search scans (prototypes when enabled).
    pub fn searched_vectors(&self) -> usize {
        self.prototypes
            .as_ref()
            .map_or(self.rows.len(), |p| p.labels.len())
    }

    /// Nearest labels for a normalised `query`: the best similarity per
    /// label, best `top_k` labels first; "unknown" when the best similarity
    /// is below `threshold` or the index is empty.
    pub fn search(&self, query: &[f32], top_k: usize, threshold: f32) -> Recognition {
        self.search_batch(query, top_k, threshold)
            .pop()
            .unwrap_or_else(|| self.finish(&[], top_k, threshold))
    }

    /// [`Index::search`] for `queries.len() / dim` queries laid out row by
    /// row, scored together with one matrix multiply.
    pub fn search_batch(&self, queries: &[f32], top_k: usize, threshold: f32) -> Vec<Recognition> {
        let dim = self.dim.max(1);
        let n = queries.len() / dim;
        let m = match &self.prototypes {
            None => self.rows.len(),
            Some(p) => p.labels.len(),
        };
        SCRATCH.with(|cell| {
            let mut scratch = cell.borrow_mut();
            let (scores, widened) = &mut *scratch;
            scores.clear();
            scores.resize(n * m, 0.0);
            self.score(&queries[..n * dim], n, scores, widened);
            let mut best: Vec<(f32, u32)> = Vec::with_capacity(self.labels.len());
            (0..n)
                .map(|q| {
                    best.clear();
                    best.resize(self.labels.len(), (f32::NEG_INFINITY, u32::MAX));
                    let row_scores = &scores[q * m..(q + 1) * m];
                    let mut keep = |s: f32, label: u32, row: u32| {
                        let slot = &mut best[label as usize];
                        if s > slot.0 {
                            *slot = (s, row);
                        }
                    };
                    match &self.prototypes {
                        None => {
                            for (j, (&s, r)) in row_scores.iter().zip(&self.rows).enumerate() {
                                keep(s, r.label, j as u32);
                            }
                        }
                        Some(p) => {
                            for ((&s, &label), &row) in
                                row_scores.iter().zip(&p.labels).zip(&p.representative)
                            {
                                keep(s, label, row);
                            }
                        }
                    }
                    self.finish(&best, top_k, threshold)
                })
                .collect()
        })
    }

    /// Similarities of `n` queries with every searched vector, into
    /// `scores` (n rows).
    fn score(&self, queries: &[f32], n: usize, scores: &mut [f32], widened: &mut Vec<f32>) {
        let dim = self.dim.max(1);
        if let Some(p) = &self.prototypes {
            let m = p.labels.len();
            gemm_nt(queries, n, dim, &p.vectors, m, scores, m);
            return;
        }
        let m = self.rows.len();
        match &self.matrix {
            Matrix::F32(v) if n == 1 => {
                // One query: a dot per row beats a GEMM's packing.
                for (s, row) in scores.iter_mut().zip(v.chunks_exact(dim)) {
                    *s = dot(queries, row);
                }
            }
            Matrix::F32(v) => gemm_nt(queries, n, dim, v, m, scores, m),
            Matrix::F16(v) => {
                for start in (0..m).step_by(WIDEN_BLOCK) {
                    let rows = WIDEN_BLOCK.min(m - start);
                    widened.clear();
                    widened.extend(
                        v[start * dim..(start + rows) * dim]
                            .iter()
                            .map(|x| x.to_f32()),
                    );
                    gemm_nt(queries, n, dim, widened, rows, &mut scores[start..], m);
                }
            }
        }
    }

    /// The recognition from the best (similarity, row) per label.
    fn finish(&self, best: &[(f32, u32)], top_k: usize, threshold: f32) -> Recognition {
        let mut order: Vec<usize> = (0..best.len()).filter(|&l| best[l].1 != u32::MAX).collect();
        // Best first, ties by label index: a total order, so selecting the
        // first `keep` and sorting only those gives what a full sort would.
        let by_score = |a: &usize, b: &usize| best[*b].0.total_cmp(&best[*a].0).then(a.cmp(b));
        let keep = top_k.max(1);
        if order.len() > keep {
            order.select_nth_unstable_by(keep - 1, by_score);
            order.truncate(keep);
        }
        order.sort_by(by_score);
        let Some(&top) = order.first() else {
            return Recognition {
                decision: Decision::Unknown,
                label: None,
                similarity: -1.0,
                distance: 2.0,
                candidates: Vec::new(),
            };
        };
        let similarity = best[top].0.clamp(-1.0, 1.0);
        let matched = similarity >= threshold;
        order.truncate(top_k);
        let candidates: Vec<Candidate> = order
            .iter()
            .map(|&l| Candidate {
                label: self.labels[l].clone(),
                similarity: best[l].0.clamp(-1.0, 1.0),
                ref_id: self.rows[best[l].1 as usize].ref_id.clone(),
            })
            .collect();
        Recognition {
            decision: if matched {
                Decision::Match
            } else {
                Decision::Unknown
            },
            label: matched.then(|| self.labels[top].clone()),
            similarity,
            distance: distance_from_similarity(similarity),
            candidates,
        }
    }

    /// k-means (cosine, deterministic farthest-point initialisation) within
    /// each label, at most `k` centroids per label.
    fn build_prototypes(&self, k: usize) -> Prototypes {
        let mut members: Vec<Vec<usize>> = vec![Vec::new(); self.labels.len()];
        for (i, r) in self.rows.iter().enumerate() {
            members[r.label as usize].push(i);
        }
        let mut out = Prototypes::default();
        for (label, rows) in members.iter().enumerate() {
            let centroids = kmeans(self, rows, k.min(rows.len()));
            for c in centroids.chunks_exact(self.dim) {
                let representative = rows
                    .iter()
                    .copied()
                    .max_by(|&a, &b| dot(c, &self.vector(a)).total_cmp(&dot(c, &self.vector(b))))
                    .unwrap_or(0);
                out.vectors.extend_from_slice(c);
                out.labels.push(label as u32);
                out.representative.push(representative as u32);
            }
        }
        out
    }
}

fn kmeans(index: &Index, rows: &[usize], k: usize) -> Vec<f32> {
    let dim = index.dim;
    if k == 0 {
        return Vec::new();
    }
    // Farthest-point initialisation from the first member: deterministic.
    let mut centroids: Vec<f32> = index.vector(rows[0]).to_vec();
    while centroids.len() / dim < k {
        let far = rows
            .iter()
            .copied()
            .min_by(|&a, &b| {
                let sa = max_sim(&centroids, dim, &index.vector(a));
                let sb = max_sim(&centroids, dim, &index.vector(b));
                sa.total_cmp(&sb)
            })
            .unwrap_or(rows[0]);
        centroids.extend_from_slice(&index.vector(far));
    }
    let mut assign = vec![0usize; rows.len()];
    for _ in 0..20 {
        let mut changed = false;
        for (slot, &r) in assign.iter_mut().zip(rows) {
            let v = index.vector(r);
            let best = centroids
                .chunks_exact(dim)
                .enumerate()
                .max_by(|a, b| dot(a.1, &v).total_cmp(&dot(b.1, &v)))
                .map_or(0, |(i, _)| i);
            changed |= *slot != best;
            *slot = best;
        }
        let mut sums = vec![0f32; k * dim];
        for (&c, &r) in assign.iter().zip(rows) {
            for (s, x) in sums[c * dim..(c + 1) * dim]
                .iter_mut()
                .zip(index.vector(r).iter())
            {
                *s += x;
            }
        }
        for (c, sum) in sums.chunks_exact_mut(dim).enumerate() {
            if sum.iter().any(|x| *x != 0.0) {
                l2_normalize(sum);
                centroids[c * dim..(c + 1) * dim].copy_from_slice(sum);
            }
        }
        if !changed {
            break;
        }
    }
    centroids
}

fn max_sim(centroids: &[f32], dim: usize, v: &[f32]) -> f32 {
    centroids
        .chunks_exact(dim)
        .map(|c| dot(c, v))
        .fold(f32::NEG_INFINITY, f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(protos: usize) -> Index {
        let rows: Vec<(&str, &str, Vec<f32>)> = vec![
            ("a1", "apple", vec![1.0, 0.0, 0.0]),
            ("a2", "apple", vec![0.9, 0.1, 0.0]),
            ("b1", "banana", vec![0.0, 2.0, 0.0]),
            ("c1", "cherry", vec![0.0, 0.0, 1.0]),
        ];
        Index::build(
            3,
            rows.iter().map(|(r, l, e)| (*r, *l, e.as_slice())),
            protos,
        )
    }

    #[test]
    fn nearest_reference_decides_and_candidates_hold_one_entry_per_label() {
        let idx = index(0);
        let mut q = vec![0.95, 0.05, 0.0];
        l2_normalize(&mut q);
        let r = idx.search(&q, 5, 0.5);
        assert_eq!(r.decision, Decision::Match);
        assert_eq!(r.label.as_deref(), Some("apple"));
        let labels: Vec<&str> = r.candidates.iter().map(|c| &*c.label).collect();
        assert_eq!(labels.len(), 3, "one candidate per label: {labels:?}");
        assert_eq!(labels[0], "apple");
        assert!((r.distance - distance_from_similarity(r.similarity)).abs() < 1e-6);
    }

    #[test]
    fn a_poor_best_match_is_unknown_but_keeps_candidates() {
        let idx = index(0);
        let mut q = vec![1.0, 1.0, 1.0];
        l2_normalize(&mut q);
        let r = idx.search(&q, 2, 0.9);
        assert_eq!(r.decision, Decision::Unknown);
        assert_eq!(r.label, None);
        assert_eq!(r.candidates.len(), 2);
    }

    #[test]
    fn an_empty_index_answers_unknown_with_the_contract_sentinels() {
        let idx = Index::build(3, std::iter::empty(), 0);
        let r = idx.search(&[1.0, 0.0, 0.0], 5, 0.0);
        assert_eq!(r.decision, Decision::Unknown);
        assert_eq!((r.similarity, r.distance), (-1.0, 2.0));
        assert!(r.candidates.is_empty());
    }

    #[test]
    fn prototypes_answer_like_the_full_index_on_separable_data() {
        let full = index(0);
        let proto = index(1);
        assert_eq!(proto.searched_vectors(), 3);
        let q = [0.0, 0.0, 1.0];
        assert_eq!(
            full.search(&q, 1, 0.0).label,
            proto.search(&q, 1, 0.0).label
        );
        assert_eq!(&*proto.search(&q, 1, 0.0).candidates[0].ref_id, "c1");
    }

    /// (ref_id, label, embedding) rows.
    type Rows = Vec<(String, String, Vec<f32>)>;

    /// 315 labels x `per_label` references of `dim` values around one
    /// centre per label, and `n` queries near random references.
    fn synthetic(per_label: usize, dim: usize, n: usize) -> (Rows, Vec<f32>) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut noise = |scale: f32| -> Vec<f32> {
            (0..dim)
                .map(|_| rng.gen_range(-1.0f32..1.0) * scale)
                .collect()
        };
        let centres: Vec<Vec<f32>> = (0..315).map(|_| noise(1.0)).collect();
        let mut rows = Vec::new();
        for (l, c) in centres.iter().enumerate() {
            for r in 0..per_label {
                let v: Vec<f32> = c.iter().zip(noise(0.6)).map(|(a, b)| a + b).collect();
                rows.push((format!("r{l}-{r}"), format!("label-{l}"), v));
            }
        }
        let mut queries = Vec::with_capacity(n * dim);
        for q in 0..n {
            let (_, _, v) = &rows[(q * 7919) % rows.len()];
            let mut v: Vec<f32> = v.iter().zip(noise(0.6)).map(|(a, b)| a + b).collect();
            l2_normalize(&mut v);
            queries.extend(v);
        }
        (rows, queries)
    }

    #[test]
    fn a_batch_search_answers_like_one_query_at_a_time() {
        let dim = 64;
        let (rows, queries) = synthetic(3, dim, 16);
        for protos in [0, 2] {
            let idx = Index::build(
                dim,
                rows.iter()
                    .map(|(r, l, e)| (r.as_str(), l.as_str(), e.as_slice())),
                protos,
            );
            let batch = idx.search_batch(&queries, 5, 0.3);
            assert_eq!(batch.len(), 16);
            for (q, b) in queries.chunks_exact(dim).zip(&batch) {
                let one = idx.search(q, 5, 0.3);
                assert_eq!(one.label, b.label);
                assert_eq!(one.decision, b.decision);
                for (x, y) in one.candidates.iter().zip(&b.candidates) {
                    assert_eq!((&x.label, &x.ref_id), (&y.label, &y.ref_id));
                    assert!((x.similarity - y.similarity).abs() < 1e-5);
                }
            }
        }
    }

    #[test]
    fn an_f16_matrix_halves_the_bytes_and_keeps_the_top_label() {
        let dim = 128;
        let (rows, queries) = synthetic(5, dim, 400);
        let build = |p| {
            Index::build_with(
                dim,
                rows.iter()
                    .map(|(r, l, e)| (r.as_str(), l.as_str(), e.as_slice())),
                0,
                p,
            )
        };
        let (full, half) = (build(Precision::F32), build(Precision::F16));
        assert_eq!(half.precision(), Precision::F16);
        assert_eq!(half.matrix_bytes() * 2, full.matrix_bytes());
        let a = full.search_batch(&queries, 1, -1.0);
        let b = half.search_batch(&queries, 1, -1.0);
        let agree = a
            .iter()
            .zip(&b)
            .filter(|(x, y)| x.candidates[0].ref_id == y.candidates[0].ref_id)
            .count();
        assert!(
            agree * 1000 >= 999 * a.len(),
            "top-1 agreement {agree}/{}",
            a.len()
        );
        for (x, y) in a.iter().zip(&b) {
            assert!((x.similarity - y.similarity).abs() < 2e-3);
        }
        // One query at a time through the f16 matrix too.
        let one = half.search(&queries[..dim], 1, -1.0);
        assert_eq!(one.candidates[0].ref_id, b[0].candidates[0].ref_id);
    }
}
