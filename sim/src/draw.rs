//! Drawing detections onto an image: class-coloured rectangles with a label and score, in a
//! 3x5 pixel capital font (no font files to ship).

use image::{Rgb, RgbImage};
use kestrel_runtime::detect::Detection;

/// Distinct colours by class index (cycled past 12 classes), shared by class maps and boxes.
const PALETTE: [[u8; 3]; 12] = [
    [230, 200, 40],  // yellow
    [20, 110, 40],   // dark green
    [140, 210, 90],  // light green
    [128, 128, 128], // grey
    [150, 60, 170],  // purple
    [200, 240, 60],  // lime
    [240, 140, 30],  // orange
    [220, 40, 40],   // red
    [40, 120, 230],  // blue
    [20, 40, 120],   // navy
    [40, 220, 220],  // cyan
    [240, 120, 200], // pink
];

pub fn colour(class: u16) -> [u8; 3] {
    PALETTE[usize::from(class) % PALETTE.len()]
}

/// `label=#rrggbb` for every class, for printing beside a picture.
pub fn legend(labels: &[String]) -> String {
    labels
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let [r, g, b] = colour(i as u16);
            format!("{l}=#{r:02x}{g:02x}{b:02x}")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Rows of a 3x5 glyph, top first, the left column in bit 2. Unknown characters are blank.
fn glyph(c: char) -> [u8; 5] {
    match c.to_ascii_uppercase() {
        'A' => [0b010, 0b101, 0b111, 0b101, 0b101],
        'B' => [0b110, 0b101, 0b110, 0b101, 0b110],
        'C' => [0b011, 0b100, 0b100, 0b100, 0b011],
        'D' => [0b110, 0b101, 0b101, 0b101, 0b110],
        'E' => [0b111, 0b100, 0b110, 0b100, 0b111],
        'F' => [0b111, 0b100, 0b110, 0b100, 0b100],
        'G' => [0b011, 0b100, 0b101, 0b101, 0b011],
        'H' => [0b101, 0b101, 0b111, 0b101, 0b101],
        'I' => [0b111, 0b010, 0b010, 0b010, 0b111],
        'J' => [0b001, 0b001, 0b001, 0b101, 0b010],
        'K' => [0b101, 0b101, 0b110, 0b101, 0b101],
        'L' => [0b100, 0b100, 0b100, 0b100, 0b111],
        'M' => [0b101, 0b111, 0b111, 0b101, 0b101],
        'N' => [0b110, 0b101, 0b101, 0b101, 0b101],
        'O' => [0b010, 0b101, 0b101, 0b101, 0b010],
        'P' => [0b110, 0b101, 0b110, 0b100, 0b100],
        'Q' => [0b010, 0b101, 0b101, 0b110, 0b011],
        'R' => [0b110, 0b101, 0b110, 0b101, 0b101],
        'S' => [0b011, 0b100, 0b010, 0b001, 0b110],
        'T' => [0b111, 0b010, 0b010, 0b010, 0b010],
        'U' => [0b101, 0b101, 0b101, 0b101, 0b111],
        'V' => [0b101, 0b101, 0b101, 0b101, 0b010],
        'W' => [0b101, 0b101, 0b111, 0b111, 0b101],
        'X' => [0b101, 0b101, 0b010, 0b101, 0b101],
        'Y' => [0b101, 0b101, 0b010, 0b010, 0b010],
        'Z' => [0b111, 0b001, 0b010, 0b100, 0b111],
        '0' => [0b111, 0b101, 0b101, 0b101, 0b111],
        '1' => [0b010, 0b110, 0b010, 0b010, 0b111],
        '2' => [0b110, 0b001, 0b010, 0b100, 0b111],
        '3' => [0b110, 0b001, 0b010, 0b001, 0b110],
        '4' => [0b101, 0b101, 0b111, 0b001, 0b001],
        '5' => [0b111, 0b100, 0b110, 0b001, 0b110],
        '6' => [0b011, 0b100, 0b111, 0b101, 0b111],
        '7' => [0b111, 0b001, 0b010, 0b010, 0b010],
        '8' => [0b111, 0b101, 0b111, 0b101, 0b111],
        '9' => [0b111, 0b101, 0b111, 0b001, 0b110],
        '.' => [0, 0, 0, 0, 0b010],
        '-' => [0, 0, 0b111, 0, 0],
        '%' => [0b101, 0b001, 0b010, 0b100, 0b101],
        _ => [0; 5],
    }
}

/// Pixels per font pixel.
const FONT_SCALE: u32 = 2;
/// Font cell including one column and one row of spacing, in image pixels.
const CHAR_WIDTH: u32 = 4 * FONT_SCALE;
const CHAR_HEIGHT: u32 = 6 * FONT_SCALE;

fn put(image: &mut RgbImage, x: i64, y: i64, colour: [u8; 3]) {
    if x >= 0 && y >= 0 && x < i64::from(image.width()) && y < i64::from(image.height()) {
        image.put_pixel(x as u32, y as u32, Rgb(colour));
    }
}

/// Black, or white on a dark `background` (navy, purple), for text that stays readable.
fn ink(background: [u8; 3]) -> [u8; 3] {
    let [r, g, b] = background.map(u32::from);
    if 299 * r + 587 * g + 114 * b < 128_000 {
        [255, 255, 255]
    } else {
        [0, 0, 0]
    }
}

/// Width in pixels of `text` as [`text`] draws it, its background included.
fn text_width(text: &str) -> i64 {
    i64::from(CHAR_WIDTH) * text.chars().count() as i64 + i64::from(FONT_SCALE)
}

/// Height in pixels of a line of [`text`], its background included.
const LINE_HEIGHT: u32 = CHAR_HEIGHT + FONT_SCALE;

/// `text` in `colour` on a filled `background`, its top-left corner at (x, y), clipped to
/// the image.
fn text(image: &mut RgbImage, x: i64, y: i64, text: &str, colour: [u8; 3], background: [u8; 3]) {
    let width = text_width(text);
    for dy in 0..i64::from(LINE_HEIGHT) {
        for dx in 0..width {
            put(image, x + dx, y + dy, background);
        }
    }
    for (i, c) in text.chars().enumerate() {
        let left = x + i64::from(FONT_SCALE) + i as i64 * i64::from(CHAR_WIDTH);
        for (row, bits) in glyph(c).iter().enumerate() {
            for column in 0..3 {
                if bits & (0b100 >> column) == 0 {
                    continue;
                }
                for sy in 0..i64::from(FONT_SCALE) {
                    for sx in 0..i64::from(FONT_SCALE) {
                        let px = left + column * i64::from(FONT_SCALE) + sx;
                        let py = y + i64::from(FONT_SCALE) * (row as i64 + 1) + sy;
                        put(image, px, py, colour);
                    }
                }
            }
        }
    }
}

/// `image` with a legend panel below it: a line per entry, `LABEL NN% OF TILES` on the class
/// colour, in the order given. The image's own rows stay as they are above the panel,
/// so a class map still lines up pixel for pixel with its image.
pub fn with_legend(image: &RgbImage, entries: &[(u16, &str, f64)]) -> RgbImage {
    let margin = FONT_SCALE;
    let lines: Vec<(u16, String)> = entries
        .iter()
        .map(|&(class, label, share)| (class, format!("{label} {:.0}% of tiles", 100.0 * share)))
        .collect();
    let widest = lines.iter().map(|(_, l)| text_width(l)).max().unwrap_or(0);
    let width = image.width().max(widest as u32 + 2 * margin);
    let height = image.height() + margin + lines.len() as u32 * (LINE_HEIGHT + margin);
    let mut out = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    image::imageops::replace(&mut out, image, 0, 0);
    for (i, (class, line)) in lines.iter().enumerate() {
        let y = image.height() + margin + i as u32 * (LINE_HEIGHT + margin);
        let background = colour(*class);
        text(
            &mut out,
            i64::from(margin),
            i64::from(y),
            line,
            ink(background),
            background,
        );
    }
    out
}

/// Each detection as a two-pixel rectangle in its class colour, labelled `name 0.93` above
/// its top-left corner (inside the box when there is no room above; moved left where it would
/// run past the image's right edge).
pub fn detections(image: &mut RgbImage, found: &[Detection], labels: &[String]) {
    for d in found {
        let c = colour(d.class);
        let (x1, y1) = (d.x.round() as i64, d.y.round() as i64);
        let (x2, y2) = ((d.x + d.w).round() as i64, (d.y + d.h).round() as i64);
        for t in 0..2 {
            for x in x1..=x2 {
                put(image, x, y1 + t, c);
                put(image, x, y2 - t, c);
            }
            for y in y1..=y2 {
                put(image, x1 + t, y, c);
                put(image, x2 - t, y, c);
            }
        }
        let name = labels.get(usize::from(d.class)).map_or("?", String::as_str);
        let label = format!("{name} {:.2}", d.score);
        let height = i64::from(CHAR_HEIGHT + FONT_SCALE);
        let top = if y1 >= height { y1 - height } else { y1 + 2 };
        let left = x1.min(i64::from(image.width()) - text_width(&label)).max(0);
        text(image, left, top, &label, ink(c), c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxes_and_labels_land_where_the_detection_is() {
        let mut image = RgbImage::new(64, 64);
        let found = [Detection {
            x: 10.0,
            y: 30.0,
            w: 20.0,
            h: 20.0,
            score: 0.5,
            class: 7,
        }];
        detections(&mut image, &found, &vec!["a".to_string(); 8]);
        let red = Rgb(colour(7));
        // The rectangle's corners and edges, two pixels thick.
        for (x, y) in [(10, 30), (30, 50), (11, 40), (29, 40), (20, 31), (20, 49)] {
            assert_eq!(*image.get_pixel(x, y), red, "({x}, {y})");
        }
        // Inside the box stays untouched.
        assert_eq!(*image.get_pixel(20, 40), Rgb([0, 0, 0]));
        // The label sits above the box on a red background with white text (red is dark).
        let label_pixels: Vec<_> = (16..30)
            .flat_map(|y| (10..60).map(move |x| (x, y)))
            .map(|(x, y)| *image.get_pixel(x, y))
            .collect();
        assert!(label_pixels.contains(&red));
        assert!(label_pixels.contains(&Rgb([255, 255, 255])));
        // A box running off the image is clipped, not a panic.
        let off = [Detection {
            x: -20.0,
            y: 60.0,
            w: 100.0,
            h: 100.0,
            score: 1.0,
            class: 0,
        }];
        detections(&mut image, &off, &["a".into()]);
    }

    /// A box at the right edge keeps its whole label inside the image: it ends at the edge.
    #[test]
    fn labels_at_the_right_edge_are_moved_in_not_cut() {
        let mut image = RgbImage::new(200, 64);
        let found = [Detection {
            x: 190.0,
            y: 30.0,
            w: 9.0,
            h: 9.0,
            score: 0.5,
            class: 7,
        }];
        detections(&mut image, &found, &vec!["airplane".to_string(); 8]);
        let width = text_width("airplane 0.50");
        let red = Rgb(colour(7));
        // The label's background runs from 200 - width to the last column, above the box.
        let row = (30 - i64::from(LINE_HEIGHT)) as u32;
        for x in [200 - width, 199] {
            assert_eq!(*image.get_pixel(x as u32, row), red, "x {x}");
        }
        assert_eq!(*image.get_pixel((199 - width) as u32, row), Rgb([0, 0, 0]));
    }

    /// The legend goes below the picture, which stays as it was, one coloured line per class.
    #[test]
    fn the_legend_is_a_panel_below_the_picture() {
        let picture = RgbImage::from_pixel(40, 30, Rgb([9, 9, 9]));
        let framed = with_legend(&picture, &[(1, "Forest", 0.75), (8, "SeaLake", 0.25)]);
        assert!(framed.width() >= text_width("Forest 75% of tiles") as u32);
        assert!(framed.height() >= 30 + 2 * LINE_HEIGHT);
        assert!((0..30).all(|y| (0..40).all(|x| *framed.get_pixel(x, y) == Rgb([9, 9, 9]))));
        for (line, class) in [(0, 1), (1, 8)] {
            let y = 30 + FONT_SCALE + line * (LINE_HEIGHT + FONT_SCALE);
            let pixels: Vec<_> = (0..framed.width())
                .map(|x| *framed.get_pixel(x, y + 1))
                .collect();
            assert!(pixels.contains(&Rgb(colour(class))), "line {line}");
        }
    }

    #[test]
    fn every_label_character_has_a_glyph() {
        for c in "airplane ship storage_tank vehicle 0123456789.".chars() {
            if c != ' ' && c != '_' {
                assert_ne!(glyph(c), [0; 5], "{c}");
            }
        }
    }
}
