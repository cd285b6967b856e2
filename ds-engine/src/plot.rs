//! A loss-curve PNG: loss against step with axes, tick marks and numeric tick labels (a 3x5
//! pixel font), encoded by hand (zlib stored blocks, CRC-32 chunks), with no image library.

use std::path::Path;

use crate::EngineError;

const W: usize = 640;
const H: usize = 400;
const LEFT: usize = 70;
const RIGHT: usize = 20;
const TOP: usize = 20;
const BOTTOM: usize = 40;

/// 3x5 glyphs (rows top to bottom, 3 bits each, MSB = left) for `0-9 . -`.
fn glyph(c: char) -> Option<[u8; 5]> {
    Some(match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        _ => return None,
    })
}

struct Canvas {
    px: Vec<[u8; 3]>,
}

impl Canvas {
    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if (0..W as i64).contains(&x) && (0..H as i64).contains(&y) {
            self.px[y as usize * W + x as usize] = c;
        }
    }

    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3]) {
        // Bresenham.
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.set(x, y, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Text at 2x scale with its top-left corner at (x, y).
    fn text(&mut self, x: i64, y: i64, s: &str) {
        for (i, ch) in s.chars().enumerate() {
            let Some(g) = glyph(ch) else { continue };
            for (r, bits) in g.iter().enumerate() {
                for col in 0..3 {
                    if bits >> (2 - col) & 1 == 1 {
                        for (ox, oy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                            self.set(
                                x + i as i64 * 8 + col * 2 + ox,
                                y + r as i64 * 2 + oy,
                                [0; 3],
                            );
                        }
                    }
                }
            }
        }
    }
}

fn text_width(s: &str) -> i64 {
    s.chars().count() as i64 * 8
}

/// Renders `values` (one per step, `first_step` the step of `values[0]`) as an RGB image:
/// returns (width, height, row-major RGB pixels).
pub fn render(values: &[f64], first_step: u64) -> (usize, usize, Vec<u8>) {
    let mut cv = Canvas {
        px: vec![[255; 3]; W * H],
    };
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    let (mut lo, mut hi) = finite
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        (lo, hi) = (lo - 0.5, hi + 0.5);
    }
    let (x0, x1) = (LEFT as i64, (W - RIGHT) as i64);
    let (y0, y1) = (TOP as i64, (H - BOTTOM) as i64); // y0 top, y1 bottom
    let n = values.len().max(2);
    let px_x = |i: usize| x0 + ((x1 - x0) as f64 * i as f64 / (n - 1) as f64).round() as i64;
    let px_y = |v: f64| y1 - ((y1 - y0) as f64 * (v - lo) / (hi - lo)).round() as i64;
    // Axes, ticks and labels.
    let black = [0; 3];
    cv.line((x0, y0), (x0, y1), black);
    cv.line((x0, y1), (x1, y1), black);
    for k in 0..=4 {
        let v = lo + (hi - lo) * k as f64 / 4.0;
        let y = px_y(v);
        cv.line((x0 - 5, y), (x0, y), black);
        if k > 0 {
            for x in (x0 + 1..x1).step_by(4) {
                cv.set(x, y, [220; 3]);
            }
        }
        let s = format!("{v:.3}");
        cv.text(x0 - 8 - text_width(&s), y - 5, &s);
        let i = ((n - 1) as f64 * k as f64 / 4.0).round() as usize;
        let x = px_x(i);
        cv.line((x, y1), (x, y1 + 5), black);
        let s = format!("{}", first_step + i as u64);
        cv.text(x - text_width(&s) / 2, y1 + 10, &s);
    }
    // The curve.
    let blue = [31, 119, 180];
    let mut prev: Option<(i64, i64)> = None;
    for (i, &v) in values.iter().enumerate() {
        if !v.is_finite() {
            prev = None;
            continue;
        }
        let p = (px_x(i), px_y(v));
        match prev {
            Some(q) => cv.line(q, p, blue),
            None => cv.set(p.0, p.1, blue),
        }
        prev = Some(p);
    }
    (W, H, cv.px.into_iter().flatten().collect())
}

fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for chunk in data.chunks(5552) {
        for &x in chunk {
            a += u32::from(x);
            b += a;
        }
        a %= 65521;
        b %= 65521;
    }
    (b << 16) | a
}

/// A zlib stream of stored (uncompressed) deflate blocks.
fn zlib_stored(data: &[u8]) -> Vec<u8> {
    let mut z = vec![0x78, 0x01];
    let mut chunks = data.chunks(65535).peekable();
    if chunks.peek().is_none() {
        z.extend_from_slice(&[1, 0, 0, 0xFF, 0xFF]);
    }
    while let Some(c) = chunks.next() {
        z.push(u8::from(chunks.peek().is_none())); // BFINAL, BTYPE=00
        let len = c.len() as u16;
        z.extend_from_slice(&len.to_le_bytes());
        z.extend_from_slice(&(!len).to_le_bytes());
        z.extend_from_slice(c);
    }
    z.extend_from_slice(&adler32(data).to_be_bytes());
    z
}

/// Encodes an 8-bit RGB image as PNG.
pub fn encode_png(width: usize, height: usize, rgb: &[u8]) -> Vec<u8> {
    let mut raw = Vec::with_capacity((width * 3 + 1) * height);
    for row in rgb.chunks(width * 3) {
        raw.push(0); // filter: none
        raw.extend_from_slice(row);
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8; 4], data: &[u8]| {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut h = crc32fast::Hasher::new();
        h.update(kind);
        h.update(data);
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        out.extend_from_slice(&h.finalize().to_be_bytes());
    };
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&(width as u32).to_be_bytes());
    ihdr.extend_from_slice(&(height as u32).to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit, RGB, deflate, adaptive, no interlace
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &zlib_stored(&raw));
    chunk(b"IEND", &[]);
    out
}

/// Writes the loss curve of `losses` (step `first_step + i` for `losses[i]`) to `path`.
pub fn write_loss_curve(path: &Path, losses: &[f64], first_step: u64) -> Result<(), EngineError> {
    let (w, h, rgb) = render(losses, first_step);
    std::fs::write(path, encode_png(w, h, &rgb)).map_err(|e| {
        EngineError::Data(format!(
            "cannot write the loss curve {}: {e}",
            path.display()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adler32_reference_value() {
        // Wikipedia's worked example.
        assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
    }

    #[test]
    fn png_structure_and_pixels() {
        let losses: Vec<f64> = (0..50).map(|i| 5.0 * (-(i as f64) / 20.0).exp()).collect();
        let (w, h, rgb) = render(&losses, 1);
        let png = encode_png(w, h, &rgb);
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        // Walk the chunks, checking every CRC with an independent bitwise CRC-32.
        let crc = |d: &[u8]| {
            let mut c = !0u32;
            for &b in d {
                c ^= u32::from(b);
                for _ in 0..8 {
                    c = if c & 1 != 0 {
                        (c >> 1) ^ 0xEDB8_8320
                    } else {
                        c >> 1
                    };
                }
            }
            !c
        };
        let mut pos = 8;
        let mut kinds = Vec::new();
        let mut idat = Vec::new();
        while pos < png.len() {
            let len = u32::from_be_bytes(png[pos..pos + 4].try_into().unwrap()) as usize;
            let kind = &png[pos + 4..pos + 8];
            let body = &png[pos + 8..pos + 8 + len];
            let want = u32::from_be_bytes(png[pos + 8 + len..pos + 12 + len].try_into().unwrap());
            assert_eq!(crc(&png[pos + 4..pos + 8 + len]), want);
            kinds.push(String::from_utf8_lossy(kind).to_string());
            if kind == b"IDAT" {
                idat.extend_from_slice(body);
            }
            pos += 12 + len;
        }
        assert_eq!(kinds, ["IHDR", "IDAT", "IEND"]);
        // Inflate the stored blocks by hand and compare with the pixels.
        let mut raw = Vec::new();
        let mut p = 2;
        loop {
            let last = idat[p] & 1 == 1;
            let len = u16::from_le_bytes([idat[p + 1], idat[p + 2]]) as usize;
            assert_eq!(!len as u16, u16::from_le_bytes([idat[p + 3], idat[p + 4]]));
            raw.extend_from_slice(&idat[p + 5..p + 5 + len]);
            p += 5 + len;
            if last {
                break;
            }
        }
        assert_eq!(raw.len(), (w * 3 + 1) * h);
        assert_eq!(&raw[1..w * 3 + 1], &rgb[..w * 3]);
        // The first point (highest loss) is at the top-left of the plot area, the last at
        // the bottom-right, in the curve's colour.
        let at = |x: usize, y: usize| &rgb[(y * w + x) * 3..(y * w + x) * 3 + 3];
        assert_eq!(at(LEFT, TOP), [31, 119, 180]);
        assert_eq!(at(W - RIGHT, H - BOTTOM), [31, 119, 180]);
        // The axes are black.
        assert_eq!(at(LEFT, (TOP + H - BOTTOM) / 2), [0, 0, 0]);
    }
}
