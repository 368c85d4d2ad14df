//! Crash safety of `flsl train`: the process is killed with SIGKILL at random moments (during
//! steps, during checkpoint writes, during start-up) and restarted each time. Every restart must
//! find `latest` on a complete checkpoint, the run must end with the weights of an uninterrupted
//! run bit for bit, and nothing temporary may be left behind.
//!
//! `FLSL_KILLS` sets the number of kills (default 100).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flsl_train::tensors::read_safetensors;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flsl-crash-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A micro run that checkpoints after every step: 4 epochs of 6 steps.
fn train_cmd(data: &Path, out: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_flsl"));
    c.args(["train", "--preset", "tiny", "--device", "cpu"])
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .args(
            [
                "embed_dim=32",
                "depth=1",
                "num_heads=2",
                "out_dim=16",
                "head_hidden_dim=32",
                "head_bottleneck_dim=16",
                "batch_size_per_gpu=4",
                "augment.global_resize=32",
                "augment.local_resize=16",
                "augment.sampling_window_size_g=2",
                "augment.sampling_window_size_l=1",
                "epochs=4",
                "epoch_len=24",
                "num_workers=2",
                "drop_path_rate=0.1",
                "checkpoint_every_steps=1",
                "saveckp_freq=2",
            ]
            .iter()
            .flat_map(|kv| ["--set", kv]),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// The checkpoint `latest` names must be complete: every file present and parseable.
fn assert_latest_complete(ckpt: &Path, kill: usize) {
    let latest = ckpt.join("latest");
    if std::fs::symlink_metadata(&latest).is_err() {
        return; // killed before the first checkpoint
    }
    for f in ["student.safetensors", "teacher.safetensors", "optimizer.safetensors"] {
        read_safetensors(&latest.join(f))
            .unwrap_or_else(|e| panic!("after kill {kill}: latest/{f} is not complete: {e}"));
    }
    for f in ["config.json", "state.json"] {
        let text = std::fs::read_to_string(latest.join(f))
            .unwrap_or_else(|e| panic!("after kill {kill}: latest/{f}: {e}"));
        serde_json::from_str::<serde_json::Value>(&text)
            .unwrap_or_else(|e| panic!("after kill {kill}: latest/{f} is torn: {e}"));
    }
}

fn leftovers(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name.ends_with(".tmp") {
                out.push(e.path().display().to_string());
            }
            if e.path().is_dir() && !e.path().is_symlink() {
                stack.push(e.path());
            }
        }
    }
    out
}

#[test]
fn sigkill_at_random_moments_loses_nothing() {
    let kills: usize = std::env::var("FLSL_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    let root = tmp("kill");
    flsl_train::data::write_synthetic_scenes(&root.join("img"), 8, 32).unwrap();

    // The uninterrupted run, timed: kill delays are drawn within its duration.
    let t0 = Instant::now();
    let status = train_cmd(&root.join("img"), &root.join("a")).status().unwrap();
    assert!(status.success(), "the uninterrupted run failed");
    let full = t0.elapsed();

    let out = root.join("b");
    let ckpt = out.join("checkpoints");
    // The kill delays are reproducible from the seed (the moments they hit are not: they
    // depend on the machine's speed).
    let mut rng = ChaCha8Rng::seed_from_u64(0x5EED);
    let (mut killed, mut mid_write, mut restarts) = (0usize, 0usize, 0usize);
    loop {
        let mut child = train_cmd(&root.join("img"), &out).spawn().unwrap();
        restarts += 1;
        if killed >= kills {
            assert!(child.wait().unwrap().success(), "the final restart failed");
            break;
        }
        // Between 5% and 60% of an uninterrupted run: start-up, steps and writes all get hit.
        let frac = rng.random_range(0.05..0.6);
        let deadline = Instant::now() + full.mul_f64(frac);
        let finished = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break Some(st);
            }
            if Instant::now() >= deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        match finished {
            Some(st) => {
                // The run got to its end before the kill: it must have succeeded; start over
                // from scratch so that the remaining kills hit a run again.
                assert!(st.success(), "a restart failed on its own");
                let _ = std::fs::remove_dir_all(&out);
            }
            None => {
                // SIGKILL: no handler, no flush, no cleanup.
                child.kill().unwrap();
                child.wait().unwrap();
                killed += 1;
                let writing = std::fs::read_dir(&ckpt)
                    .map(|d| {
                        d.flatten().any(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
                    })
                    .unwrap_or(false);
                mid_write += usize::from(writing);
                assert_latest_complete(&ckpt, killed);
            }
        }
    }
    println!(
        "{killed} SIGKILLs ({mid_write} while a checkpoint was being written), {restarts} starts; \
         uninterrupted run {:.1} s",
        full.as_secs_f64()
    );
    assert!(mid_write >= 1, "no kill landed during a checkpoint write: the test proved less");

    // Bit-exact: the final weights and optimizer state of both runs.
    for f in ["student.safetensors", "teacher.safetensors", "optimizer.safetensors"] {
        let a = std::fs::read(root.join("a/checkpoints/latest").join(f)).unwrap();
        let b = std::fs::read(ckpt.join("latest").join(f)).unwrap();
        assert!(a == b, "{f} differs from the uninterrupted run's after {killed} kills");
    }
    // Same progress record, throughput aside (it is a time): every epoch summary covers all
    // of its batches however often the epoch was cut.
    let state = |d: &Path| {
        let text = std::fs::read_to_string(d.join("latest/state.json")).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        for e in v["epochs"].as_array_mut().unwrap() {
            e["images_per_s"] = serde_json::Value::Null;
        }
        v
    };
    assert_eq!(state(&ckpt), state(&root.join("a/checkpoints")), "state.json differs");
    let left = leftovers(&out);
    assert!(left.is_empty(), "left behind: {left:?}");
    // Same checkpoint folders as the uninterrupted run (latest + kept epochs).
    let names = |d: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&ckpt), names(&root.join("a/checkpoints")));
    std::fs::remove_dir_all(root).unwrap();
}
