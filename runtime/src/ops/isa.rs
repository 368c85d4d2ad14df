//! The instruction sets our ops use, and the one knob that caps them together with tract's.
//!
//! Each op picks its code at run time from what the CPU has, minus the features that
//! `TRACT_CPU_ISA` removes: tract-linalg's own knob (`-avx512f,-avx512vnni` edits tract's
//! detected set, read in `tract-linalg/src/isa.rs`), so one setting measures a CPU class on
//! a machine of a higher one, for tract's kernels and ours alike. Only removals (`-name`)
//! matter here; a feature the CPU lacks cannot be added. The f32 products of the gemm
//! engine are the exception: the `gemm` crate picks AVX-512 or FMA by itself, with no knob,
//! so [`kernels_line`] names what it runs.

use std::sync::OnceLock;

/// The features `TRACT_CPU_ISA` removes (`-name` tokens), parsed once per process.
fn removed() -> &'static [String] {
    static REMOVED: OnceLock<Vec<String>> = OnceLock::new();
    REMOVED.get_or_init(|| parse_removed(std::env::var("TRACT_CPU_ISA").ok().as_deref()))
}

/// The `-name` tokens of a `TRACT_CPU_ISA` value (comma-separated `+name`, `-name` or `name`).
fn parse_removed(spec: Option<&str>) -> Vec<String> {
    spec.unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter_map(|t| t.strip_prefix('-'))
        .filter(|t| !t.is_empty())
        .map(str::to_ascii_lowercase)
        .collect()
}

/// Whether `TRACT_CPU_ISA` removes `name` (tract's spelling: `avx512f`, `avx512vnni`,
/// `avxvnni`, `avx2`, `fma`, `dotprod`).
pub fn is_removed(name: &str) -> bool {
    removed().iter().any(|r| r == name)
}

/// AVX-512F: detected and not removed (decided once: the float ops ask per call).
pub fn avx512f() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX512F: OnceLock<bool> = OnceLock::new();
        *AVX512F.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f") && !is_removed("avx512f")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// AVX-512 VNNI (with AVX-512F and BW): detected and none of them removed.
pub fn avx512vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx512f()
            && std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && !is_removed("avx512vnni")
            && !is_removed("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// AVX2: detected and not removed.
pub fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && !is_removed("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// AVX2 with FMA (the float ops' 8-lane path): detected and neither removed.
pub fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx2() && std::arch::is_x86_feature_detected!("fma") && !is_removed("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// AVX-VNNI (the 256-bit VEX form, with AVX2): detected and neither removed.
pub fn avxvnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx2() && std::arch::is_x86_feature_detected!("avxvnni") && !is_removed("avxvnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// aarch64 dot product (`sdot`): detected and not removed (`TRACT_DOTPROD_DISABLE`, tract's
/// older knob for the same, counts as removing it).
pub fn dotprod() -> bool {
    #[cfg(target_arch = "aarch64")]
    {
        let disabled = std::env::var("TRACT_DOTPROD_DISABLE")
            .is_ok_and(|v| matches!(v.trim(), "1" | "true" | "yes" | "on"));
        std::arch::is_aarch64_feature_detected!("dotprod") && !is_removed("dotprod") && !disabled
    }
    #[cfg(not(target_arch = "aarch64"))]
    false
}

/// What the `gemm` crate's f32 products run on this CPU (its own choice; see the module doc).
pub fn gemm_f32() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            "avx512"
        } else if std::arch::is_x86_feature_detected!("fma") {
            "fma (avx2)"
        } else {
            "scalar"
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        "neon"
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    "scalar"
}

/// One line naming the code each part of a frame runs here, printed by `flsl bench` and
/// `flsl-onboard` at start: `kernels: int8 = avx512vnni (ours), f32 products = avx512
/// (ours, ...) and gemm avx512, softmax/GELU/LayerNorm = avx512 (ours), tract = x86_64,...`.
pub fn kernels_line() -> String {
    let float = super::simd::FloatPath::selected().name();
    let capped = if std::env::var("TRACT_CPU_ISA").is_ok_and(|v| !v.trim().is_empty()) {
        " (gemm does not follow TRACT_CPU_ISA)"
    } else {
        ""
    };
    let packed = if super::f32_packed::available() {
        "avx512 (ours, constant weights packed at load) and "
    } else {
        ""
    };
    format!(
        "kernels: int8 = {} (ours, FLSL_INT8_KERNEL), f32 products = {packed}gemm {}{capped}, \
         softmax/GELU/LayerNorm = {float} (ours), tract = {:?} (TRACT_CPU_ISA)",
        super::int8_matmul::Kernel::selected().name(),
        gemm_f32(),
        tract_linalg::isa::native()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_removals_count() {
        assert_eq!(parse_removed(None), Vec::<String>::new());
        assert_eq!(
            parse_removed(Some("-avx512f, +fp16,-AVX512VNNI,avx2,-")),
            vec!["avx512f".to_string(), "avx512vnni".to_string()]
        );
    }

    #[test]
    fn kernels_line_names_every_part() {
        let line = kernels_line();
        for part in ["int8 = ", "f32 products = ", "gemm ", "softmax/GELU/LayerNorm = ", "tract = "]
        {
            assert!(line.contains(part), "{line}");
        }
    }
}
