//! Synthetic reference sets of the sizes a store holds: 315 labels (the
//! classes of NVIDIA's model) x {1, 20, 100} references x {448, 2048}
//! dimensions (v2.0's and v1.0's embeddings), seeded and deterministic.
//!
//! Labels come in groups of five similar products (their centres share a
//! component: cosine 0.36 between siblings); each reference and each query
//! is its label's centre plus noise (cosine about 0.64 to it), unit length.

use rand::{Rng, SeedableRng};

use crate::refdb::index::l2_normalize;
use crate::refdb::Index;

/// Labels of every set.
pub const LABELS: usize = 315;
/// References per label of the sets.
pub const REFS_PER_LABEL: [usize; 3] = [1, 20, 100];
/// Embedding dimensions of the sets.
pub const DIMS: [usize; 2] = [448, 2048];

/// Labels per group of similar products.
const GROUP: usize = 5;
/// Weight of the group's shared component in a label centre (the rest,
/// `sqrt(1 - w^2)`, is the label's own).
const GROUP_WEIGHT: f32 = 0.6;
/// Norm of the noise added to a centre for a reference or a query.
const NOISE: f32 = 0.75;

/// References of `labels` labels at dimension `dim`, unit length.
pub struct ReferenceSet {
    pub dim: usize,
    pub labels: Vec<String>,
    pub ref_ids: Vec<String>,
    /// Label index of each reference.
    pub label_of: Vec<usize>,
    /// `ref_ids.len() * dim` values, row-major, each row unit length.
    pub vectors: Vec<f32>,
    centres: Vec<f32>,
}

impl ReferenceSet {
    /// `labels` labels with `refs_per_label` references each.
    pub fn generate(labels: usize, refs_per_label: usize, dim: usize, seed: u64) -> Self {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let groups: Vec<f32> = (0..labels.div_ceil(GROUP))
            .flat_map(|_| unit_vector(&mut rng, dim))
            .collect();
        let own_weight = (1.0 - GROUP_WEIGHT * GROUP_WEIGHT).sqrt();
        let mut centres = Vec::with_capacity(labels * dim);
        for label in 0..labels {
            let group = &groups[(label / GROUP) * dim..(label / GROUP + 1) * dim];
            let own = unit_vector(&mut rng, dim);
            let start = centres.len();
            centres.extend(
                group
                    .iter()
                    .zip(&own)
                    .map(|(g, o)| GROUP_WEIGHT * g + own_weight * o),
            );
            l2_normalize(&mut centres[start..]);
        }
        let mut set = Self {
            dim,
            labels: (0..labels).map(|l| format!("product-{l:03}")).collect(),
            ref_ids: Vec::with_capacity(labels * refs_per_label),
            label_of: Vec::with_capacity(labels * refs_per_label),
            vectors: Vec::with_capacity(labels * refs_per_label * dim),
            centres,
        };
        for label in 0..labels {
            for r in 0..refs_per_label {
                set.ref_ids.push(format!("product-{label:03}/{r:03}"));
                set.label_of.push(label);
                let start = set.vectors.len();
                set.vectors.resize(start + dim, 0.0);
                noisy_copy(
                    &mut rng,
                    &set.centres[label * dim..(label + 1) * dim],
                    &mut set.vectors[start..],
                );
            }
        }
        set
    }

    pub fn len(&self) -> usize {
        self.ref_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ref_ids.is_empty()
    }

    /// `(ref_id, label, embedding)` rows, as an index is built from.
    pub fn rows(&self) -> impl Iterator<Item = (&str, &str, &[f32])> {
        self.ref_ids
            .iter()
            .zip(&self.label_of)
            .zip(self.vectors.chunks_exact(self.dim))
            .map(|((id, &l), v)| (id.as_str(), self.labels[l].as_str(), v))
    }

    /// The daemon's index over the set (the code path of every DB snapshot).
    pub fn index(&self) -> Index {
        Index::build(self.dim, self.rows(), 0)
    }

    /// `n` queries (row-major, unit length), each near a label's centre
    /// (labels in turn), with the label each belongs to.
    pub fn queries(&self, n: usize, seed: u64) -> (Vec<f32>, Vec<usize>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut out = vec![0f32; n * self.dim];
        let labels: Vec<usize> = (0..n).map(|i| (i * 7) % self.labels.len()).collect();
        for (row, &label) in out.chunks_exact_mut(self.dim).zip(&labels) {
            noisy_copy(
                &mut rng,
                &self.centres[label * self.dim..(label + 1) * self.dim],
                row,
            );
        }
        (out, labels)
    }
}

fn unit_vector(rng: &mut impl Rng, dim: usize) -> Vec<f32> {
    let mut v: Vec<f32> = (0..dim).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    l2_normalize(&mut v);
    v
}

/// `out` = unit(`centre` + noise of norm [`NOISE`]).
fn noisy_copy(rng: &mut impl Rng, centre: &[f32], out: &mut [f32]) {
    // Uniform values in [-1, 1) have variance 1/3.
    let scale = NOISE / (centre.len() as f32 / 3.0).sqrt();
    for (o, c) in out.iter_mut().zip(centre) {
        *o = c + scale * rng.gen_range(-1.0f32..1.0);
    }
    l2_normalize(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dot(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn references_are_unit_vectors_nearer_their_own_label() {
        let set = ReferenceSet::generate(10, 3, 64, 1);
        assert_eq!(set.len(), 30);
        assert_eq!(set.vectors.len(), 30 * 64);
        let (queries, labels) = set.queries(10, 2);
        let index = set.index();
        let mut right = 0;
        for (q, &label) in queries.chunks_exact(64).zip(&labels) {
            assert!((dot(q, q) - 1.0).abs() < 1e-4);
            let r = index.search(q, 1, 0.0);
            right += usize::from(r.label.as_deref() == Some(set.labels[label].as_str()));
        }
        assert!(right >= 8, "{right} of 10 queries found their label");
    }

    #[test]
    fn the_same_seed_gives_the_same_set() {
        let a = ReferenceSet::generate(6, 2, 16, 9);
        let b = ReferenceSet::generate(6, 2, 16, 9);
        assert_eq!(a.vectors, b.vectors);
        assert_eq!(a.ref_ids, b.ref_ids);
    }
}
