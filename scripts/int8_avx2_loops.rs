//! Standalone x86 loops behind docs/PERFORMANCE.md "Per CPU class and thread count" (AVX2 only):
//! the throughput of 12 independent `vpmaddwd` + `vpaddd` chains, of 12 FMA chains and of 12
//! AVX-VNNI `vpdpbusd` chains, then the AVX2 int8 tile of `runtime/src/ops/int8_matmul.rs` at
//! ViT-Ti/16 fc2 size (198 x 768 x 192) in three forms: `old` (a broadcast + `vpmovzxbw` per row
//! and column quarter), `A` (activations widened once, as the runtime does), `B` (weights also
//! pre-widened to i16 pairs) and `C` (a whole panel per row; spills). Not part of the workspace:
//!
//!     rustc -O --edition 2021 scripts/int8_avx2_loops.rs -o out/int8_avx2_loops && out/int8_avx2_loops
//!
//! Needs AVX2, FMA and AVX-VNNI.
use std::arch::x86_64::*;
use std::time::Instant;
const NR: usize = 32;
// A: current layout (i8 weights, groups of 4 k per column, 32-col panels), acts widened i16.
#[target_feature(enable = "avx2")]
unsafe fn tile_a<const R: usize>(a: &[i16], kp: usize, r0: usize, b: *const i8, kg: usize, sums: &mut [[i32; NR]; R]) {
    let a0 = a[r0 * kp..].as_ptr();
    for q in 0..4 {
        let mut acc = [[_mm256_setzero_si256(); 2]; R];
        for g in 0..kg {
            let bg = b.add(g * NR * 4 + q * 32);
            let b0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(bg.cast()));
            let b1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(bg.add(16).cast()));
            for (i, acc) in acc.iter_mut().enumerate() {
                let a4 = a0.add(i * kp + g * 4).cast::<i64>().read_unaligned();
                let av = _mm256_set1_epi64x(a4);
                acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(b0, av));
                acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(b1, av));
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            let h = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[0], acc[1]), 0xD8);
            _mm256_storeu_si256(sums[i][q * 8..].as_mut_ptr().cast(), h);
        }
    }
}
#[target_feature(enable = "avx2")]
unsafe fn tile_o<const R: usize>(a: &[u8], kp: usize, r0: usize, b: *const i8, kg: usize, sums: &mut [[i32; NR]; R]) {
    let a0 = a[r0 * kp..].as_ptr();
    for q in 0..4 {
        let mut acc = [[_mm256_setzero_si256(); 2]; R];
        for g in 0..kg {
            let bg = b.add(g * NR * 4 + q * 32);
            let b0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(bg.cast()));
            let b1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(bg.add(16).cast()));
            for (i, acc) in acc.iter_mut().enumerate() {
                let a4 = a0.add(i * kp + g * 4).cast::<i32>().read_unaligned();
                let av = _mm256_cvtepu8_epi16(_mm_set1_epi32(a4));
                acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(b0, av));
                acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(b1, av));
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            let h = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[0], acc[1]), 0xD8);
            _mm256_storeu_si256(sums[i][q * 8..].as_mut_ptr().cast(), h);
        }
    }
}
// B: i16 weights, k-pair layout: panel, pair t, col c (32), j: ((t*32)+c)*2+j. acts i16.
#[target_feature(enable = "avx2")]
unsafe fn tile_b<const R: usize>(a: &[i16], kp: usize, r0: usize, b: *const i16, kt: usize, sums: &mut [[i32; NR]; R]) {
    let a0 = a[r0 * kp..].as_ptr();
    for h in 0..2 {
        let mut acc = [[_mm256_setzero_si256(); 2]; R];
        for t in 0..kt {
            let bt = b.add(t * NR * 2 + h * 32);
            let b0 = _mm256_loadu_si256(bt.cast());
            let b1 = _mm256_loadu_si256(bt.add(16).cast());
            for (i, acc) in acc.iter_mut().enumerate() {
                let a2 = a0.add(i * kp + t * 2).cast::<i32>().read_unaligned();
                let av = _mm256_set1_epi32(a2);
                acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(b0, av));
                acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(b1, av));
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            _mm256_storeu_si256(sums[i][h * 16..].as_mut_ptr().cast(), acc[0]);
            _mm256_storeu_si256(sums[i][h * 16 + 8..].as_mut_ptr().cast(), acc[1]);
        }
    }
}
// C: like B but R=4 x 3 vectors? NR=32 -> use R=3 x 4 vectors (full panel), weights from memory.
#[target_feature(enable = "avx2")]
unsafe fn tile_c<const R: usize>(a: &[i16], kp: usize, r0: usize, b: *const i16, kt: usize, sums: &mut [[i32; NR]; R]) {
    let a0 = a[r0 * kp..].as_ptr();
    let mut acc = [[_mm256_setzero_si256(); 4]; R];
    for t in 0..kt {
        let bt = b.add(t * NR * 2);
        let w = [_mm256_loadu_si256(bt.cast()), _mm256_loadu_si256(bt.add(16).cast()), _mm256_loadu_si256(bt.add(32).cast()), _mm256_loadu_si256(bt.add(48).cast())];
        for (i, acc) in acc.iter_mut().enumerate() {
            let a2 = a0.add(i * kp + t * 2).cast::<i32>().read_unaligned();
            let av = _mm256_set1_epi32(a2);
            for c in 0..4 { acc[c] = _mm256_add_epi32(acc[c], _mm256_madd_epi16(w[c], av)); }
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        for c in 0..4 { _mm256_storeu_si256(sums[i][c * 8..].as_mut_ptr().cast(), acc[c]); }
    }
}
#[target_feature(enable = "avx2,fma")]
unsafe fn madd_loop(n: usize) -> i32 {
    let mut acc = [_mm256_setzero_si256(); 12];
    let b0 = _mm256_set1_epi16(3); let b1 = _mm256_set1_epi16(5);
    let mut a = _mm256_set1_epi16(1);
    for _ in 0..n {
        for i in 0..6 {
            acc[2*i] = _mm256_add_epi32(acc[2*i], _mm256_madd_epi16(b0, a));
            acc[2*i+1] = _mm256_add_epi32(acc[2*i+1], _mm256_madd_epi16(b1, a));
        }
        a = _mm256_add_epi16(a, b0);
    }
    let mut s = _mm256_setzero_si256();
    for x in acc { s = _mm256_add_epi32(s, x); }
    _mm256_extract_epi32(s, 0)
}
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_loop(n: usize) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 12];
    let b0 = _mm256_set1_ps(1.0001); let b1 = _mm256_set1_ps(0.9999);
    let a = _mm256_set1_ps(0.5);
    for _ in 0..n {
        for i in 0..6 {
            acc[2*i] = _mm256_fmadd_ps(b0, a, acc[2*i]);
            acc[2*i+1] = _mm256_fmadd_ps(b1, a, acc[2*i+1]);
        }
    }
    let mut s = _mm256_setzero_ps();
    for x in acc { s = _mm256_add_ps(s, x); }
    _mm256_cvtss_f32(s)
}
#[target_feature(enable = "avx2,avxvnni")]
unsafe fn vnni_loop(n: usize) -> i32 {
    let mut acc = [_mm256_setzero_si256(); 12];
    let b0 = _mm256_set1_epi8(3); let b1 = _mm256_set1_epi8(5);
    let a = _mm256_set1_epi8(1);
    for _ in 0..n {
        for i in 0..6 {
            acc[2*i] = _mm256_dpbusd_avx_epi32(acc[2*i], a, b0);
            acc[2*i+1] = _mm256_dpbusd_avx_epi32(acc[2*i+1], a, b1);
        }
    }
    let mut s = _mm256_setzero_si256();
    for x in acc { s = _mm256_add_epi32(s, x); }
    _mm256_extract_epi32(s, 0)
}
fn main() {
    let n = 100_000_000;
    for _ in 0..2 {
        let t = Instant::now(); let r = unsafe { madd_loop(n) }; let dt = t.elapsed().as_secs_f64();
        println!("madd+add: {:.2} G madd/s -> {:.1} GMAC/s ({r})", 12.0 * n as f64 / dt / 1e9, 12.0 * 16.0 * n as f64 / dt / 1e9);
        let t = Instant::now(); let r = unsafe { fma_loop(n) }; let dt = t.elapsed().as_secs_f64();
        println!("fma: {:.2} G fma/s -> {:.1} GMAC/s ({r})", 12.0 * n as f64 / dt / 1e9, 12.0 * 8.0 * n as f64 / dt / 1e9);
        let t = Instant::now(); let r = unsafe { vnni_loop(n) }; let dt = t.elapsed().as_secs_f64();
        println!("vnni: {:.2} G dp/s -> {:.1} GMAC/s ({r})", 12.0 * n as f64 / dt / 1e9, 12.0 * 32.0 * n as f64 / dt / 1e9);
    }
    kernels();
}

fn kernels() {
    let (m, k, n) = (198usize, 768usize, 192usize);
    let kp = k; let kg = k / 4; let kt = k / 2; let panels = n / NR;
    let a: Vec<i16> = (0..m * kp).map(|i| (i * 7 % 256) as i16).collect();
    let wa: Vec<i8> = (0..panels * kg * NR * 4).map(|i| (i * 13 % 256) as u8 as i8).collect();
    let wb: Vec<i16> = (0..panels * kt * NR * 2).map(|i| ((i * 13 % 256) as u8 as i8) as i16).collect();
    let macs = (m * k * n) as f64;
    for _ in 0..3 {
        let mut sink = 0i64;
        let t = Instant::now();
        for _ in 0..50 { for p in 0..panels { let mut r = 0; while r < m { let mut s = [[0i32; NR]; 6]; unsafe { tile_a::<6>(&a, kp, r, wa.as_ptr().add(p * kg * NR * 4), kg, &mut s) }; sink += s[0][0] as i64; r += 6; } } }
        let da = t.elapsed().as_secs_f64() / 50.0;
        let t = Instant::now();
        for _ in 0..50 { for p in 0..panels { let mut r = 0; while r < m { let mut s = [[0i32; NR]; 6]; unsafe { tile_b::<6>(&a, kp, r, wb.as_ptr().add(p * kt * NR * 2), kt, &mut s) }; sink += s[0][0] as i64; r += 6; } } }
        let db = t.elapsed().as_secs_f64() / 50.0;
        let t = Instant::now();
        for _ in 0..50 { for p in 0..panels { let mut r = 0; while r < m { let mut s = [[0i32; NR]; 3]; unsafe { tile_c::<3>(&a, kp, r, wb.as_ptr().add(p * kt * NR * 2), kt, &mut s) }; sink += s[0][0] as i64; r += 3; } } }
        let dc = t.elapsed().as_secs_f64() / 50.0;
        let a8: Vec<u8> = a.iter().map(|&v| v as u8).collect();
        let t = Instant::now();
        for _ in 0..50 { for p in 0..panels { let mut r = 0; while r < m { let mut s = [[0i32; NR]; 6]; unsafe { tile_o::<6>(&a8, kp, r, wa.as_ptr().add(p * kg * NR * 4), kg, &mut s) }; sink += s[0][0] as i64; r += 6; } } }
        let d_old = t.elapsed().as_secs_f64() / 50.0;
        print!("old {:.1} ", macs / d_old / 1e9);
        println!("A {:.1} GMAC/s  B {:.1}  C {:.1}  ({sink})", macs / da / 1e9, macs / db / 1e9, macs / dc / 1e9);
    }
}
