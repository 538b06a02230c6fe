//! Memory planning: place every tensor of an int8 program in one arena so that tensors alive at
//! the same time never share bytes, and the arena is as small as a greedy plan can make it.

use crate::quantize::QuantizedGraph;

/// Tensor offsets are multiples of this, so SIMD kernels can load them aligned.
pub const ALIGN: usize = 16;

/// Where each tensor lives, by value id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArenaLayout {
    /// Byte offset of each value; `None` for values the program never writes or reads.
    pub offsets: Vec<Option<usize>>,
    /// Bytes the arena needs.
    pub size: usize,
}

/// A tensor's size and the steps between which it must stay intact (inclusive).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetime {
    /// Bytes.
    pub bytes: usize,
    /// Step that writes it (0 for the program input, which exists before step 0 runs).
    pub first: usize,
    /// Last step that reads it (the last step for the program output).
    pub last: usize,
}

/// Lifetimes of every value of `program`; `None` for values no step touches (fused away) and
/// for Concat parts written in place, which live as long as their Concat's output.
pub fn lifetimes(program: &QuantizedGraph) -> Vec<Option<Lifetime>> {
    let mut spans: Vec<Option<Lifetime>> = vec![None; program.sizes.len()];
    let mut touch = |id: usize, step: usize| {
        let id = program.in_place[id].map_or(id, |(concat, _)| concat);
        let bytes = program.sizes[id];
        let span = spans[id].get_or_insert(Lifetime {
            bytes,
            first: step,
            last: step,
        });
        span.first = span.first.min(step);
        span.last = span.last.max(step);
    };
    touch(0, 0);
    for (step, s) in program.steps.iter().enumerate() {
        s.inputs.iter().for_each(|&id| touch(id, step));
        touch(s.output, step);
    }
    touch(program.output, program.steps.len().saturating_sub(1));
    spans
}

/// Greedy placement, largest tensors first, each at the lowest aligned offset that does not
/// overlap a tensor whose lifetime intersects its own.
pub fn plan(spans: &[Option<Lifetime>]) -> ArenaLayout {
    let mut order: Vec<usize> = (0..spans.len()).filter(|&i| spans[i].is_some()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(spans[i].map_or(0, |s| s.bytes)));
    let mut offsets: Vec<Option<usize>> = vec![None; spans.len()];
    let mut placed: Vec<(usize, usize, Lifetime)> = Vec::new();
    for id in order {
        let Some(span) = spans[id] else { continue };
        let mut conflicts: Vec<(usize, usize)> = placed
            .iter()
            .filter(|(_, _, other)| other.first <= span.last && span.first <= other.last)
            .map(|&(start, end, _)| (start, end))
            .collect();
        conflicts.sort_unstable();
        let mut offset = 0;
        for (start, end) in conflicts {
            if offset + span.bytes <= start {
                break;
            }
            offset = offset.max(end.next_multiple_of(ALIGN));
        }
        offsets[id] = Some(offset);
        placed.push((offset, offset + span.bytes, span));
    }
    let size = placed
        .iter()
        .map(|&(_, end, _)| end)
        .max()
        .unwrap_or(0)
        .next_multiple_of(ALIGN);
    ArenaLayout { offsets, size }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(bytes: usize, first: usize, last: usize) -> Option<Lifetime> {
        Some(Lifetime { bytes, first, last })
    }

    /// No two tensors alive at the same step share a byte.
    fn assert_disjoint(spans: &[Option<Lifetime>], layout: &ArenaLayout) {
        for (a, sa) in spans
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.map(|s| (i, s)))
        {
            let oa = layout.offsets[a].unwrap();
            assert!(oa.is_multiple_of(ALIGN) && oa + sa.bytes <= layout.size);
            for (b, sb) in spans
                .iter()
                .enumerate()
                .filter_map(|(i, s)| s.map(|s| (i, s)))
            {
                let ob = layout.offsets[b].unwrap();
                let alive_together = sa.first <= sb.last && sb.first <= sa.last;
                if a != b && alive_together {
                    assert!(
                        oa + sa.bytes <= ob || ob + sb.bytes <= oa,
                        "{a} and {b} overlap"
                    );
                }
            }
        }
    }

    #[test]
    fn a_chain_reuses_memory() {
        // x0 -> x1 -> x2 -> x3: only neighbours are alive together.
        let spans = [
            span(1000, 0, 0),
            span(1000, 0, 1),
            span(1000, 1, 2),
            span(1000, 2, 2),
        ];
        let layout = plan(&spans);
        assert_disjoint(&spans, &layout);
        assert_eq!(layout.size, 2016, "two aligned buffers suffice for a chain");
    }

    #[test]
    fn residuals_keep_their_input_alive() {
        // x0 feeds step 0 and the add at step 2; x1 and x2 are the block's body.
        let spans = [
            span(64, 0, 2),
            span(64, 0, 1),
            span(64, 1, 2),
            span(64, 2, 2),
            None,
        ];
        let layout = plan(&spans);
        assert_disjoint(&spans, &layout);
        assert_eq!(layout.offsets[4], None);
        assert_eq!(layout.size, 3 * 64);
    }

    #[test]
    fn pseudo_random_lifetimes_never_overlap() {
        let mut state = 7u64;
        let mut next = |n: u64| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            (state >> 33) % n
        };
        for _ in 0..200 {
            let spans: Vec<_> = (0..20)
                .map(|_| {
                    let first = next(30) as usize;
                    span(1 + next(5000) as usize, first, first + next(6) as usize)
                })
                .collect();
            let layout = plan(&spans);
            assert_disjoint(&spans, &layout);
            let total: usize = spans
                .iter()
                .flatten()
                .map(|s| s.bytes.next_multiple_of(ALIGN))
                .sum();
            assert!(layout.size <= total);
        }
    }
}
