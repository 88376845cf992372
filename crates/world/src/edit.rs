//! Edit tasks: an instruction (in a few phrasings) with its before and after scenes, and the
//! two-image task "put the object from the first image into the second image".
//!
//! Objects are named as in the canonical text ("the large red circle", with its place added
//! when another object shares those words), so every instruction picks out one object.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::WorldError;
use crate::sampler::choose;
use crate::scene::{Background, Cell, Color, Object, Scene, Size};
use crate::text::reference;

/// What an edit changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum EditKind {
    /// The object in `cell` takes colour `to`.
    Recolor { cell: Cell, to: Color },
    /// The object in `cell` goes.
    Remove { cell: Cell },
    /// `object` joins the scene in its (free) cell.
    Add { object: Object },
    /// The object in `from` moves to the free cell `to`.
    Move { from: Cell, to: Cell },
    /// The object in `cell` takes size `to`.
    Resize { cell: Cell, to: Size },
    /// The background becomes `to`.
    Background { to: Background },
}

/// An edit instruction with the scenes before and after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Edit {
    pub kind: EditKind,
    pub before: Scene,
    pub after: Scene,
    /// Equivalent wordings of the instruction; the first is the plainest.
    pub instructions: Vec<String>,
}

/// A uniformly chosen value of `all` other than `current`.
fn other<T: Copy + PartialEq>(all: &[T], current: T, rng: &mut impl Rng) -> T {
    let options: Vec<T> = all.iter().copied().filter(|v| *v != current).collect();
    choose(&options, rng)
}

/// Index of the object in `cell`, or the error naming the empty cell.
fn object_index(scene: &Scene, cell: Cell) -> Result<usize, WorldError> {
    scene
        .objects()
        .iter()
        .position(|o| o.cell == cell)
        .ok_or(WorldError::NoObjectAt {
            row: cell.row(),
            col: cell.col(),
        })
}

impl Edit {
    /// Applies `kind` to `before`, checking that it names real objects, keeps the scene valid
    /// and changes something.
    pub fn new(before: &Scene, kind: EditKind) -> Result<Edit, WorldError> {
        let mut objects = before.objects().to_vec();
        let mut background = before.background();
        let instructions = match kind {
            EditKind::Recolor { cell, to } => {
                let i = object_index(before, cell)?;
                let r = reference(before, i);
                objects[i].color = to;
                vec![
                    format!("Make {r} {to}."),
                    format!("Change the color of {r} to {to}."),
                    format!("Recolor {r} {to}."),
                    format!("Turn {r} {to}."),
                ]
            }
            EditKind::Remove { cell } => {
                let i = object_index(before, cell)?;
                let r = reference(before, i);
                objects.remove(i);
                vec![
                    format!("Remove {r}."),
                    format!("Delete {r}."),
                    format!("Take away {r}."),
                ]
            }
            EditKind::Add { object } => {
                let (np, place) = (object.noun_phrase(), object.cell.name());
                objects.push(object);
                vec![
                    format!("Add a {np} in the {place}."),
                    format!("Put a {np} in the {place}."),
                    format!("Draw a {np} in the {place} as well."),
                ]
            }
            EditKind::Move { from, to } => {
                let i = object_index(before, from)?;
                let r = reference(before, i);
                objects[i].cell = to;
                let place = to.name();
                vec![
                    format!("Move {r} to the {place}."),
                    format!("Put {r} in the {place} instead."),
                    format!("Shift {r} over to the {place}."),
                ]
            }
            EditKind::Resize { cell, to } => {
                let i = object_index(before, cell)?;
                let r = reference(before, i);
                let verb = if to > objects[i].size {
                    "Enlarge"
                } else {
                    "Shrink"
                };
                objects[i].size = to;
                vec![
                    format!("Make {r} {to}."),
                    format!("Change the size of {r} to {to}."),
                    format!("{verb} {r} to {to} size."),
                ]
            }
            EditKind::Background { to } => {
                background = to;
                vec![
                    format!("Change the background to {to}."),
                    format!("Make the background {to}."),
                    format!("Use a {to} background."),
                ]
            }
        };
        let after = Scene::new(background, objects)?;
        if after == *before {
            return Err(WorldError::NoChange);
        }
        Ok(Edit {
            kind,
            before: before.clone(),
            after,
            instructions,
        })
    }

    /// A seeded edit of `before`: a uniformly chosen kind among those the scene allows (no
    /// removing the last object, no adding to a full scene), then uniform parameters.
    pub fn sample(before: &Scene, seed: u64) -> Edit {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let objects = before.objects();
        let free: Vec<Cell> = before.free_cells().collect();
        let mut kinds = vec![0, 4, 5];
        if objects.len() > 1 {
            kinds.push(1);
        }
        if objects.len() < crate::scene::MAX_OBJECTS {
            kinds.extend([2, 3]);
        }
        let target = choose(objects, &mut rng);
        let kind = match choose(&kinds, &mut rng) {
            0 => EditKind::Recolor {
                cell: target.cell,
                to: other(Color::ALL, target.color, &mut rng),
            },
            1 => EditKind::Remove { cell: target.cell },
            2 => EditKind::Add {
                object: Object {
                    shape: choose(crate::scene::Shape::ALL, &mut rng),
                    color: choose(Color::ALL, &mut rng),
                    size: choose(Size::ALL, &mut rng),
                    cell: choose(&free, &mut rng),
                },
            },
            3 => EditKind::Move {
                from: target.cell,
                to: choose(&free, &mut rng),
            },
            4 => EditKind::Resize {
                cell: target.cell,
                to: other(Size::ALL, target.size, &mut rng),
            },
            _ => EditKind::Background {
                to: other(Background::ALL, before.background(), &mut rng),
            },
        };
        // Every kind above names an existing object, a free cell and a new value.
        Edit::new(before, kind).unwrap_or_else(|e| unreachable!("sampled edit is valid: {e}"))
    }

    /// One of the instruction's wordings, chosen by `seed`.
    pub fn instruction(&self, seed: u64) -> &str {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let i = rng.random_range(0..self.instructions.len());
        &self.instructions[i]
    }
}

/// A two-image task: the object in `from_cell` of the first scene is put into the second scene
/// at the same cell; the result keeps the second scene's background.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    pub first: Scene,
    pub second: Scene,
    pub from_cell: Cell,
    pub after: Scene,
    pub instructions: Vec<String>,
}

impl Transfer {
    /// Builds the task; fails if `from_cell` is empty in the first scene, taken in the
    /// second, or the second is full.
    pub fn new(first: &Scene, second: &Scene, from_cell: Cell) -> Result<Transfer, WorldError> {
        let i = object_index(first, from_cell)?;
        let r = reference(first, i);
        let mut objects = second.objects().to_vec();
        objects.push(first.objects()[i]);
        let after = Scene::new(second.background(), objects)?;
        Ok(Transfer {
            first: first.clone(),
            second: second.clone(),
            from_cell,
            after,
            instructions: vec![
                format!("Put {r} from the first image into the second image."),
                format!("Copy {r} from image 1 into image 2, in the same place."),
                format!(
                    "Take {r} from the first picture and add it to the second one at the same position."
                ),
            ],
        })
    }

    /// A seeded transfer between two scenes, if any object of the first fits the second.
    pub fn sample(first: &Scene, second: &Scene, seed: u64) -> Option<Transfer> {
        let fitting: Vec<Cell> = first
            .objects()
            .iter()
            .map(|o| o.cell)
            .filter(|c| second.object_at(*c).is_none())
            .collect();
        if fitting.is_empty() || second.objects().len() >= crate::scene::MAX_OBJECTS {
            return None;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Transfer::new(first, second, choose(&fitting, &mut rng)).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::{Sampler, SamplerConfig};

    fn scene() -> Scene {
        Scene::from_json(
            r#"{"background":"white","objects":[
                {"shape":"circle","color":"red","size":"large","cell":[0,0]},
                {"shape":"star","color":"blue","size":"small","cell":[1,1]}]}"#,
        )
        .expect("valid")
    }

    fn cell(r: u8, c: u8) -> Cell {
        Cell::new(r, c).expect("on grid")
    }

    #[test]
    fn each_kind_changes_what_it_says() {
        let s = scene();
        let recolor = Edit::new(
            &s,
            EditKind::Recolor {
                cell: cell(0, 0),
                to: Color::Green,
            },
        )
        .expect("valid");
        assert_eq!(recolor.instructions[0], "Make the large red circle green.");
        assert_eq!(
            recolor.after.object_at(cell(0, 0)).map(|o| o.color),
            Some(Color::Green)
        );
        assert_eq!(recolor.after.object_at(cell(1, 1)), s.object_at(cell(1, 1)));

        let moved = Edit::new(
            &s,
            EditKind::Move {
                from: cell(0, 0),
                to: cell(2, 2),
            },
        )
        .expect("valid");
        assert!(moved.after.object_at(cell(0, 0)).is_none());
        assert_eq!(
            moved.after.object_at(cell(2, 2)).map(|o| o.shape),
            Some(crate::Shape::Circle)
        );

        assert!(matches!(
            Edit::new(&s, EditKind::Remove { cell: cell(2, 0) }),
            Err(WorldError::NoObjectAt { row: 2, col: 0 })
        ));
        assert!(matches!(
            Edit::new(
                &s,
                EditKind::Resize {
                    cell: cell(1, 1),
                    to: Size::Small
                }
            ),
            Err(WorldError::NoChange)
        ));
        assert!(matches!(
            Edit::new(
                &s,
                EditKind::Move {
                    from: cell(0, 0),
                    to: cell(1, 1)
                }
            ),
            Err(WorldError::CellTaken { row: 1, col: 1 })
        ));
    }

    #[test]
    fn sampled_edits_are_valid_and_deterministic() {
        for (seed, s) in Sampler::new(SamplerConfig::default(), 4)
            .take(300)
            .iter()
            .enumerate()
        {
            let e = Edit::sample(s, seed as u64);
            assert_eq!(e, Edit::sample(s, seed as u64));
            assert_ne!(e.before, e.after);
            assert!(e.instructions.len() >= 3);
        }
    }

    #[test]
    fn transfer_puts_the_object_into_the_second_scene() {
        let first = scene();
        let second = Scene::from_json(
            r#"{"background":"black","objects":[{"shape":"ring","color":"pink","size":"medium","cell":[2,2]}]}"#,
        )
        .expect("valid");
        let t = Transfer::new(&first, &second, cell(1, 1)).expect("fits");
        assert_eq!(t.after.background(), Background::Black);
        assert_eq!(t.after.objects().len(), 2);
        assert_eq!(t.after.object_at(cell(1, 1)), first.object_at(cell(1, 1)));
        assert_eq!(
            t.instructions[0],
            "Put the small blue star from the first image into the second image."
        );
        assert!(Transfer::new(&second, &first, cell(1, 1)).is_err());
    }
}
