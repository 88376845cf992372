//! Seeded scene sampling: 1–4 objects in distinct cells, uniform shapes, colours, sizes and
//! backgrounds, never drawing a held-out (colour, shape) or (shape, cell) pair.
//!
//! Held-out pairs test compositional generalisation: train on scenes that never contain, say,
//! a purple star, then ask for one. [`split_pairs`] picks the held-out set deterministically.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::scene::{Background, Cell, Color, MAX_OBJECTS, Object, Scene, Shape, Size};

/// Pairs the sampler never draws.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldOut {
    /// (colour, shape) pairs never drawn, wherever the object sits.
    pub color_shape: Vec<(Color, Shape)>,
    /// (shape, cell) pairs never drawn, whatever the object's colour.
    pub shape_cell: Vec<(Shape, Cell)>,
}

impl HeldOut {
    /// Whether `object` uses no held-out pair.
    pub fn allows(&self, object: &Object) -> bool {
        !self.color_shape.contains(&(object.color, object.shape))
            && !self.shape_cell.contains(&(object.shape, object.cell))
    }

    /// Whether any object of `scene` uses a held-out pair (a test scene, not a training one).
    pub fn touches(&self, scene: &Scene) -> bool {
        scene.objects().iter().any(|o| !self.allows(o))
    }
}

/// What the sampler draws.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerConfig {
    /// Fewest objects per scene (at least 1).
    pub min_objects: usize,
    /// Most objects per scene (at most 4).
    pub max_objects: usize,
    /// Pairs never drawn.
    pub held_out: HeldOut,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            min_objects: 1,
            max_objects: MAX_OBJECTS,
            held_out: HeldOut::default(),
        }
    }
}

/// Every (colour, shape) pair, in a fixed order.
pub fn all_color_shape_pairs() -> Vec<(Color, Shape)> {
    Color::ALL
        .iter()
        .flat_map(|c| Shape::ALL.iter().map(move |s| (*c, *s)))
        .collect()
}

/// Every (shape, cell) pair, in a fixed order.
pub fn all_shape_cell_pairs() -> Vec<(Shape, Cell)> {
    Shape::ALL
        .iter()
        .flat_map(|s| Cell::all().map(move |c| (*s, c)))
        .collect()
}

/// Splits `pairs` into (train, held out) by a seeded shuffle; `held_out` of them are held out
/// (clamped to the number of pairs). Each part keeps the input order.
pub fn split_pairs<T: Clone>(pairs: &[T], held_out: usize, seed: u64) -> (Vec<T>, Vec<T>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..pairs.len()).collect();
    shuffle(&mut order, &mut rng);
    let mut is_held = vec![false; pairs.len()];
    for &i in order.iter().take(held_out) {
        is_held[i] = true;
    }
    let pick = |want: bool| {
        pairs
            .iter()
            .zip(&is_held)
            .filter(|(_, h)| **h == want)
            .map(|(p, _)| p.clone())
            .collect()
    };
    (pick(false), pick(true))
}

/// Fisher–Yates shuffle (kept here so `rand` needs no `alloc` feature).
pub(crate) fn shuffle<T>(items: &mut [T], rng: &mut impl Rng) {
    for i in (1..items.len()).rev() {
        let j = rng.random_range(0..=i);
        items.swap(i, j);
    }
}

/// One uniformly chosen element of a non-empty slice.
pub(crate) fn choose<T: Copy>(items: &[T], rng: &mut impl Rng) -> T {
    items[rng.random_range(0..items.len())]
}

/// A seeded stream of scenes.
#[derive(Debug, Clone)]
pub struct Sampler {
    config: SamplerConfig,
    rng: ChaCha8Rng,
}

impl Sampler {
    /// A sampler whose stream is fixed by `seed`.
    pub fn new(config: SamplerConfig, seed: u64) -> Sampler {
        Sampler {
            config,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// The next scene. Cells whose every (colour, shape) is held out are skipped; if too few
    /// cells remain for the drawn count, the scene has fewer objects (never zero while any
    /// pair is allowed anywhere).
    pub fn sample(&mut self) -> Scene {
        let max = self.config.max_objects.clamp(1, MAX_OBJECTS);
        let min = self.config.min_objects.clamp(1, max);
        let count = self.rng.random_range(min..=max);
        let background = choose(Background::ALL, &mut self.rng);
        let mut cells: Vec<Cell> = Cell::all().collect();
        shuffle(&mut cells, &mut self.rng);
        let mut objects = Vec::with_capacity(count);
        for cell in cells {
            if objects.len() == count {
                break;
            }
            let allowed: Vec<(Color, Shape)> = all_color_shape_pairs()
                .into_iter()
                .filter(|&(color, shape)| {
                    self.config.held_out.allows(&Object {
                        shape,
                        color,
                        size: Size::Small,
                        cell,
                    })
                })
                .collect();
            if allowed.is_empty() {
                continue;
            }
            let (color, shape) = choose(&allowed, &mut self.rng);
            let size = choose(Size::ALL, &mut self.rng);
            objects.push(Object {
                shape,
                color,
                size,
                cell,
            });
        }
        if objects.is_empty() {
            // Everything is held out everywhere: fall back to an unrestricted object rather
            // than an invalid empty scene.
            objects.push(Object {
                shape: choose(Shape::ALL, &mut self.rng),
                color: choose(Color::ALL, &mut self.rng),
                size: choose(Size::ALL, &mut self.rng),
                cell: choose(&Cell::all().collect::<Vec<_>>(), &mut self.rng),
            });
        }
        // Distinct cells and 1..=4 objects hold by construction.
        Scene::new(background, objects)
            .unwrap_or_else(|_| unreachable!("sampler builds valid scenes"))
    }

    /// The next `n` scenes.
    pub fn take(&mut self, n: usize) -> Vec<Scene> {
        (0..n).map(|_| self.sample()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_by_seed() {
        let a = Sampler::new(SamplerConfig::default(), 7).take(20);
        let b = Sampler::new(SamplerConfig::default(), 7).take(20);
        let c = Sampler::new(SamplerConfig::default(), 8).take(20);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn counts_cover_one_to_four() {
        let scenes = Sampler::new(SamplerConfig::default(), 1).take(200);
        for n in 1..=4 {
            assert!(
                scenes.iter().any(|s| s.objects().len() == n),
                "no scene with {n}"
            );
        }
    }

    #[test]
    fn held_out_pairs_are_never_drawn() {
        let (_, held_cs) = split_pairs(&all_color_shape_pairs(), 8, 3);
        let (_, held_sc) = split_pairs(&all_shape_cell_pairs(), 9, 3);
        assert_eq!((held_cs.len(), held_sc.len()), (8, 9));
        let held_out = HeldOut {
            color_shape: held_cs,
            shape_cell: held_sc,
        };
        let config = SamplerConfig {
            held_out: held_out.clone(),
            ..SamplerConfig::default()
        };
        for scene in Sampler::new(config, 11).take(500) {
            assert!(!held_out.touches(&scene), "{}", scene.to_json());
        }
    }

    #[test]
    fn split_is_deterministic_and_partitions() {
        let pairs = all_color_shape_pairs();
        let (train, held) = split_pairs(&pairs, 10, 42);
        assert_eq!(split_pairs(&pairs, 10, 42), (train.clone(), held.clone()));
        assert_eq!(train.len() + held.len(), pairs.len());
        assert!(held.iter().all(|p| !train.contains(p)));
        assert_ne!(split_pairs(&pairs, 10, 43).1, held);
    }
}
