//! Products (PNG crops, thumbnails, class maps) larger than one message: split into
//! [`ProductPart`]s on board, joined again on the ground.
//!
//! The parts of a product are queued and sent together, one after another. The ground keeps one
//! product in progress: a part of another product, or the end of the stream, while it is
//! incomplete means a part was lost, and that product (only that one) is counted lost.

use crate::message::{ProductKind, ProductPart, PART_BYTES};
use crate::WireError;

/// The parts of `png`, product number `product` of `frame`: `parts` of up to [`PART_BYTES`]
/// each, built one at a time (no heap).
pub fn split(
    product: u32,
    frame: u32,
    kind: ProductKind,
    class: u16,
    png: &[u8],
) -> Result<impl Iterator<Item = ProductPart> + '_, WireError> {
    let parts = png.len().div_ceil(PART_BYTES).max(1);
    let parts = u16::try_from(parts).map_err(|_| WireError::BufferTooSmall)?;
    Ok((0..parts).map(move |part| {
        let start = usize::from(part) * PART_BYTES;
        let chunk = png
            .get(start..png.len().min(start + PART_BYTES))
            .unwrap_or_default();
        ProductPart {
            product,
            frame,
            kind,
            class,
            part,
            parts,
            data: heapless::Vec::from_slice(chunk).unwrap_or_default(),
        }
    }))
}

/// A product joined on the ground.
#[cfg(any(feature = "std", test))]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Product {
    /// The product's number on its board.
    pub product: u32,
    /// The frame it comes from.
    pub frame: u32,
    /// What it shows.
    pub kind: ProductKind,
    /// For a detection crop, the detection's class.
    pub class: u16,
    /// The PNG.
    pub png: std::vec::Vec<u8>,
}

/// What a [`Reassembler`] made of the parts it was given.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ProductStats {
    /// Products whole.
    pub complete: u64,
    /// Products missing a part.
    pub lost: u64,
    /// Parts that fit no product: duplicates, or parts with impossible indices.
    pub stray_parts: u64,
}

/// Joins product parts on the ground.
#[cfg(any(feature = "std", test))]
#[derive(Clone, Debug, Default)]
pub struct Reassembler {
    current: Option<(ProductPart, std::vec::Vec<Option<std::vec::Vec<u8>>>)>,
    last_complete: Option<u32>,
    /// What it made so far.
    pub stats: ProductStats,
}

#[cfg(any(feature = "std", test))]
impl Reassembler {
    /// Nothing joined yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Take one part; the product it completes, if it does.
    pub fn push(&mut self, part: &ProductPart) -> Option<Product> {
        if part.part >= part.parts || self.last_complete == Some(part.product) {
            self.stats.stray_parts += 1;
            return None;
        }
        let same = matches!(&self.current, Some((first, _)) if first.product == part.product);
        if !same {
            if self.current.take().is_some() {
                self.stats.lost += 1;
            }
            self.current = Some((part.clone(), vec![None; usize::from(part.parts)]));
        }
        let (first, slots) = self.current.as_mut()?;
        match slots.get_mut(usize::from(part.part)) {
            Some(slot @ None) if first.parts == part.parts => *slot = Some(part.data.to_vec()),
            _ => {
                self.stats.stray_parts += 1;
                return None;
            }
        }
        if slots.iter().any(Option::is_none) {
            return None;
        }
        let (first, slots) = self.current.take()?;
        self.stats.complete += 1;
        self.last_complete = Some(first.product);
        Some(Product {
            product: first.product,
            frame: first.frame,
            kind: first.kind,
            class: first.class,
            png: slots.into_iter().flatten().flatten().collect(),
        })
    }

    /// The stream ended: a product still incomplete is lost.
    pub fn finish(&mut self) {
        if self.current.take().is_some() {
            self.stats.lost += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(len: usize) -> std::vec::Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn products_split_and_join_and_a_lost_part_loses_only_its_product() {
        let (a, b, c) = (png(2_500), png(10), png(PART_BYTES));
        let parts = |n, bytes| {
            split(n, 100 + n, ProductKind::DetectionCrop, 3, bytes)
                .unwrap()
                .collect::<std::vec::Vec<_>>()
        };
        let (pa, pb, pc) = (parts(1, &a), parts(2, &b), parts(3, &c));
        assert_eq!((pa.len(), pb.len(), pc.len()), (3, 1, 1));
        assert!(pa
            .iter()
            .all(|p| p.data.len() <= PART_BYTES && p.parts == 3));

        let mut ground = Reassembler::new();
        let whole: std::vec::Vec<Product> = pa
            .iter()
            .chain(&pb)
            .chain(&pc)
            .filter_map(|p| ground.push(p))
            .collect();
        assert_eq!(whole.len(), 3);
        assert_eq!((whole[0].png.clone(), whole[0].frame), (a.clone(), 101));
        assert_eq!(whole[2].png, c);

        // Product 1 loses its middle part; 2 and 3 arrive whole.
        let mut ground = Reassembler::new();
        let kept: std::vec::Vec<u32> = [&pa[0], &pa[2], &pb[0], &pb[0], &pc[0]]
            .into_iter()
            .filter_map(|p| ground.push(p))
            .map(|p| p.product)
            .collect();
        ground.finish();
        assert_eq!(kept, [2, 3]);
        assert_eq!(
            ground.stats,
            ProductStats {
                complete: 2,
                lost: 1,
                stray_parts: 1
            }
        );
        // The stream ends inside a product.
        let mut ground = Reassembler::new();
        assert!(ground.push(&pa[0]).is_none());
        ground.finish();
        assert_eq!(ground.stats.lost, 1);
    }
}
