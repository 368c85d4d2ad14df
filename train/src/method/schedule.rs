//! Training schedules, exactly as the reference's `utils.cosine_scheduler` and
//! `utils.temp_scheduler` compute them (float64, numpy `linspace` semantics).

/// numpy's `linspace(start, stop, num)` with the endpoint: `start + i*step`, last = `stop`.
pub fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> =
        (0..num).map(|i| if step == 0.0 { start } else { i as f64 * step + start }).collect();
    v[num - 1] = stop;
    v
}

/// `cosine_scheduler(base, final, epochs, niter_per_ep, warmup_epochs, start_warmup_value)`:
/// `linspace(start_warmup, base, W)` for `W = warmup_epochs * niter` iterations, then
/// `final + 0.5 (base - final)(1 + cos(pi i / L))` for `i < L`; `final` is never reached.
pub fn cosine_scheduler(
    base: f64,
    final_value: f64,
    epochs: usize,
    niter_per_ep: usize,
    warmup_epochs: usize,
    start_warmup_value: f64,
) -> Vec<f64> {
    let warmup_iters = warmup_epochs * niter_per_ep;
    let total = epochs * niter_per_ep;
    let mut out = if warmup_epochs > 0 {
        linspace(start_warmup_value, base, warmup_iters)
    } else {
        Vec::new()
    };
    let l = total.saturating_sub(warmup_iters);
    out.extend((0..l).map(|i| {
        final_value
            + 0.5
                * (base - final_value)
                * (1.0 + (std::f64::consts::PI * i as f64 / l as f64).cos())
    }));
    out
}

/// `temp_scheduler(warmup_t, t, warmup_epochs, nepochs)`: `linspace(warmup_t, t, warmup_epochs)`
/// followed by copies of `t`; indexed by epoch.
pub fn temp_scheduler(warmup_t: f64, t: f64, warmup_epochs: usize, nepochs: usize) -> Vec<f64> {
    let mut out = linspace(warmup_t, t, warmup_epochs);
    out.extend(std::iter::repeat_n(t, nepochs.saturating_sub(warmup_epochs)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_never_reaches_final_and_repeats_base_after_warmup() {
        let s = cosine_scheduler(1.0, 0.0, 3, 2, 1, 0.0);
        assert_eq!(s.len(), 6);
        assert_eq!(s[0], 0.0);
        assert_eq!(s[1], 1.0);
        assert_eq!(s[2], 1.0);
        assert!(s[5] > 0.0);
    }

    #[test]
    fn temp_reaches_target_at_last_warmup_epoch() {
        let s = temp_scheduler(0.04, 0.07, 3, 5);
        let want = [0.04, 0.055, 0.07, 0.07, 0.07];
        assert_eq!(s.len(), 5);
        assert!(s.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-15), "{s:?}");
        assert_eq!(s[2], 0.07, "the target is reached exactly at the last warm-up epoch");
    }
}
