//! The set of kernels a program's steps run on.

use crate::int16::{Add16, Conv16, Function16, GlobalAveragePool16, Mul16};
use crate::int8::{
    Add, Attention, AveragePool, Conv, Gather, Gemm, GlobalAveragePool, Lut, MaxPool, Mul, Rescale,
    Resize, ShapeError, WideTable,
};

/// The kernels a program's steps run on, one method per op. Every method defaults to the generic
/// kernel (the oracle); faster sets override what they speed up and must give the same bits.
/// `crate::table::KernelTable` (with `std`) is the host's set: generic entries, overwritten by the plug-ins
/// this CPU supports.
pub trait Kernels {
    /// Run `conv`, the layer of step `step`, on `input` into `output`.
    fn conv(
        &mut self,
        step: usize,
        conv: &Conv<'_>,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        let _ = step;
        conv.run(input, output)
    }

    /// Run `conv` on `input` read through `table` (a function the compiler widened) into
    /// `output`. Every set runs the generic kernel: such layers are few.
    fn conv_wide(
        &mut self,
        conv: &Conv<'_>,
        table: &WideTable,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        conv.run_wide(table, input, output)
    }

    /// Run `pool` on `input` read through `table` into `output` (generic in every set).
    fn global_average_pool_wide(
        &mut self,
        pool: &GlobalAveragePool,
        table: &WideTable,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        pool.run_wide(table, input, output)
    }

    /// Run `mul` on `a` and `b`, each read through its table where it has one, into `output`
    /// (generic in every set).
    fn mul_wide(
        &mut self,
        mul: &Mul,
        tables: [Option<&WideTable>; 2],
        a: &[i8],
        b: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        mul.run_wide(tables, a, b, output)
    }

    /// Visit the weights this set prepared at load (packed, transformed), block by block, for
    /// a scrub to checksum: a copy of the plan's weights in memory that the plan's own CRCs do
    /// not cover. A set that prepares nothing visits nothing.
    fn prepared_weights(&self, visit: &mut dyn FnMut(&[i32])) {
        let _ = visit;
    }

    /// Fault injection: flip bit `bit` (modulo their size in bits) of the prepared weights, as
    /// a radiation upset would; whether there were any to flip.
    fn flip_prepared_bit(&mut self, bit: u64) -> bool {
        let _ = bit;
        false
    }

    /// Run `gemm` on `input` into `output`.
    fn gemm(&mut self, gemm: &Gemm<'_>, input: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
        gemm.run(input, output)
    }

    /// Run `add` on `a` and `b` into `output`.
    fn add(&mut self, add: &Add, a: &[i8], b: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
        add.run(a, b, output)
    }

    /// Run `mul` on `a` and `b` into `output`.
    fn mul(&mut self, mul: &Mul, a: &[i8], b: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
        mul.run(a, b, output)
    }

    /// Run `pool` on `input` into `output`.
    fn global_average_pool(
        &mut self,
        pool: &GlobalAveragePool,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        pool.run(input, output)
    }

    /// Run `pool` on `input` into `output`.
    fn max_pool(
        &mut self,
        pool: &MaxPool,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        pool.run(input, output)
    }

    /// Run `pool` on `input` into `output`.
    fn average_pool(
        &mut self,
        pool: &AveragePool,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        pool.run(input, output)
    }

    /// Run `resize` on `input` into `output`.
    fn resize(
        &mut self,
        resize: &Resize,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        resize.run(input, output)
    }

    /// Run `lut` on `input` into `output`.
    fn lut(&mut self, lut: &Lut<'_>, input: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
        lut.run(input, output)
    }

    /// Run `rescale` on `input` into `output` (its part of a Concat's output).
    fn rescale(
        &mut self,
        rescale: &Rescale,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        rescale.run(input, output)
    }

    /// Run `gather` on `input` into `output` (a copy: every set uses the generic one).
    fn gather(
        &mut self,
        gather: &Gather<'_>,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        gather.run(input, output)
    }

    /// Run `attention` with its `exp_table` on `input` into `output`.
    fn attention(
        &mut self,
        attention: &Attention,
        exp_table: &[i32],
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        attention.run(exp_table, input, output)
    }

    /// Run `conv`, a layer with 16-bit activations (the layer of step `step`), on `input` into
    /// `output`.
    fn conv16(
        &mut self,
        step: usize,
        conv: &Conv16<'_>,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        let _ = step;
        conv.run(input, output)
    }

    /// Run `add` on 16-bit `a` and `b` into `output`.
    fn add16(
        &mut self,
        add: &Add16,
        a: &[i8],
        b: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        add.run(a, b, output)
    }

    /// Run `mul` on 16-bit `a` and `b` into `output`.
    fn mul16(
        &mut self,
        mul: &Mul16,
        a: &[i8],
        b: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        mul.run(a, b, output)
    }

    /// Run `pool` on 16-bit `input` into `output`.
    fn global_average_pool16(
        &mut self,
        pool: &GlobalAveragePool16,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        pool.run(input, output)
    }

    /// Run `function` on 16-bit `input` into `output`.
    fn function16(
        &mut self,
        function: &Function16<'_>,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        function.run(input, output)
    }
}

/// Borrowed kernels, so a session can run kernels its caller keeps.
impl<K: Kernels + ?Sized> Kernels for &mut K {
    fn conv(
        &mut self,
        step: usize,
        conv: &Conv<'_>,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        (**self).conv(step, conv, input, output)
    }

    fn gemm(&mut self, gemm: &Gemm<'_>, input: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
        (**self).gemm(gemm, input, output)
    }

    fn conv_wide(
        &mut self,
        conv: &Conv<'_>,
        table: &WideTable,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        (**self).conv_wide(conv, table, input, output)
    }

    fn global_average_pool_wide(
        &mut self,
        pool: &GlobalAveragePool,
        table: &WideTable,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        (**self).global_average_pool_wide(pool, table, input, output)
    }

    fn mul_wide(
        &mut self,
        mul: &Mul,
        tables: [Option<&WideTable>; 2],
        a: &[i8],
        b: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        (**self).mul_wide(mul, tables, a, b, output)
    }

    fn add(&mut self, add: &Add, a: &[i8], b: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
        (**self).add(add, a, b, output)
    }

    fn mul(&mut self, mul: &Mul, a: &[i8], b: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
        (**self).mul(mul, a, b, output)
    }

    fn global_average_pool(
        &mut self,
        pool: &GlobalAveragePool,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        (**self).global_average_pool(pool, input, output)
    }

    fn max_pool(
        &mut self,
        pool: &MaxPool,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        (**self).max_pool(pool, input, output)
    }

    fn average_pool(
        &mut self,
        pool: &AveragePool,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        (**self).average_pool(pool, input, output)
    }

    fn resize(
        &mut self,
        resize: &Resize,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        (**self).resize(resize, input, output)
    }

    fn lut(&mut self, lut: &Lut<'_>, input: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
        (**self).lut(lut, input, output)
    }

    fn rescale(
        &mut self,
        rescale: &Rescale,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        (**self).rescale(rescale, input, output)
    }

    fn gather(
        &mut self,
        gather: &Gather<'_>,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        (**self).gather(gather, input, output)
    }

    fn attention(
        &mut self,
        attention: &Attention,
        exp_table: &[i32],
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        (**self).attention(attention, exp_table, input, output)
    }

    fn conv16(
        &mut self,
        step: usize,
        conv: &Conv16<'_>,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        (**self).conv16(step, conv, input, output)
    }

    fn add16(
        &mut self,
        add: &Add16,
        a: &[i8],
        b: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        (**self).add16(add, a, b, output)
    }

    fn mul16(
        &mut self,
        mul: &Mul16,
        a: &[i8],
        b: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        (**self).mul16(mul, a, b, output)
    }

    fn global_average_pool16(
        &mut self,
        pool: &GlobalAveragePool16,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        (**self).global_average_pool16(pool, input, output)
    }

    fn function16(
        &mut self,
        function: &Function16<'_>,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        (**self).function16(function, input, output)
    }
}

/// The generic kernels: the oracle, and the only choice without `std`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Reference;

impl Kernels for Reference {}
