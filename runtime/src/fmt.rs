//! The one logging shim: `defmt` on targets (feature `defmt`), `log` on hosts (feature `log`),
//! nothing at all without either, so flight code logs the same way everywhere. Arguments must
//! be plain values (integers, `&str`) that both `defmt::Format` and `Display` cover.
#![macro_use]

#[cfg(all(feature = "defmt", feature = "log"))]
compile_error!("features `defmt` and `log` are exclusive: defmt on targets, log on hosts");

/// A condition worth an operator's attention that the runtime handled.
macro_rules! warn {
    ($s:literal $(, $x:expr)* $(,)?) => {{
        #[cfg(feature = "defmt")]
        ::defmt::warn!($s $(, $x)*);
        #[cfg(feature = "log")]
        ::log::warn!($s $(, $x)*);
        #[cfg(not(any(feature = "defmt", feature = "log")))]
        let _ = ($(&$x),*);
    }};
}

/// A failure the runtime contained (a frame lost to it, counted).
#[cfg_attr(not(feature = "std"), allow(unused_macros))]
macro_rules! error {
    ($s:literal $(, $x:expr)* $(,)?) => {{
        #[cfg(feature = "defmt")]
        ::defmt::error!($s $(, $x)*);
        #[cfg(feature = "log")]
        ::log::error!($s $(, $x)*);
        #[cfg(not(any(feature = "defmt", feature = "log")))]
        let _ = ($(&$x),*);
    }};
}
