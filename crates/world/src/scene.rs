//! The scene model: a background colour and one to four shapes on a 3×3 grid, at most one per
//! cell, plus the world's documented JSON form (see the crate docs) and its validation.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::WorldError;

/// Side of the square grid the objects sit on.
pub const GRID: u8 = 3;
/// Most objects a scene may hold.
pub const MAX_OBJECTS: usize = 4;

/// Defines a closed, named vocabulary: `ALL`, `name()`, `Display` and `FromStr` with a typed
/// error, so the JSON form and the text both use the same lowercase names.
macro_rules! vocabulary {
    ($(#[$meta:meta])* $name:ident, $error:ident, { $($variant:ident => $word:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(rename_all = "lowercase")]
        pub enum $name { $($variant),+ }

        impl $name {
            /// Every value, in a fixed order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The lowercase name used in JSON and in the canonical text.
            pub fn name(self) -> &'static str {
                match self { $($name::$variant => $word),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }

        impl FromStr for $name {
            type Err = WorldError;

            fn from_str(s: &str) -> Result<Self, WorldError> {
                let s = s.trim().to_ascii_lowercase();
                Self::ALL
                    .iter()
                    .copied()
                    .find(|v| v.name() == s)
                    .ok_or(WorldError::$error(s))
            }
        }
    };
}

vocabulary!(
    /// The five object shapes.
    Shape, UnknownShape, {
        Circle => "circle",
        Square => "square",
        Triangle => "triangle",
        Star => "star",
        Ring => "ring",
    }
);

vocabulary!(
    /// The eight object colours; see [`Color::rgb`] for their sRGB values.
    Color, UnknownColor, {
        Red => "red",
        Orange => "orange",
        Yellow => "yellow",
        Green => "green",
        Cyan => "cyan",
        Blue => "blue",
        Purple => "purple",
        Pink => "pink",
    }
);

vocabulary!(
    /// The four background colours, none of them close to an object colour.
    Background, UnknownBackground, {
        White => "white",
        Black => "black",
        Gray => "gray",
        Beige => "beige",
    }
);

vocabulary!(
    /// Object size as a fraction of the grid cell; see [`Size::fraction`].
    Size, UnknownSize, {
        Small => "small",
        Medium => "medium",
        Large => "large",
    }
);

impl Color {
    /// sRGB value; picked so that every pair of object colours, and every object colour and
    /// background colour, is at least ~90 apart in RGB (the judge segments by nearest colour).
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Color::Red => [220, 30, 30],
            Color::Orange => [245, 130, 20],
            Color::Yellow => [240, 225, 30],
            Color::Green => [40, 170, 60],
            Color::Cyan => [30, 200, 220],
            Color::Blue => [40, 70, 220],
            Color::Purple => [140, 50, 190],
            Color::Pink => [250, 120, 190],
        }
    }
}

impl Background {
    /// sRGB value.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Background::White => [255, 255, 255],
            Background::Black => [0, 0, 0],
            Background::Gray => [128, 128, 128],
            Background::Beige => [235, 225, 200],
        }
    }
}

impl Size {
    /// Extent of the shape's bounding box as a fraction of the cell side.
    pub fn fraction(self) -> f32 {
        match self {
            Size::Small => 0.40,
            Size::Medium => 0.62,
            Size::Large => 0.86,
        }
    }

    /// The size class whose extent is nearest (in log scale) to `fraction` of a cell side.
    pub fn from_fraction(fraction: f32) -> Size {
        // Geometric means of neighbouring fractions: 0.498 and 0.730.
        if fraction < (Size::Small.fraction() * Size::Medium.fraction()).sqrt() {
            Size::Small
        } else if fraction < (Size::Medium.fraction() * Size::Large.fraction()).sqrt() {
            Size::Medium
        } else {
            Size::Large
        }
    }
}

/// A grid cell, `row` from the top and `col` from the left, both in `0..3`.
/// JSON form: `[row, col]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "[i64; 2]", into = "[u8; 2]")]
pub struct Cell {
    row: u8,
    col: u8,
}

impl Cell {
    /// A cell, checked to lie on the grid.
    pub fn new(row: u8, col: u8) -> Result<Cell, WorldError> {
        Cell::try_from([i64::from(row), i64::from(col)])
    }

    /// All nine cells in row-major order.
    pub fn all() -> impl Iterator<Item = Cell> {
        (0..GRID).flat_map(|row| (0..GRID).map(move |col| Cell { row, col }))
    }

    /// Row from the top, `0..3`.
    pub fn row(self) -> u8 {
        self.row
    }

    /// Column from the left, `0..3`.
    pub fn col(self) -> u8 {
        self.col
    }

    /// Row-major index `0..9`.
    pub fn index(self) -> usize {
        usize::from(self.row * GRID + self.col)
    }

    /// The cell's name in the canonical text ("top left", "center", ...).
    pub fn name(self) -> &'static str {
        const NAMES: [&str; 9] = [
            "top left",
            "top center",
            "top right",
            "middle left",
            "center",
            "middle right",
            "bottom left",
            "bottom center",
            "bottom right",
        ];
        NAMES[self.index()]
    }
}

impl TryFrom<[i64; 2]> for Cell {
    type Error = WorldError;

    fn try_from([row, col]: [i64; 2]) -> Result<Cell, WorldError> {
        let on_grid = |v: i64| (0..i64::from(GRID)).contains(&v);
        if on_grid(row) && on_grid(col) {
            // Both are in 0..3, so the casts are exact.
            Ok(Cell {
                row: row as u8,
                col: col as u8,
            })
        } else {
            Err(WorldError::CellOutOfGrid { row, col })
        }
    }
}

impl From<Cell> for [u8; 2] {
    fn from(cell: Cell) -> [u8; 2] {
        [cell.row, cell.col]
    }
}

/// One shape in a scene.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Object {
    pub shape: Shape,
    pub color: Color,
    pub size: Size,
    pub cell: Cell,
}

impl Object {
    /// "large red circle": the words that name the object without its place.
    pub fn noun_phrase(&self) -> String {
        format!("{} {} {}", self.size, self.color, self.shape)
    }
}

/// A validated scene: a background and 1–4 objects in distinct cells, kept in row-major order
/// of their cells so that equal scenes compare equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "SceneJson", into = "SceneJson")]
pub struct Scene {
    background: Background,
    objects: Vec<Object>,
}

impl Scene {
    /// Checks the scene rules (1–4 objects, one per cell) and sorts objects row-major.
    pub fn new(background: Background, mut objects: Vec<Object>) -> Result<Scene, WorldError> {
        if objects.is_empty() {
            return Err(WorldError::NoObjects);
        }
        if objects.len() > MAX_OBJECTS {
            return Err(WorldError::TooManyObjects(objects.len()));
        }
        objects.sort_by_key(|o| o.cell);
        if let Some(pair) = objects.windows(2).find(|w| w[0].cell == w[1].cell) {
            let cell = pair[0].cell;
            return Err(WorldError::CellTaken {
                row: cell.row,
                col: cell.col,
            });
        }
        Ok(Scene {
            background,
            objects,
        })
    }

    /// Parses the documented JSON form, with a typed error for each rule broken.
    pub fn from_json(json: &str) -> Result<Scene, WorldError> {
        let raw: SceneJson = serde_json::from_str(json)?;
        Scene::try_from(raw)
    }

    /// The documented JSON form, on one line.
    pub fn to_json(&self) -> String {
        // Serialising plain strings and small integers cannot fail.
        serde_json::to_string(&SceneJson::from(self.clone())).unwrap_or_default()
    }

    pub fn background(&self) -> Background {
        self.background
    }

    /// Objects in row-major order of their cells.
    pub fn objects(&self) -> &[Object] {
        &self.objects
    }

    /// The object in `cell`, if any.
    pub fn object_at(&self, cell: Cell) -> Option<&Object> {
        self.objects.iter().find(|o| o.cell == cell)
    }

    /// Cells with no object, row-major.
    pub fn free_cells(&self) -> impl Iterator<Item = Cell> + '_ {
        Cell::all().filter(|c| self.object_at(*c).is_none())
    }
}

/// The JSON form as written by hand: names as strings and cells as `[row, col]`, so that each
/// mistake gets its own [`WorldError`] rather than a generic serde message.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SceneJson {
    pub background: String,
    pub objects: Vec<ObjectJson>,
}

/// One object of [`SceneJson`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectJson {
    pub shape: String,
    pub color: String,
    pub size: String,
    pub cell: [i64; 2],
}

impl TryFrom<SceneJson> for Scene {
    type Error = WorldError;

    fn try_from(raw: SceneJson) -> Result<Scene, WorldError> {
        let objects = raw
            .objects
            .iter()
            .map(|o| {
                Ok(Object {
                    shape: o.shape.parse()?,
                    color: o.color.parse()?,
                    size: o.size.parse()?,
                    cell: Cell::try_from(o.cell)?,
                })
            })
            .collect::<Result<Vec<_>, WorldError>>()?;
        Scene::new(raw.background.parse()?, objects)
    }
}

impl From<Scene> for SceneJson {
    fn from(scene: Scene) -> SceneJson {
        SceneJson {
            background: scene.background.name().to_owned(),
            objects: scene
                .objects
                .iter()
                .map(|o| ObjectJson {
                    shape: o.shape.name().to_owned(),
                    color: o.color.name().to_owned(),
                    size: o.size.name().to_owned(),
                    cell: [i64::from(o.cell.row), i64::from(o.cell.col)],
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"{"background":"white","objects":[{"shape":"circle","color":"red","size":"large","cell":[0,2]}]}"#;

    fn rgb_distance(a: [u8; 3], b: [u8; 3]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (f32::from(*x) - f32::from(y)).powi(2))
            .sum::<f32>()
            .sqrt()
    }

    #[test]
    fn json_round_trip() {
        let scene = Scene::from_json(EXAMPLE).expect("example parses");
        assert_eq!(scene.background(), Background::White);
        assert_eq!(scene.objects()[0].cell, Cell::new(0, 2).expect("on grid"));
        assert_eq!(scene.to_json(), EXAMPLE);
        let via_serde: Scene = serde_json::from_str(EXAMPLE).expect("serde path parses");
        assert_eq!(via_serde, scene);
        assert_eq!(serde_json::to_string(&scene).expect("serialises"), EXAMPLE);
    }

    #[test]
    fn validation_errors_are_typed() {
        let with = |objects: &str| format!(r#"{{"background":"white","objects":[{objects}]}}"#);
        let circle = |cell: &str| {
            format!(r#"{{"shape":"circle","color":"red","size":"large","cell":{cell}}}"#)
        };
        let magenta = with(r#"{"shape":"circle","color":"magenta","size":"large","cell":[0,0]}"#);
        assert!(matches!(
            Scene::from_json(&magenta),
            Err(WorldError::UnknownColor(c)) if c == "magenta"
        ));
        let twice = with(&[circle("[1,1]"), circle("[1,1]")].join(","));
        assert!(matches!(
            Scene::from_json(&twice),
            Err(WorldError::CellTaken { row: 1, col: 1 })
        ));
        let five = with(
            &["[0,0]", "[0,1]", "[0,2]", "[1,0]", "[1,1]"]
                .map(circle)
                .join(","),
        );
        assert!(matches!(
            Scene::from_json(&five),
            Err(WorldError::TooManyObjects(5))
        ));
        assert!(matches!(
            Scene::from_json(&with(&circle("[3,0]"))),
            Err(WorldError::CellOutOfGrid { row: 3, col: 0 })
        ));
        assert!(matches!(
            Scene::from_json(&with(&circle("[0,-1]"))),
            Err(WorldError::CellOutOfGrid { row: 0, col: -1 })
        ));
        assert!(matches!(
            Scene::from_json(&with("")),
            Err(WorldError::NoObjects)
        ));
        let pink_bg = EXAMPLE.replace("white", "pink");
        assert!(matches!(
            Scene::from_json(&pink_bg),
            Err(WorldError::UnknownBackground(_))
        ));
        assert!(matches!(Scene::from_json("{"), Err(WorldError::Json(_))));
    }

    #[test]
    fn colours_are_well_separated() {
        let objects: Vec<_> = Color::ALL.iter().map(|c| c.rgb()).collect();
        let backgrounds: Vec<_> = Background::ALL.iter().map(|b| b.rgb()).collect();
        for (i, a) in objects.iter().enumerate() {
            for b in &objects[i + 1..] {
                assert!(rgb_distance(*a, *b) > 80.0, "{a:?} vs {b:?}");
            }
            for b in &backgrounds {
                assert!(rgb_distance(*a, *b) > 80.0, "{a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn size_classes_invert() {
        for size in Size::ALL {
            assert_eq!(Size::from_fraction(size.fraction()), *size);
        }
    }
}
