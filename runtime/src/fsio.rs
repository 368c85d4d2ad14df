//! Durable file writes shared by every crate that writes models, checkpoints and reports: a
//! file replaced in one step (temporary file in the same folder, flushed, renamed over the
//! target, folder flushed), so that a crash or a full disk leaves the old file or the new one,
//! never a torn one, and a power loss does not undo the rename.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The folder `path` lives in (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// A temporary name next to `path` for this process: `.{name}.{pid}.tmp`.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    parent_dir(path).join(format!(".{name}.{}.tmp", std::process::id()))
}

/// Removes the temporary files that killed processes left in `dir`: names of the
/// [`temp_path`] form (`.{name}.{pid}.tmp`, or `.{stem}.{pid}.tmp.{ext}` where a writer needs
/// the extension) whose process is gone (on Linux, no `/proc/{pid}`; elsewhere any pid but
/// this process's). Returns what was removed; a missing `dir` is not an error.
pub fn remove_stale_temps(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(removed) };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = temp_pid(&name) else { continue };
        let alive = pid == std::process::id()
            || (cfg!(target_os = "linux") && Path::new(&format!("/proc/{pid}")).exists());
        if alive || !e.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        std::fs::remove_file(e.path())?;
        removed.push(e.path());
    }
    Ok(removed)
}

/// The pid in a [`temp_path`]-style name: `.{name}.{pid}.tmp` or `.{name}.{pid}.tmp.{ext}`.
fn temp_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?;
    let head = match rest.rsplit_once(".tmp") {
        Some((head, "")) => head,
        Some((head, ext)) if ext.starts_with('.') && !ext[1..].contains('.') => head,
        _ => return None,
    };
    let (stem, pid) = head.rsplit_once('.')?;
    (!stem.is_empty()).then_some(())?;
    pid.parse().ok()
}

/// [`temp_path`] for writers that choose their format by the extension (an image encoder):
/// `.{stem}.{pid}.tmp.{ext}` next to `path` (the form [`remove_stale_temps`] also knows).
pub fn temp_path_keeping_extension(path: &Path) -> PathBuf {
    let stem = path.file_stem().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let ext = path.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
    parent_dir(path).join(format!(".{stem}.{}.tmp{ext}", std::process::id()))
}

/// Flushes a folder's entries (a rename or a new file in it) to disk.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Whether `path` exists and is neither a file nor a folder (a device such as `/dev/null` or
/// `/dev/stdout`, a FIFO, a socket): renaming a file over it would replace the device (with
/// root's rights, `--json /dev/null` would turn `/dev/null` into a plain file for every
/// process of the machine), so such paths are written in place instead.
fn is_special(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| !m.is_file() && !m.is_dir())
}

/// Renames the complete file `tmp` over `path` and flushes the folder (for a device or FIFO
/// path, see [`is_special`], its content is written there and `tmp` removed).
pub fn commit(tmp: &Path, path: &Path) -> std::io::Result<()> {
    if is_special(path) {
        let bytes = std::fs::read(tmp)?;
        std::fs::remove_file(tmp)?;
        return std::fs::OpenOptions::new().write(true).open(path)?.write_all(&bytes);
    }
    std::fs::rename(tmp, path)?;
    sync_dir(parent_dir(path))
}

/// Writes `bytes` to `path` atomically and durably (creating the folder if needed). On error
/// the temporary file is removed and `path` is untouched. A device or FIFO path is written in
/// place (see [`is_special`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if is_special(path) {
        return std::fs::OpenOptions::new().write(true).open(path)?.write_all(bytes);
    }
    std::fs::create_dir_all(parent_dir(path))?;
    let tmp = temp_path(path);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        commit(&tmp, path)
    })();
    if result.is_err() {
        // The temporary file is ours and garbage now; the original error is what matters.
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("flsl-fsio-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let p = dir.join("sub/a.bin");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.join("sub")).unwrap().flatten().collect();
        assert_eq!(names.len(), 1, "{names:?}");
        // A folder in the way: an error, nothing left behind.
        std::fs::create_dir_all(dir.join("sub/d")).unwrap();
        assert!(write_atomic(&dir.join("sub/d"), b"x").is_err());
        assert!(!temp_path(&dir.join("sub/d")).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn name_of(p: &Path) -> String {
        p.file_name().unwrap().to_string_lossy().into_owned()
    }

    /// Temporary files of dead processes go, this process's and other names stay.
    #[test]
    fn stale_temporaries_are_removed() {
        assert_eq!(temp_pid(".loss.24942.tmp.png"), Some(24942));
        assert_eq!(temp_pid(".config.json.17.tmp"), Some(17));
        // What the writers name their temporaries, the cleaner reads back.
        let me = Some(std::process::id());
        assert_eq!(temp_pid(&name_of(&temp_path(Path::new("d/config.json")))), me);
        assert_eq!(temp_pid(&name_of(&temp_path_keeping_extension(Path::new("d/loss.png")))), me);
        for other in ["loss.png", ".tmp-epoch-1-5", ".x.tmp", ".a.b.tmp.png.bak", "..5.tmp"] {
            assert_eq!(temp_pid(other), None, "{other}");
        }
        let dir = std::env::temp_dir().join(format!("flsl-fsio-stale-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // u32::MAX - 1 is above any Linux pid_max, so no such process exists.
        let dead = format!(".loss.{}.tmp.png", u32::MAX - 1);
        let mine = format!(".config.json.{}.tmp", std::process::id());
        for f in [dead.as_str(), mine.as_str(), "loss.png", ".hidden"] {
            std::fs::write(dir.join(f), b"x").unwrap();
        }
        let removed = remove_stale_temps(&dir).unwrap();
        assert_eq!(removed, vec![dir.join(&dead)]);
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, vec![mine, ".hidden".to_string(), "loss.png".to_string()]);
        assert!(remove_stale_temps(&dir.join("missing")).unwrap().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A device path is written, not replaced: `/dev/zero` (it takes and discards writes)
    /// stays a character device, and `commit` of a temporary file onto it leaves no file.
    #[cfg(unix)]
    #[test]
    fn a_device_path_stays_a_device() {
        use std::os::unix::fs::FileTypeExt;
        let dev = Path::new("/dev/zero");
        let is_char = || std::fs::metadata(dev).is_ok_and(|m| m.file_type().is_char_device());
        assert!(is_char(), "/dev/zero must be a character device for this test");
        write_atomic(dev, b"discarded").unwrap();
        assert!(is_char(), "write_atomic replaced /dev/zero");
        let tmp = std::env::temp_dir().join(format!("flsl-fsio-dev-{}", std::process::id()));
        std::fs::write(&tmp, b"also discarded").unwrap();
        commit(&tmp, dev).unwrap();
        assert!(is_char(), "commit replaced /dev/zero");
        assert!(!tmp.exists(), "the temporary file is left behind");
    }
}
