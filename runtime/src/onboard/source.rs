//! Frame sources: where RGB8 frames come from.
//!
//! | input | source | live |
//! |---|---|---|
//! | a folder | [`FolderSource`]: `.png`/`.jpg`/`.jpeg` files in name order | no |
//! | a video file | [`RawStream`] over an `ffmpeg` subprocess (`ffprobe` for the size) | no |
//! | `-` with `--size WxH` | [`RawStream`] over standard input: packed RGB24 frames | yes |
//! | `/dev/videoN` (feature `v4l2`) | `V4l2Source`: MJPEG or YUYV through `linuxvideo` | yes |
//!
//! Video files go through a system `ffmpeg` rather than a decoder crate: the pure-Rust and
//! bundled-C decoders that build offline (`openh264`) decode H.264's constrained-baseline
//! profile only, while drone and phone cameras record High-profile H.264 or H.265 in MP4/MKV
//! containers that need a demuxer too; ffmpeg reads all of them and ships with every Jetson and
//! Raspberry Pi OS image. A camera pipeline that is not V4L2 (CSI cameras through
//! `nvarguscamerasrc` or `libcamera`) pipes raw frames into `--input -`.
//!
//! A live source produces frames at its own pace; the frame loop ([`super::run`]) drops the
//! stale ones by default. Sources never panic on bad data: an unreadable file or a stream that
//! ends inside a frame is a counted skip ([`Next::Skipped`]) with its reason.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::OnboardError;

/// Largest frame side accepted from any source (a larger image is refused before decoding).
pub const MAX_SIDE: u32 = crate::preprocess::MAX_IMAGE_SIDE;

/// One RGB8 frame, reused from frame to frame (its `data` keeps its capacity).
#[derive(Debug, Clone)]
pub struct FrameBuf {
    /// Where the frame came from: a file name, or `stdin#000042`.
    pub name: String,
    /// Frame number in the source (counting skipped and dropped frames).
    pub index: u64,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Packed RGB8, row-major, `width * height * 3` bytes.
    pub data: Vec<u8>,
    /// When the source finished reading it.
    pub captured: Instant,
    /// Time spent reading and decoding it.
    pub decode: Duration,
}

impl Default for FrameBuf {
    fn default() -> Self {
        Self {
            name: String::new(),
            index: 0,
            width: 0,
            height: 0,
            data: Vec::new(),
            captured: Instant::now(),
            decode: Duration::ZERO,
        }
    }
}

impl FrameBuf {
    /// The frame as an [`image::RgbImage`] view-copy (for overlays).
    pub fn to_image(&self) -> Option<image::RgbImage> {
        image::RgbImage::from_raw(self.width, self.height, self.data.clone())
    }
}

/// What [`FrameSource::next`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// The buffer holds a new frame.
    Frame,
    /// A frame could not be read (named in the reason) and was skipped; more may follow.
    Skipped(String),
    /// No more frames.
    End,
}

/// A producer of RGB8 frames.
pub trait FrameSource: Send {
    /// Reads the next frame into `buf` (resizing its data as needed).
    fn next(&mut self, buf: &mut FrameBuf) -> Result<Next, OnboardError>;
    /// Whether frames arrive at their own pace (a camera, a pipe) rather than on demand.
    fn is_live(&self) -> bool;
    /// A short description for logs (`folder frames/ (120 files)`).
    fn describe(&self) -> String;
}

impl<S: FrameSource + ?Sized> FrameSource for Box<S> {
    fn next(&mut self, buf: &mut FrameBuf) -> Result<Next, OnboardError> {
        (**self).next(buf)
    }
    fn is_live(&self) -> bool {
        (**self).is_live()
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
}

/// Opens `input`: `-` (raw RGB24 on standard input, `size` required), `/dev/video*` (a V4L2
/// camera, feature `v4l2`), a folder of images, or a video file (through ffmpeg).
pub fn open(input: &str, size: Option<(u32, u32)>) -> Result<Box<dyn FrameSource>, OnboardError> {
    let err = |reason: String| OnboardError::Source { input: input.to_string(), reason };
    if input == "-" {
        let (w, h) = size.ok_or_else(|| {
            err("raw frames on standard input need --size WxH (e.g. 640x480)".into())
        })?;
        return Ok(Box::new(RawStream::new("stdin", std::io::stdin(), w, h, true)?));
    }
    if input.starts_with("/dev/video") {
        #[cfg(feature = "v4l2")]
        return Ok(Box::new(v4l2::V4l2Source::open(Path::new(input), size)?));
        #[cfg(not(feature = "v4l2"))]
        return Err(err(
            "V4L2 cameras need a build with `--features v4l2` (or pipe raw frames into --input -)"
                .into(),
        ));
    }
    let path = Path::new(input);
    if path.is_dir() {
        return Ok(Box::new(FolderSource::open(path)?));
    }
    if path.is_file() {
        return Ok(Box::new(video(path)?));
    }
    Err(err("no such folder, file or device".into()))
}

/// `.png`/`.jpg`/`.jpeg` files of a folder, in name order.
#[derive(Debug)]
pub struct FolderSource {
    dir: PathBuf,
    files: Vec<PathBuf>,
    pos: usize,
}

impl FolderSource {
    /// Lists the folder; an error if it has no image file.
    pub fn open(dir: &Path) -> Result<Self, OnboardError> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| OnboardError::Io {
                action: "listing frames in",
                path: dir.to_path_buf(),
                source: e,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension().is_some_and(|e| {
                    matches!(
                        e.to_string_lossy().to_ascii_lowercase().as_str(),
                        "png" | "jpg" | "jpeg"
                    )
                })
            })
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(OnboardError::Source {
                input: dir.display().to_string(),
                reason: "no .png/.jpg frames in this folder".into(),
            });
        }
        Ok(Self { dir: dir.to_path_buf(), files, pos: 0 })
    }
}

/// Decodes an image file into `buf` within [`crate::preprocess::image_limits`] (sides up to
/// [`MAX_SIDE`], checked from the header before any pixel is decoded).
fn decode_file(path: &Path, buf: &mut FrameBuf) -> Result<(), String> {
    let img = crate::preprocess::decode_image_file(path).map_err(|e| e.to_string())?;
    let rgb = img.into_rgb8();
    buf.width = rgb.width();
    buf.height = rgb.height();
    buf.data.clear();
    buf.data.extend_from_slice(rgb.as_raw());
    Ok(())
}

impl FrameSource for FolderSource {
    fn next(&mut self, buf: &mut FrameBuf) -> Result<Next, OnboardError> {
        let Some(path) = self.files.get(self.pos).cloned() else { return Ok(Next::End) };
        let t0 = Instant::now();
        buf.index = self.pos as u64;
        self.pos += 1;
        buf.name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        match decode_file(&path, buf) {
            Ok(()) => {
                buf.captured = Instant::now();
                buf.decode = t0.elapsed();
                Ok(Next::Frame)
            }
            Err(e) => Ok(Next::Skipped(format!("unreadable frame {}: {e}", path.display()))),
        }
    }
    fn is_live(&self) -> bool {
        false
    }
    fn describe(&self) -> String {
        format!("folder {} ({} image files)", self.dir.display(), self.files.len())
    }
}

/// Packed RGB24 frames of a fixed size from a byte stream (standard input, an ffmpeg pipe).
pub struct RawStream<R> {
    name: String,
    reader: R,
    width: u32,
    height: u32,
    index: u64,
    live: bool,
    ended: bool,
    child: Option<Child>,
}

impl<R: Read + Send> RawStream<R> {
    /// Frames of `width x height` from `reader`; `live` marks a source that produces frames at
    /// its own pace.
    pub fn new(
        name: &str,
        reader: R,
        width: u32,
        height: u32,
        live: bool,
    ) -> Result<Self, OnboardError> {
        if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE {
            return Err(OnboardError::Source {
                input: name.to_string(),
                reason: format!("frame size {width}x{height} is outside 1..={MAX_SIDE} per side"),
            });
        }
        Ok(Self {
            name: name.to_string(),
            reader,
            width,
            height,
            index: 0,
            live,
            ended: false,
            child: None,
        })
    }

    /// The frame size in bytes.
    pub fn frame_len(&self) -> usize {
        self.width as usize * self.height as usize * 3
    }
}

impl<R: Read + Send> FrameSource for RawStream<R> {
    fn next(&mut self, buf: &mut FrameBuf) -> Result<Next, OnboardError> {
        if self.ended {
            return Ok(Next::End);
        }
        let len = self.frame_len();
        buf.data.resize(len, 0);
        let mut got = 0;
        let mut t0 = None;
        while got < len {
            match self.reader.read(&mut buf.data[got..]) {
                Ok(0) => break,
                Ok(n) => {
                    // The decode time starts at the frame's first byte, not while waiting for it.
                    t0.get_or_insert_with(Instant::now);
                    got += n;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(OnboardError::Source {
                        input: self.name.clone(),
                        reason: format!("reading frame {}: {e}", self.index),
                    });
                }
            }
        }
        buf.index = self.index;
        self.index += 1;
        if got < len {
            self.ended = true;
            if got == 0 {
                return Ok(Next::End);
            }
            return Ok(Next::Skipped(format!(
                "{}: the stream ended inside frame {} ({got} of {len} bytes of a {}x{} RGB24 frame); skipped",
                self.name, buf.index, self.width, self.height
            )));
        }
        buf.width = self.width;
        buf.height = self.height;
        buf.name = format!("{}#{:06}", self.name, buf.index);
        buf.captured = Instant::now();
        buf.decode = t0.map_or(Duration::ZERO, |t| t.elapsed());
        Ok(Next::Frame)
    }
    fn is_live(&self) -> bool {
        self.live
    }
    fn describe(&self) -> String {
        format!("{} ({}x{} RGB24 frames)", self.name, self.width, self.height)
    }
}

impl<R> Drop for RawStream<R> {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A video file decoded by an `ffmpeg` subprocess (`ffprobe` gives the frame size).
pub fn video(path: &Path) -> Result<RawStream<std::process::ChildStdout>, OnboardError> {
    let input = path.display().to_string();
    let missing = |tool: &str, e: std::io::Error| OnboardError::Source {
        input: input.clone(),
        reason: format!(
            "decoding a video file needs `{tool}` on the PATH ({e}); install ffmpeg, or pass a folder of frames or raw frames on --input -"
        ),
    };
    let probe = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=width,height",
            "-of",
            "csv=p=0",
        ])
        .arg(path)
        .output()
        .map_err(|e| missing("ffprobe", e))?;
    let text = String::from_utf8_lossy(&probe.stdout);
    let dims: Vec<u32> = text.trim().split(',').filter_map(|v| v.trim().parse().ok()).collect();
    let [width, height] = dims[..] else {
        return Err(OnboardError::Source {
            input,
            reason: format!(
                "ffprobe found no video stream size: {}",
                String::from_utf8_lossy(&probe.stderr).trim()
            ),
        });
    };
    let mut child = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(path)
        .args(["-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| missing("ffmpeg", e))?;
    let stdout = child.stdout.take().ok_or_else(|| OnboardError::Source {
        input: input.clone(),
        reason: "ffmpeg has no standard output".into(),
    })?;
    let name =
        path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| input.clone());
    let mut s = RawStream::new(&name, stdout, width, height, false)?;
    s.child = Some(child);
    Ok(s)
}

/// YUYV (YUV 4:2:2, `Y0 U Y1 V`) to packed RGB8, BT.601 limited range. `rgb` must hold
/// `width * height * 3` bytes and `yuyv` `width * height * 2`; shorter buffers convert the
/// pixels both hold.
pub fn yuyv_to_rgb(yuyv: &[u8], rgb: &mut [u8]) {
    let px = |y: u8, u: u8, v: u8, out: &mut [u8]| {
        let c = (i32::from(y) - 16) * 298;
        let d = i32::from(u) - 128;
        let e = i32::from(v) - 128;
        out[0] = ((c + 409 * e + 128) >> 8).clamp(0, 255) as u8;
        out[1] = ((c - 100 * d - 208 * e + 128) >> 8).clamp(0, 255) as u8;
        out[2] = ((c + 516 * d + 128) >> 8).clamp(0, 255) as u8;
    };
    for (q, o) in yuyv.chunks_exact(4).zip(rgb.chunks_exact_mut(6)) {
        let (a, b) = o.split_at_mut(3);
        px(q[0], q[1], q[3], a);
        px(q[2], q[1], q[3], b);
    }
}

#[cfg(feature = "v4l2")]
mod v4l2 {
    //! A V4L2 camera through `linuxvideo` (direct ioctls, memory-mapped buffers).
    use std::path::Path;
    use std::time::Instant;

    use linuxvideo::format::{PixFormat, PixelFormat};
    use linuxvideo::stream::ReadStream;
    use linuxvideo::{BufType, Device};

    use super::{FrameBuf, FrameSource, MAX_SIDE, Next, OnboardError, yuyv_to_rgb};

    /// A V4L2 capture device delivering MJPEG or YUYV frames.
    pub struct V4l2Source {
        path: String,
        stream: ReadStream,
        format: PixelFormat,
        width: u32,
        height: u32,
        index: u64,
    }

    impl V4l2Source {
        /// Opens the device and negotiates MJPEG (preferred: less USB bandwidth) or YUYV at
        /// `size` (or the driver's default size).
        pub fn open(path: &Path, size: Option<(u32, u32)>) -> Result<Self, OnboardError> {
            let name = path.display().to_string();
            let err = |reason: String| OnboardError::Source { input: name.clone(), reason };
            let device = Device::open(path).map_err(|e| err(format!("opening: {e}")))?;
            let formats: Vec<PixelFormat> = device
                .formats(BufType::VIDEO_CAPTURE)
                .filter_map(|f| f.ok().map(|f| f.pixel_format()))
                .collect();
            let format = [PixelFormat::MJPG, PixelFormat::JPEG, PixelFormat::YUYV]
                .into_iter()
                .find(|f| formats.contains(f))
                .ok_or_else(|| {
                    err(format!("the camera offers {formats:?}; flsl-onboard reads MJPEG or YUYV"))
                })?;
            let (w, h) = size.unwrap_or((640, 480));
            let capture = device
                .video_capture(PixFormat::new(w, h, format))
                .map_err(|e| err(format!("setting {w}x{h} {format:?}: {e}")))?;
            let (width, height) = (capture.format().width(), capture.format().height());
            if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE {
                return Err(err(format!("the driver chose {width}x{height}")));
            }
            let stream =
                capture.into_stream().map_err(|e| err(format!("starting the stream: {e}")))?;
            Ok(Self { path: name, stream, format, width, height, index: 0 })
        }
    }

    impl FrameSource for V4l2Source {
        fn next(&mut self, buf: &mut FrameBuf) -> Result<Next, OnboardError> {
            let (w, h, format) = (self.width, self.height, self.format);
            let t0 = Instant::now();
            buf.index = self.index;
            self.index += 1;
            let result = self.stream.dequeue(|view| {
                if view.is_error() {
                    return Ok(Err("the driver flagged this buffer as corrupted".to_string()));
                }
                let bytes: &[u8] = &view;
                if format == PixelFormat::YUYV {
                    let need = w as usize * h as usize * 2;
                    if bytes.len() < need {
                        return Ok(Err(format!(
                            "YUYV buffer of {} bytes, expected {need}",
                            bytes.len()
                        )));
                    }
                    buf.data.resize(w as usize * h as usize * 3, 0);
                    yuyv_to_rgb(&bytes[..need], &mut buf.data);
                    buf.width = w;
                    buf.height = h;
                    return Ok(Ok(()));
                }
                match crate::preprocess::decode_image_bytes(bytes) {
                    Ok(img) => {
                        let rgb = img.into_rgb8();
                        buf.width = rgb.width();
                        buf.height = rgb.height();
                        buf.data.clear();
                        buf.data.extend_from_slice(rgb.as_raw());
                        Ok(Ok(()))
                    }
                    Err(e) => Ok(Err(format!("undecodable MJPEG frame: {e}"))),
                }
            });
            match result {
                Ok(Ok(())) => {
                    buf.name = format!("{}#{:06}", self.path, buf.index);
                    buf.captured = Instant::now();
                    buf.decode = t0.elapsed();
                    Ok(Next::Frame)
                }
                Ok(Err(reason)) => {
                    Ok(Next::Skipped(format!("{} frame {}: {reason}", self.path, buf.index)))
                }
                Err(e) => Err(OnboardError::Source {
                    input: self.path.clone(),
                    reason: format!("dequeuing frame {}: {e}", buf.index),
                }),
            }
        }
        fn is_live(&self) -> bool {
            true
        }
        fn describe(&self) -> String {
            format!("V4L2 camera {} ({}x{} {:?})", self.path, self.width, self.height, self.format)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_stream_reads_whole_frames_and_counts_a_truncated_tail_as_a_skip() {
        let bytes: Vec<u8> = (0..(2 * 4 * 3 * 2 + 5)).map(|i| i as u8).collect();
        let mut s = RawStream::new("pipe", &bytes[..], 4, 2, true).unwrap();
        let mut buf = FrameBuf::default();
        assert_eq!(s.next(&mut buf).unwrap(), Next::Frame);
        assert_eq!((buf.width, buf.height, buf.data.len(), buf.index), (4, 2, 24, 0));
        assert_eq!(buf.data[..3], [0, 1, 2]);
        assert_eq!(s.next(&mut buf).unwrap(), Next::Frame);
        assert_eq!(buf.data[0], 24);
        match s.next(&mut buf).unwrap() {
            Next::Skipped(r) => assert!(r.contains("ended inside frame 2 (5 of 24 bytes"), "{r}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(s.next(&mut buf).unwrap(), Next::End);
        assert!(RawStream::new("pipe", &bytes[..], 0, 2, true).is_err());
    }

    #[test]
    fn folder_source_skips_unreadable_files_and_refuses_an_empty_folder() {
        let dir = std::env::temp_dir().join(format!("flsl-src-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        assert!(FolderSource::open(&dir).unwrap_err().to_string().contains("no .png/.jpg"));
        image::RgbImage::from_pixel(3, 2, image::Rgb([1, 2, 3])).save(dir.join("a.png")).unwrap();
        std::fs::write(dir.join("b.png"), b"\x89PNG garbage").unwrap();
        let mut s = FolderSource::open(&dir).unwrap();
        let mut buf = FrameBuf::default();
        assert_eq!(s.next(&mut buf).unwrap(), Next::Frame);
        assert_eq!((buf.width, buf.height, &buf.data[..3]), (3, 2, &[1u8, 2, 3][..]));
        assert!(matches!(s.next(&mut buf).unwrap(), Next::Skipped(r) if r.contains("b.png")));
        assert_eq!(s.next(&mut buf).unwrap(), Next::End);
    }

    #[test]
    fn yuyv_grey_and_primaries() {
        let mut rgb = [0u8; 6];
        yuyv_to_rgb(&[235, 128, 16, 128], &mut rgb);
        assert_eq!(rgb, [255, 255, 255, 0, 0, 0]);
        yuyv_to_rgb(&[81, 90, 81, 240], &mut rgb);
        assert!(rgb[0] > 240 && rgb[1] < 10 && rgb[2] < 10, "{rgb:?}");
    }
}
