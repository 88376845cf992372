//! Scene text: the canonical description (the VERIFI rewrite target) and seeded user
//! phrasings.
//!
//! The canonical description is deterministic: background and count, then each object
//! row-major by cell with its size, colour, shape and place, then the relation of every pair.
//!
//! A [`Phrasing`] varies synonyms ("box", "disc", "big"), object order, where the background
//! goes, style (terse, list, sentence, wordy) and relational wording ("directly to the left of
//! the red disc"). Every phrasing still pins the whole scene: each object's size, colour and
//! shape are named, its cell is named or follows from a "directly left/right/above/below"
//! relation to an object named before, and the count is the number of objects listed. Every
//! relation it uses is recorded in [`Phrasing::claims`] and is true in the scene.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::sampler::{choose, shuffle};
use crate::scene::{Background, Cell, Color, Object, Scene, Shape, Size};

const COUNT_WORDS: [&str; 5] = ["zero", "one", "two", "three", "four"];

/// "two objects" / "one object".
pub(crate) fn count_phrase(n: usize, noun: &str) -> String {
    let word = COUNT_WORDS.get(n).copied().unwrap_or("many");
    if n == 1 {
        format!("{word} {noun}")
    } else {
        format!("{word} {noun}s")
    }
}

/// How the object at `index` is referred to without ambiguity: "the large red circle", or
/// "the large red circle in the top left" when another object has the same words.
pub(crate) fn reference(scene: &Scene, index: usize) -> String {
    let objects = scene.objects();
    let o = &objects[index];
    let twins = objects
        .iter()
        .filter(|p| (p.size, p.color, p.shape) == (o.size, o.color, o.shape))
        .count();
    if twins > 1 {
        format!("the {} in the {}", o.noun_phrase(), o.cell.name())
    } else {
        format!("the {}", o.noun_phrase())
    }
}

/// The canonical detailed description of `scene`: the background, the count, then every
/// object in its cell, in reading order. Every attribute and position is stated exactly once;
/// pairwise relations are implied by the cells, so they are not spelled out (they made the
/// VERIFI target up to three times longer for four objects, and the VLM has to write it).
pub fn canonical_description(scene: &Scene) -> String {
    description_in_order(scene, &[])
}

/// The canonical description with the objects listed in `order` (indices into
/// `scene.objects()`); reading order when `order` is not a permutation of them (empty, say).
pub fn description_in_order(scene: &Scene, order: &[usize]) -> String {
    let objects = scene.objects();
    let reading: Vec<usize> = (0..objects.len()).collect();
    let mut sorted = order.to_vec();
    sorted.sort_unstable();
    let order = if sorted == reading { order } else { &reading };
    let mut text = format!(
        "A {} background with {}.",
        scene.background(),
        count_phrase(objects.len(), "object")
    );
    for &i in order {
        let o = &objects[i];
        text.push_str(&format!(
            " In the {}: a {}.",
            o.cell.name(),
            o.noun_phrase()
        ));
    }
    text
}

/// Reads text in the canonical form back (the judge for a VLM's rewrite): the background of
/// "A … background with …." and every "In the <cell>: a <size> <colour> <shape>." sentence,
/// in any order. Other sentences and unreadable ones are skipped, so a half-right rewrite
/// scores what it got right; `None` when there is no readable background sentence.
pub fn read_description(text: &str) -> Option<(Background, Vec<Object>)> {
    let mut background = None;
    let mut objects = Vec::new();
    for sentence in text.split('.').map(str::trim) {
        if let Some(rest) = sentence.strip_prefix("A ")
            && let Some((bg, _)) = rest.split_once(" background")
        {
            background = background.or(bg.parse::<Background>().ok());
        } else if let Some(rest) = sentence.strip_prefix("In the ")
            && let Some((cell, noun)) = rest.split_once(": a ")
            && let Some(cell) = Cell::all().find(|c| c.name() == cell)
            && let [size, color, shape] = noun.split_whitespace().collect::<Vec<_>>()[..]
            && let (Ok(size), Ok(color), Ok(shape)) = (size.parse(), color.parse(), shape.parse())
        {
            objects.push(Object {
                shape,
                color,
                size,
                cell,
            });
        }
    }
    background.map(|b| (b, objects))
}

fn capitalise(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// A spatial relation between two objects' cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Relation {
    LeftOf,
    RightOf,
    Above,
    Below,
    /// Horizontally or vertically adjacent.
    NextTo,
    /// Same row, one column to the left (pins the cell).
    DirectlyLeftOf,
    DirectlyRightOf,
    /// Same column, one row up (pins the cell).
    DirectlyAbove,
    DirectlyBelow,
}

impl Relation {
    /// Whether `subject` stands in this relation to `anchor`.
    pub fn holds(self, subject: Cell, anchor: Cell) -> bool {
        let dr = i32::from(subject.row()) - i32::from(anchor.row());
        let dc = i32::from(subject.col()) - i32::from(anchor.col());
        match self {
            Relation::LeftOf => dc < 0,
            Relation::RightOf => dc > 0,
            Relation::Above => dr < 0,
            Relation::Below => dr > 0,
            Relation::NextTo => dr.abs() + dc.abs() == 1,
            Relation::DirectlyLeftOf => dr == 0 && dc == -1,
            Relation::DirectlyRightOf => dr == 0 && dc == 1,
            Relation::DirectlyAbove => dc == 0 && dr == -1,
            Relation::DirectlyBelow => dc == 0 && dr == 1,
        }
    }

    /// The cell a "directly" relation to `anchor` pins, if any.
    pub fn pinned_cell(self, anchor: Cell) -> Option<Cell> {
        let (r, c) = (i64::from(anchor.row()), i64::from(anchor.col()));
        let (r, c) = match self {
            Relation::DirectlyLeftOf => (r, c - 1),
            Relation::DirectlyRightOf => (r, c + 1),
            Relation::DirectlyAbove => (r - 1, c),
            Relation::DirectlyBelow => (r + 1, c),
            _ => return None,
        };
        Cell::try_from([r, c]).ok()
    }

    fn words(self, rng: &mut impl Rng) -> &'static str {
        let options: &[&str] = match self {
            Relation::LeftOf => &["to the left of", "left of"],
            Relation::RightOf => &["to the right of", "right of"],
            Relation::Above => &["above", "higher up than"],
            Relation::Below => &["below", "lower down than"],
            Relation::NextTo => &["next to", "beside"],
            Relation::DirectlyLeftOf => &["directly to the left of", "immediately left of"],
            Relation::DirectlyRightOf => &["directly to the right of", "immediately right of"],
            Relation::DirectlyAbove => &["directly above", "right above"],
            Relation::DirectlyBelow => &["directly below", "right below"],
        };
        choose(options, rng)
    }
}

/// Where a phrasing puts an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Location {
    /// Named outright ("in the top left").
    Cell(Cell),
    /// Pinned by a "directly ..." relation to an object mentioned before (index into
    /// `scene.objects()`).
    Relative { relation: Relation, anchor: usize },
}

/// One object as a phrasing mentions it (index into `scene.objects()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mention {
    pub object: usize,
    pub location: Location,
}

/// A relation the phrasing states between two objects (indices into `scene.objects()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub subject: usize,
    pub relation: Relation,
    pub anchor: usize,
}

/// A user-style prompt for a scene, with the structure it was built from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Phrasing {
    pub text: String,
    /// Every object, in the order the text mentions them.
    pub mentions: Vec<Mention>,
    /// Every relation the text states, all true in the scene.
    pub claims: Vec<Claim>,
}

impl Phrasing {
    /// The VERIFI rewrite target of this phrasing of `scene`: its canonical description with
    /// the objects in the order the text mentions them. The facts are the scene's; keeping
    /// the user's order makes the rewrite a left-to-right translation instead of a sort.
    pub fn rewrite_target(&self, scene: &Scene) -> String {
        let order: Vec<usize> = self.mentions.iter().map(|m| m.object).collect();
        description_in_order(scene, &order)
    }
}

/// Synonyms a phrasing may use; the first of each is the canonical word.
pub fn shape_words(shape: Shape) -> &'static [&'static str] {
    match shape {
        Shape::Circle => &["circle", "disc"],
        Shape::Square => &["square", "box", "block"],
        Shape::Triangle => &["triangle"],
        Shape::Star => &["star", "five-pointed star"],
        Shape::Ring => &["ring", "donut", "hoop"],
    }
}

/// Synonyms for sizes.
pub fn size_words(size: Size) -> &'static [&'static str] {
    match size {
        Size::Small => &["small", "little"],
        Size::Medium => &["medium", "medium-sized", "mid-sized"],
        Size::Large => &["large", "big"],
    }
}

/// Synonyms for colours.
pub fn color_words(color: Color) -> &'static [&'static str] {
    match color {
        Color::Red => &["red"],
        Color::Orange => &["orange"],
        Color::Yellow => &["yellow"],
        Color::Green => &["green"],
        Color::Cyan => &["cyan"],
        Color::Blue => &["blue"],
        Color::Purple => &["purple", "violet"],
        Color::Pink => &["pink"],
    }
}

fn background_words(background: Background) -> &'static [&'static str] {
    match background {
        Background::Gray => &["gray", "grey"],
        Background::White => &["white"],
        Background::Black => &["black"],
        Background::Beige => &["beige"],
    }
}

/// Synonyms for cells, without a preposition ("upper left").
pub fn cell_words(cell: Cell) -> &'static [&'static str] {
    const WORDS: [&[&str]; 9] = [
        &["top left", "upper left", "top-left corner"],
        &["top center", "top middle"],
        &["top right", "upper right", "top-right corner"],
        &["middle left", "center left"],
        &["center", "middle", "very center"],
        &["middle right", "center right"],
        &["bottom left", "lower left", "bottom-left corner"],
        &["bottom center", "bottom middle"],
        &["bottom right", "lower right", "bottom-right corner"],
    ];
    WORDS[cell.index()]
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Style {
    Terse,
    List,
    Sentence,
    Wordy,
}

/// A seeded user phrasing of `scene`; the same `(scene, seed)` gives the same text.
pub fn phrase(scene: &Scene, seed: u64) -> Phrasing {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let objects = scene.objects();
    let style = choose(
        &[Style::Terse, Style::List, Style::Sentence, Style::Wordy],
        &mut rng,
    );
    let mut order: Vec<usize> = (0..objects.len()).collect();
    match rng.random_range(0..3) {
        0 => {}
        1 => order.reverse(),
        _ => shuffle(&mut order, &mut rng),
    }
    // Words per object ("big red disc"), and the short name used to point back at it.
    let words: Vec<(String, String)> = objects
        .iter()
        .map(|o| {
            let size = choose(size_words(o.size), &mut rng);
            let color = choose(color_words(o.color), &mut rng);
            let shape = choose(shape_words(o.shape), &mut rng);
            (
                format!("{size} {color} {shape}"),
                format!("{color} {shape}"),
            )
        })
        .collect();
    let pointer = |i: usize| -> Option<String> {
        let o = &objects[i];
        let same = |f: &dyn Fn(&Object) -> bool| objects.iter().filter(|p| f(p)).count() == 1;
        if same(&|p| (p.color, p.shape) == (o.color, o.shape)) {
            Some(format!("the {}", words[i].1))
        } else if same(&|p| (p.size, p.color, p.shape) == (o.size, o.color, o.shape)) {
            Some(format!("the {}", words[i].0))
        } else {
            None
        }
    };

    let relational = matches!(style, Style::Sentence | Style::Wordy);
    let mut mentions = Vec::new();
    let mut clauses = Vec::new();
    for (k, &i) in order.iter().enumerate() {
        let earlier = &order[..k];
        let anchor = earlier
            .iter()
            .copied()
            .filter(|&j| pointer(j).is_some())
            .find_map(|j| {
                [
                    Relation::DirectlyLeftOf,
                    Relation::DirectlyRightOf,
                    Relation::DirectlyAbove,
                    Relation::DirectlyBelow,
                ]
                .into_iter()
                .find(|r| r.holds(objects[i].cell, objects[j].cell))
                .map(|r| (r, j))
            });
        let a = &words[i].0;
        let (location, clause) = match anchor {
            Some((relation, j)) if relational && rng.random_bool(0.6) => {
                let target = pointer(j).unwrap_or_default();
                let rel = relation.words(&mut rng);
                let clause = match style {
                    Style::Wordy if rng.random_bool(0.5) => {
                        format!("{} there is a {a}", capitalise(&format!("{rel} {target}")))
                    }
                    Style::Wordy => format!("There is a {a} {rel} {target}"),
                    _ => format!("a {a} {rel} {target}"),
                };
                (
                    Location::Relative {
                        relation,
                        anchor: j,
                    },
                    clause,
                )
            }
            _ => {
                let cell = objects[i].cell;
                let place = choose(cell_words(cell), &mut rng);
                let clause = match style {
                    Style::Terse => format!("{a} {place}"),
                    Style::List => format!("{}: a {a}", capitalise(place)),
                    Style::Sentence => format!("a {a} in the {place}"),
                    Style::Wordy => {
                        if rng.random_bool(0.5) {
                            format!("In the {place} there is a {a}")
                        } else {
                            format!("There is a {a} in the {place}")
                        }
                    }
                };
                (Location::Cell(cell), clause)
            }
        };
        mentions.push(Mention {
            object: i,
            location,
        });
        clauses.push(clause);
    }

    // A looser relation between two clearly named objects, for relational styles.
    let mut claims: Vec<Claim> = mentions
        .iter()
        .filter_map(|m| match m.location {
            Location::Relative { relation, anchor } => Some(Claim {
                subject: m.object,
                relation,
                anchor,
            }),
            Location::Cell(_) => None,
        })
        .collect();
    let mut extra = None;
    if relational && objects.len() > 1 && rng.random_bool(0.5) {
        let (s, t) = (order[0], order[1]);
        if let (Some(ps), Some(pt)) = (pointer(s), pointer(t)) {
            let (cs, ct) = (objects[s].cell, objects[t].cell);
            let options: Vec<Relation> = [
                Relation::LeftOf,
                Relation::RightOf,
                Relation::Above,
                Relation::Below,
                Relation::NextTo,
            ]
            .into_iter()
            .filter(|r| r.holds(cs, ct))
            .collect();
            if !options.is_empty() {
                let relation = choose(&options, &mut rng);
                let rel = relation.words(&mut rng);
                extra = Some(capitalise(&format!("{ps} is {rel} {pt}.")));
                claims.push(Claim {
                    subject: s,
                    relation,
                    anchor: t,
                });
            }
        }
    }

    let bg = choose(background_words(scene.background()), &mut rng);
    let n = objects.len();
    let text = match style {
        Style::Terse => {
            let list = clauses.join(", ");
            if rng.random_bool(0.5) {
                format!("{list}; {bg} bg")
            } else {
                format!("{bg} background: {list}")
            }
        }
        Style::List => {
            let head = if rng.random_bool(0.5) {
                format!("Background: {bg}. Objects: {}.", COUNT_WORDS[n])
            } else {
                format!("Background: {bg}.")
            };
            format!("{head} {}.", clauses.join(". "))
        }
        Style::Sentence => {
            let list = join_and(&clauses);
            let body = if rng.random_bool(0.5) {
                format!("{list}, on a {bg} background.")
            } else {
                format!("on a {bg} background, {list}.")
            };
            let body = if rng.random_bool(0.4) {
                format!("{}: {body}", capitalise(&count_phrase(n, "shape")))
            } else {
                capitalise(&body)
            };
            match extra {
                Some(e) => format!("{body} {e}"),
                None => body,
            }
        }
        Style::Wordy => {
            let head = format!(
                "Please draw a {bg} background with exactly {} on it.",
                count_phrase(n, "shape")
            );
            let body: Vec<String> = clauses
                .iter()
                .map(|c| format!("{}.", capitalise(c)))
                .collect();
            let mut text = format!("{head} {}", body.join(" "));
            if let Some(e) = extra {
                text.push(' ');
                text.push_str(&e);
            }
            text
        }
    };
    Phrasing {
        text,
        mentions,
        claims,
    }
}

/// "a, b and c".
fn join_and(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::{Sampler, SamplerConfig};
    use std::collections::HashSet;

    #[test]
    fn canonical_text_is_fixed_and_complete() {
        let scene = Scene::from_json(
            r#"{"background":"gray","objects":[
                {"shape":"star","color":"blue","size":"small","cell":[1,1]},
                {"shape":"circle","color":"red","size":"large","cell":[0,0]}]}"#,
        )
        .expect("valid");
        assert_eq!(
            canonical_description(&scene),
            "A gray background with two objects. In the top left: a large red circle. \
             In the center: a small blue star."
        );
        assert_eq!(
            description_in_order(&scene, &[1, 0]),
            "A gray background with two objects. In the center: a small blue star. \
             In the top left: a large red circle."
        );
        // Read back, in either order.
        for text in [
            canonical_description(&scene),
            description_in_order(&scene, &[1, 0]),
        ] {
            let (bg, objects) = read_description(&text).expect("reads");
            assert_eq!(Scene::new(bg, objects).expect("valid"), scene);
        }
        // Unreadable sentences are skipped; no background sentence, no reading.
        let (bg, objects) = read_description(
            "A gray background with two objects. In the top left: a huge red \
                 circle. In the center: a small blue star. In the centre: a small blue star",
        )
        .expect("reads");
        assert_eq!((bg, objects.len()), (Background::Gray, 1));
        assert_eq!(read_description("In the center: a small blue star."), None);
        assert_eq!(read_description(""), None);
        // Not a permutation: reading order.
        for bad in [&[0][..], &[0, 0], &[1, 2], &[]] {
            assert_eq!(
                description_in_order(&scene, bad),
                canonical_description(&scene)
            );
        }
    }

    #[test]
    fn phrasings_are_deterministic_and_varied() {
        let scenes = Sampler::new(SamplerConfig::default(), 3).take(100);
        let mut distinct = HashSet::new();
        for (seed, scene) in scenes.iter().enumerate() {
            let a = phrase(scene, seed as u64);
            assert_eq!(a, phrase(scene, seed as u64));
            distinct.insert(a.text);
        }
        assert_eq!(distinct.len(), 100);
        // One scene, many seeds: many different wordings.
        let texts: HashSet<String> = (0..100).map(|s| phrase(&scenes[0], s).text).collect();
        assert!(texts.len() >= 30, "only {} distinct phrasings", texts.len());
    }

    #[test]
    fn phrasings_pin_the_scene_and_tell_the_truth() {
        let mut relative = 0;
        let mut loose = 0;
        for (seed, scene) in Sampler::new(SamplerConfig::default(), 9)
            .take(500)
            .iter()
            .enumerate()
        {
            let p = phrase(scene, seed as u64);
            let objects = scene.objects();
            // Every object is mentioned once, and each mention pins its cell.
            let mut seen: Vec<usize> = p.mentions.iter().map(|m| m.object).collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..objects.len()).collect::<Vec<_>>(), "{}", p.text);
            for (k, m) in p.mentions.iter().enumerate() {
                let cell = match m.location {
                    Location::Cell(c) => c,
                    Location::Relative { relation, anchor } => {
                        relative += 1;
                        assert!(p.mentions[..k].iter().any(|e| e.object == anchor));
                        relation
                            .pinned_cell(objects[anchor].cell)
                            .expect("pins a cell")
                    }
                };
                assert_eq!(cell, objects[m.object].cell, "{}", p.text);
            }
            for c in &p.claims {
                loose += usize::from(matches!(
                    c.relation,
                    Relation::LeftOf
                        | Relation::RightOf
                        | Relation::Above
                        | Relation::Below
                        | Relation::NextTo
                ));
                assert!(
                    c.relation
                        .holds(objects[c.subject].cell, objects[c.anchor].cell),
                    "{:?} false in: {}",
                    c,
                    p.text
                );
            }
            // Every object's size, colour and shape are named with one of their words.
            let text = p.text.to_lowercase();
            for o in objects {
                let named = |words: &[&str]| words.iter().any(|w| text.contains(w));
                assert!(
                    named(size_words(o.size)) && named(color_words(o.color)),
                    "{text}"
                );
                assert!(named(shape_words(o.shape)), "{text}");
            }
        }
        assert!(
            relative > 50 && loose > 50,
            "relative {relative}, loose {loose}"
        );
    }
}
