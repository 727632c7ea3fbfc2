//! The in-memory search index: every reference embedding in one contiguous,
//! L2-normalised f32 matrix, exact nearest-neighbour search with one
//! candidate per label, and optional per-label k-means prototypes.
//!
//! Built from the store's records and immutable afterwards: an update builds
//! a new index and swaps it in, so searches never wait for writers.

use std::collections::HashMap;

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

/// L2 distance between unit vectors with cosine similarity `s`.
pub fn distance_from_similarity(s: f32) -> f32 {
    (2.0 - 2.0 * s).max(0.0).sqrt()
}

/// One row of the matrix: which reference it is.
#[derive(Debug, Clone, PartialEq)]
pub struct RowInfo {
    pub ref_id: String,
    pub label: u32,
}

/// A candidate label for a query.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub label: String,
    pub similarity: f32,
    pub ref_id: String,
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
    pub label: Option<String>,
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
    vectors: Vec<f32>,
    rows: Vec<RowInfo>,
    labels: Vec<String>,
    prototypes: Option<Prototypes>,
}

impl Index {
    /// Builds an index from `(ref_id, label, embedding)` rows; embeddings are
    /// normalised here. All embeddings must have length `dim`.
    pub fn build<'a>(
        dim: usize,
        rows: impl IntoIterator<Item = (&'a str, &'a str, &'a [f32])>,
        prototypes_per_class: usize,
    ) -> Self {
        let mut label_ids: HashMap<String, u32> = HashMap::new();
        let mut index = Self {
            dim,
            ..Self::default()
        };
        for (ref_id, label, emb) in rows {
            debug_assert_eq!(emb.len(), dim);
            let next = index.labels.len() as u32;
            let id = *label_ids.entry(label.to_string()).or_insert_with(|| {
                index.labels.push(label.to_string());
                next
            });
            let start = index.vectors.len();
            index.vectors.extend_from_slice(emb);
            l2_normalize(&mut index.vectors[start..]);
            index.rows.push(RowInfo {
                ref_id: ref_id.to_string(),
                label: id,
            });
        }
        if prototypes_per_class > 0 {
            index.prototypes = Some(index.build_prototypes(prototypes_per_class));
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

    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    pub fn rows(&self) -> &[RowInfo] {
        &self.rows
    }

    /// The normalised embedding of row `i`.
    pub fn vector(&self, i: usize) -> &[f32] {
        &self.vectors[i * self.dim..(i + 1) * self.dim]
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
        let mut best: Vec<(f32, u32)> = vec![(f32::NEG_INFINITY, u32::MAX); self.labels.len()];
        match &self.prototypes {
            None => {
                for (i, row) in self.vectors.chunks_exact(self.dim.max(1)).enumerate() {
                    let s = dot(query, row);
                    let slot = &mut best[self.rows[i].label as usize];
                    if s > slot.0 {
                        *slot = (s, i as u32);
                    }
                }
            }
            Some(p) => {
                for (i, row) in p.vectors.chunks_exact(self.dim.max(1)).enumerate() {
                    let s = dot(query, row);
                    let slot = &mut best[p.labels[i] as usize];
                    if s > slot.0 {
                        *slot = (s, p.representative[i]);
                    }
                }
            }
        }
        let mut order: Vec<usize> = (0..best.len()).filter(|&l| best[l].1 != u32::MAX).collect();
        order.sort_by(|&a, &b| best[b].0.total_cmp(&best[a].0).then(a.cmp(&b)));
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
                    .max_by(|&a, &b| dot(c, self.vector(a)).total_cmp(&dot(c, self.vector(b))))
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
                let sa = max_sim(&centroids, dim, index.vector(a));
                let sb = max_sim(&centroids, dim, index.vector(b));
                sa.total_cmp(&sb)
            })
            .unwrap_or(rows[0]);
        centroids.extend_from_slice(index.vector(far));
    }
    let mut assign = vec![0usize; rows.len()];
    for _ in 0..20 {
        let mut changed = false;
        for (slot, &r) in assign.iter_mut().zip(rows) {
            let v = index.vector(r);
            let best = centroids
                .chunks_exact(dim)
                .enumerate()
                .max_by(|a, b| dot(a.1, v).total_cmp(&dot(b.1, v)))
                .map_or(0, |(i, _)| i);
            changed |= *slot != best;
            *slot = best;
        }
        let mut sums = vec![0f32; k * dim];
        for (&c, &r) in assign.iter().zip(rows) {
            for (s, x) in sums[c * dim..(c + 1) * dim].iter_mut().zip(index.vector(r)) {
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
        let labels: Vec<&str> = r.candidates.iter().map(|c| c.label.as_str()).collect();
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
        assert_eq!(proto.search(&q, 1, 0.0).candidates[0].ref_id, "c1");
    }
}
