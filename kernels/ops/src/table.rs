//! The host's kernel table: one entry per op, each the generic kernel until a per-architecture
//! plug-in, after detecting its CPU features, overwrites the entries it speeds up (the shape of
//! tract-linalg's `Ops` and its `plug` functions). Op code never names an architecture: the only
//! `#[cfg]` is the list of plug-ins below.

use std::boxed::Box;
use std::vec::Vec;

use crate::int16::{
    host, Add16, Conv16, Conv16Prepared, Conv16Scratch, Function16, GlobalAveragePool16, Mul16,
};
use crate::int8::{
    Add, Attention, AttentionScratch, AveragePool, Conv, Gemm, GlobalAveragePool, Lut, MaxPool,
    Mul, Rescale, Resize, ShapeError,
};
use crate::strips::flip_bit;
use crate::{Kernels, Reference};

/// Convolution kernels prepared for one program (packed weights, scratch): only their `conv`
/// (called with the step index, the layer, its input and its output) and their prepared
/// weights are used.
pub type ConvKernel = Box<dyn Kernels + Send>;
/// A kernel of op `T` with one input.
pub type UnaryKernel<T> = fn(&T, &[i8], &mut [i8]) -> Result<(), ShapeError>;
/// A kernel of op `T` with two inputs.
pub type BinaryKernel<T> = fn(&T, &[i8], &[i8], &mut [i8]) -> Result<(), ShapeError>;
/// A Gemm kernel (its weights borrow the plan).
pub type GemmKernel = for<'a> fn(&Gemm<'a>, &[i8], &mut [i8]) -> Result<(), ShapeError>;
/// A table-activation kernel (its table borrows the plan).
pub type LutKernel = for<'a> fn(&Lut<'a>, &[i8], &mut [i8]) -> Result<(), ShapeError>;

/// A table entry: the kernel and the name reports give it.
pub struct Entry<K> {
    /// Who provides it: `"generic"`, `"avx2"`, `"neon"`, ...
    pub name: &'static str,
    /// The kernel.
    pub kernel: K,
}

/// Called in order on the generic table; each overwrites what its CPU runs faster.
type PlugIn = fn(&mut KernelTable, &[Option<Conv<'_>>]);

const PLUG_INS: &[PlugIn] = &[
    #[cfg(target_arch = "x86_64")]
    crate::avx2::plug,
    #[cfg(target_arch = "aarch64")]
    crate::neon::plug,
];

/// One kernel per op for one program.
pub struct KernelTable {
    /// Conv (and depthwise, grouped, dilated).
    pub conv: Entry<ConvKernel>,
    /// Gemm.
    pub gemm: Entry<GemmKernel>,
    /// Add.
    pub add: Entry<BinaryKernel<Add>>,
    /// Mul.
    pub mul: Entry<BinaryKernel<Mul>>,
    /// GlobalAveragePool.
    pub global_average_pool: Entry<UnaryKernel<GlobalAveragePool>>,
    /// MaxPool.
    pub max_pool: Entry<UnaryKernel<MaxPool>>,
    /// AveragePool.
    pub average_pool: Entry<UnaryKernel<AveragePool>>,
    /// Resize.
    pub resize: Entry<UnaryKernel<Resize>>,
    /// Table activations.
    pub lut: Entry<LutKernel>,
    /// Concat parts.
    pub rescale: Entry<UnaryKernel<Rescale>>,
    /// Attention runs [`Attention::run_rows`] on every CPU (no plug-in replaces it, so it is
    /// not among [`KernelTable::names`]), with these buffers.
    attention_scratch: AttentionScratch,
    conv16_scratch: Conv16Scratch,
    /// Per step, what its 16-bit convolution's kernel prepared at setup (none: per call).
    conv16_prepared: Vec<Option<Conv16Prepared>>,
    /// Whether 16-bit layers run the host's kernels ([`Conv16::run_rows`], [`host`]) rather
    /// than the generic ones.
    fast16: bool,
}

impl Entry<ConvKernel> {
    /// The convolutions of a kernel set (a plug-in's, prepared for one program), named `name`.
    pub fn conv_of(name: &'static str, kernels: impl Kernels + Send + 'static) -> Self {
        Self {
            name,
            kernel: Box::new(kernels),
        }
    }
}

fn generic<K>(kernel: K) -> Entry<K> {
    Entry {
        name: "generic",
        kernel,
    }
}

impl KernelTable {
    /// The generic kernels for every op: the reference the others are checked against.
    pub fn generic() -> Self {
        Self {
            conv: Entry::conv_of("generic", Reference),
            gemm: generic(|gemm, input, output| gemm.run(input, output)),
            add: generic(Add::run),
            mul: generic(Mul::run),
            global_average_pool: generic(GlobalAveragePool::run),
            max_pool: generic(MaxPool::run),
            average_pool: generic(AveragePool::run),
            resize: generic(Resize::run),
            lut: generic(|lut, input, output| lut.run(input, output)),
            rescale: generic(Rescale::run),
            attention_scratch: AttentionScratch::default(),
            conv16_scratch: Conv16Scratch::default(),
            conv16_prepared: Vec::new(),
            fast16: false,
        }
    }

    /// The generic table with every plug-in this build has applied: the fastest kernels this
    /// CPU runs for a program whose step `i` is the convolution `convs[i]` or the 16-bit one
    /// `convs16[i]` (or neither), their weights prepared for them.
    pub fn for_this_cpu(convs: &[Option<Conv<'_>>], convs16: &[Option<Conv16<'_>>]) -> Self {
        let mut table = Self::generic();
        for plug in PLUG_INS {
            plug(&mut table, convs);
        }
        table.fast16 = true;
        table.conv16_prepared = convs16
            .iter()
            .map(|conv| conv.as_ref().map(Conv16::prepare))
            .collect();
        // Size the 16-bit convolutions' scratch now, by a run of each on zeros (its buffers
        // only grow, to sizes set by the geometry), so that no inference allocates.
        for (step, conv) in convs16.iter().enumerate() {
            if let Some(conv) = conv {
                let (g, bytes) = (&conv.geometry, conv.output.width.bytes());
                let input =
                    std::vec![0; g.input.iter().product::<usize>() * conv.input_width.bytes()];
                let mut output = std::vec![0; g.output.iter().product::<usize>() * bytes];
                // A geometry the layer refuses fails again, and is reported, when it runs.
                let _ = table.conv16(step, conv, &input, &mut output);
            }
        }
        table
    }

    /// Each op's entry name, in the table's order.
    pub fn names(&self) -> Vec<(&'static str, &'static str)> {
        std::vec![
            ("conv", self.conv.name),
            ("gemm", self.gemm.name),
            ("add", self.add.name),
            ("mul", self.mul.name),
            ("global_average_pool", self.global_average_pool.name),
            ("max_pool", self.max_pool.name),
            ("average_pool", self.average_pool.name),
            ("resize", self.resize.name),
            ("lut", self.lut.name),
            ("rescale", self.rescale.name),
            (
                "conv16",
                match self.fast16 {
                    true => self.conv16_scratch.kernel_name(),
                    false => "generic",
                }
            ),
            (
                "elementwise16",
                match self.fast16 {
                    true => host::name(),
                    false => "generic",
                }
            ),
        ]
    }
}

impl Kernels for KernelTable {
    fn attention(
        &mut self,
        attention: &Attention,
        exp_table: &[i32],
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        attention.run_rows(exp_table, input, output, &mut self.attention_scratch)
    }

    fn conv(
        &mut self,
        step: usize,
        conv: &Conv<'_>,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        self.conv.kernel.conv(step, conv, input, output)
    }

    /// A table for this CPU runs 16-bit layers by rows ([`Conv16::run_rows`]: AVX2 kernels
    /// where the CPU has AVX2, portable loops the compiler vectorises elsewhere), with what was
    /// prepared for the step at setup; the generic table the generic kernel.
    fn conv16(
        &mut self,
        step: usize,
        conv: &Conv16<'_>,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        if !self.fast16 {
            return conv.run(input, output);
        }
        let prepared = self.conv16_prepared.get(step).and_then(Option::as_ref);
        conv.run_rows(input, output, &mut self.conv16_scratch, prepared)
    }

    fn add16(
        &mut self,
        add: &Add16,
        a: &[i8],
        b: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        match self.fast16 {
            true => host::add16(add, a, b, output),
            false => add.run(a, b, output),
        }
    }

    fn mul16(
        &mut self,
        mul: &Mul16,
        a: &[i8],
        b: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        match self.fast16 {
            true => host::mul16(mul, a, b, output),
            false => mul.run(a, b, output),
        }
    }

    fn global_average_pool16(
        &mut self,
        pool: &GlobalAveragePool16,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        match self.fast16 {
            true => host::global_average_pool16(pool, input, output),
            false => pool.run(input, output),
        }
    }

    fn function16(
        &mut self,
        function: &Function16<'_>,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        match self.fast16 {
            true => host::function16(function, input, output),
            false => function.run(input, output),
        }
    }

    fn prepared_weights(&self, visit: &mut dyn FnMut(&[i32])) {
        self.conv.kernel.prepared_weights(visit);
        for prepared in self.conv16_prepared.iter().flatten() {
            for block in prepared.blocks() {
                visit(block);
            }
        }
    }

    fn flip_prepared_bit(&mut self, bit: u64) -> bool {
        // The convolutions' own first, then the 16-bit layers', as `prepared_weights` visits.
        let mut conv_bits = 0;
        self.conv
            .kernel
            .prepared_weights(&mut |block| conv_bits += block.len() as u64 * 32);
        if bit < conv_bits {
            return self.conv.kernel.flip_prepared_bit(bit);
        }
        let blocks = self.conv16_prepared.iter_mut().flatten();
        flip_bit(
            blocks.flat_map(Conv16Prepared::blocks_mut).collect(),
            bit - conv_bits,
        )
    }

    fn gemm(&mut self, gemm: &Gemm<'_>, input: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
        (self.gemm.kernel)(gemm, input, output)
    }

    fn add(&mut self, add: &Add, a: &[i8], b: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
        (self.add.kernel)(add, a, b, output)
    }

    fn mul(&mut self, mul: &Mul, a: &[i8], b: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
        (self.mul.kernel)(mul, a, b, output)
    }

    fn global_average_pool(
        &mut self,
        pool: &GlobalAveragePool,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        (self.global_average_pool.kernel)(pool, input, output)
    }

    fn max_pool(
        &mut self,
        pool: &MaxPool,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        (self.max_pool.kernel)(pool, input, output)
    }

    fn average_pool(
        &mut self,
        pool: &AveragePool,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        (self.average_pool.kernel)(pool, input, output)
    }

    fn resize(
        &mut self,
        resize: &Resize,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        (self.resize.kernel)(resize, input, output)
    }

    fn lut(&mut self, lut: &Lut<'_>, input: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
        (self.lut.kernel)(lut, input, output)
    }

    fn rescale(
        &mut self,
        rescale: &Rescale,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        (self.rescale.kernel)(rescale, input, output)
    }
}
