//! The demo world of UniFusion-Web: a closed world of coloured shapes that a program can
//! generate, render, describe, edit and judge exactly.
//!
//! A [`Scene`] is a background colour and one to four objects on a 3×3 grid, at most one per
//! cell. Each object has a [`Shape`] (circle, square, triangle, star, ring), a [`Color`] (red,
//! orange, yellow, green, cyan, blue, purple, pink), a [`Size`] (small, medium, large) and a
//! [`Cell`]. Backgrounds are white, black, gray or beige, all far from every object colour.
//!
//! # JSON form
//!
//! Scenes are written by hand in this form (names lowercase, `cell` is `[row, col]` with row 0
//! at the top and col 0 at the left):
//!
//! ```json
//! {"background":"white","objects":[
//!   {"shape":"circle","color":"red","size":"large","cell":[0,2]},
//!   {"shape":"star","color":"blue","size":"small","cell":[1,1]}
//! ]}
//! ```
//!
//! [`Scene::from_json`] names each mistake with its own [`WorldError`]: an unknown name, a cell
//! off the grid, two objects in one cell, no objects or more than four.
//!
//! # Pieces
//!
//! - [`sampler`]: seeded scenes, with held-out (colour, shape) or (shape, cell) pairs.
//! - [`render`]: anti-aliased RGB rendering at any size from 24 px up.
//! - [`text`]: the canonical description (the VERIFI rewrite target) and seeded user phrasings.
//! - [`edit`]: edit instructions with before/after scenes, and two-image transfers.
//! - [`judge`]: an image back to a scene; [`score`]: DPG-style scoring and aggregation.
//!
//! Everything is deterministic by seed and runs on `wasm32-unknown-unknown` (no OS randomness,
//! no threads, no file I/O outside [`render::save_png`]).

pub mod edit;
pub mod judge;
pub mod render;
pub mod sampler;
pub mod scene;
pub mod score;
pub mod text;

pub use edit::{Edit, EditKind, Transfer};
pub use judge::{ParsedObject, ParsedScene, parse_image};
pub use render::{RenderConfig, render};
pub use sampler::{HeldOut, Sampler, SamplerConfig};
pub use scene::{Background, Cell, Color, Object, Scene, Shape, Size};
pub use score::{Category, EditScore, ImageScore, Tally, score_edit, score_objects, score_scene};
pub use text::{Phrasing, canonical_description, description_in_order, phrase, read_description};

/// Everything that can go wrong in the demo world.
#[derive(Debug, thiserror::Error)]
pub enum WorldError {
    #[error("scene JSON is malformed: {0}")]
    Json(#[from] serde_json::Error),
    #[error(
        "unknown object color `{0}`; use one of red, orange, yellow, green, cyan, blue, purple, pink"
    )]
    UnknownColor(String),
    #[error("unknown background `{0}`; use one of white, black, gray, beige")]
    UnknownBackground(String),
    #[error("unknown shape `{0}`; use one of circle, square, triangle, star, ring")]
    UnknownShape(String),
    #[error("unknown size `{0}`; use one of small, medium, large")]
    UnknownSize(String),
    #[error("cell [{row}, {col}] is off the 3x3 grid; row and col must be 0, 1 or 2")]
    CellOutOfGrid { row: i64, col: i64 },
    #[error("cell [{row}, {col}] holds two objects; put each object in its own cell")]
    CellTaken { row: u8, col: u8 },
    #[error("a scene holds at most 4 objects, this one has {0}; drop some")]
    TooManyObjects(usize),
    #[error("a scene needs at least one object")]
    NoObjects,
    #[error("no object in cell [{row}, {col}] to edit; pick an occupied cell")]
    NoObjectAt { row: u8, col: u8 },
    #[error("this edit leaves the scene unchanged; pick a different target value")]
    NoChange,
    #[error("image size {0} is too small to render or judge; use at least 24 pixels")]
    ImageTooSmall(u32),
    #[error("could not write the image: {0}")]
    Image(#[from] image::ImageError),
}
