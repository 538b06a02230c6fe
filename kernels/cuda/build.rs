//! With the `cuda-emulator` feature, compiles the CUDA kernels as C++ for the CPU emulator.
fn main() {
    #[cfg(feature = "cuda-emulator")]
    {
        let dir = "src";
        for file in [
            "emulator.cpp",
            "kestrel.cuh",
            "conv.cu",
            "elementwise.cu",
            "pool.cu",
            "resize.cu",
            "preprocess.cu",
            "decode.cu",
            "attention.cu",
        ] {
            println!("cargo:rerun-if-changed={dir}/{file}");
        }
        cc::Build::new()
            .cpp(true)
            .file(format!("{dir}/emulator.cpp"))
            .include(dir)
            .flag_if_supported("-std=c++17")
            // The kernels' float steps must round as the CPU executor's do: no contraction.
            .flag_if_supported("-ffp-contract=off")
            .opt_level(2)
            .compile("kestrel_cuda_emulator");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
