//! The one place where backends are chosen.
//!
//! Everything else in this crate is generic over `B: Backend`.
//! Moving to a newer burn, or adding a backend, is a change to this file only.

#[cfg(not(any(feature = "ndarray", feature = "flex", feature = "cuda")))]
compile_error!(
    "flsl-train needs a backend: enable `flex` or `ndarray` (CPU) or `cuda` (GPU) as a feature"
);

use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;

/// The model's hot ops as single parallel passes with hand-written backward passes, on
/// burn-flex (`backend/fused_flex.rs`). Each function returns `Err` with its inputs back where
/// it does not apply (another backend, a dtype other than f32, `FLSL_COMPOSED_OPS=1`, or a
/// build without burn-flex: `backend/fused_none.rs`); the caller then runs the composed form.
#[cfg(feature = "flex")]
#[path = "backend/fused_flex.rs"]
pub(crate) mod fused;
/// Without burn-flex: every fused op declines (`Err` with its inputs back).
#[cfg(not(feature = "flex"))]
#[path = "backend/fused_none.rs"]
pub(crate) mod fused;

/// The scalars of one AdamW update of one parameter, each the f32 that burn's `tensor * f64`
/// would use (the f64 value rounded once).
#[derive(Debug, Clone, Copy)]
// Read only by the fused update, which builds without burn-flex do not have.
#[cfg_attr(not(feature = "flex"), allow(dead_code))]
pub(crate) struct AdamwScalars {
    /// The clipping coefficient the gradient is multiplied by first, if it was clipped.
    pub grad_scale: Option<f32>,
    /// `1 - lr * weight_decay`.
    pub decay: f32,
    /// `1 - beta1`.
    pub one_minus_b1: f32,
    /// `beta2`.
    pub b2: f32,
    /// `1 - beta2`.
    pub one_minus_b2: f32,
    /// `sqrt(1 - beta2^t)`.
    pub sqrt_bc2: f32,
    /// `eps`.
    pub eps: f32,
    /// `lr / (1 - beta1^t)`.
    pub step_size: f32,
}

/// burn-ndarray (the CPU backend the project started on; kept for comparison).
#[cfg(feature = "ndarray")]
pub type NdArrayCpu = burn::backend::NdArray<f32>;

/// burn-flex (burn 0.21's newer CPU backend: strided views, gemm products, SIMD).
#[cfg(feature = "flex")]
pub type FlexCpu = burn::backend::Flex;

/// The CPU backend: burn-flex when it is compiled in, burn-ndarray otherwise (see
/// docs/PERFORMANCE.md, "CPU training backends", for why flex is the default).
#[cfg(feature = "flex")]
pub type Cpu = FlexCpu;
/// The CPU backend: burn-flex when it is compiled in, burn-ndarray otherwise.
#[cfg(all(feature = "ndarray", not(feature = "flex")))]
pub type Cpu = NdArrayCpu;

/// The name of the CPU backend in this build, for logs and reports.
#[cfg(feature = "flex")]
pub const CPU_BACKEND: &str = "burn-flex";
/// The name of the CPU backend in this build, for logs and reports.
#[cfg(all(feature = "ndarray", not(feature = "flex")))]
pub const CPU_BACKEND: &str = "burn-ndarray";

/// The CPU device.
#[cfg(any(feature = "ndarray", feature = "flex"))]
pub fn cpu_device() -> burn::tensor::Device<Cpu> {
    Default::default()
}

/// The CPU backend with automatic differentiation (training).
#[cfg(any(feature = "ndarray", feature = "flex"))]
pub type CpuTrain = Autodiff<Cpu>;

/// Work run once per CPU backend compiled into this build (see [`each_cpu_backend`]).
pub trait CpuBackendVisitor {
    /// Runs on the training backend `B` (its `InnerBackend` is the plain one) named `name`.
    fn visit<B: AutodiffBackend>(&mut self, name: &str);
}

/// Runs `v` on every CPU backend compiled in, burn-flex first: the benchmarks compare them
/// in one process without a backend `cfg` of their own.
pub fn each_cpu_backend(v: &mut impl CpuBackendVisitor) {
    #[cfg(feature = "flex")]
    v.visit::<Autodiff<FlexCpu>>("flex");
    #[cfg(feature = "ndarray")]
    v.visit::<Autodiff<NdArrayCpu>>("ndarray");
    let _ = v;
}

/// The CUDA backend (burn-cuda).
#[cfg(feature = "cuda")]
pub type Gpu = burn::backend::Cuda<f32, i32>;

/// The CUDA backend with automatic differentiation.
#[cfg(feature = "cuda")]
pub type GpuTrain = Autodiff<Gpu>;

/// A CUDA device by ordinal.
#[cfg(feature = "cuda")]
pub fn cuda_device(index: usize) -> burn::backend::cuda::CudaDevice {
    burn::backend::cuda::CudaDevice::new(index)
}

/// Which device a command should run on, parsed from `cpu`, `cuda` or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The CPU backend ([`Cpu`]) on the host.
    Cpu,
    /// burn-cuda on the GPU with this ordinal.
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = crate::Error;

    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(crate::Error::Device {
                    device: s.into(),
                    reason: "unknown device: expected `cpu`, `cuda` or `cuda:N`".into(),
                }),
            },
        }
    }
}

/// Parses a device list: one device (`cpu`, `cuda`, `cuda:N`) or several separated by commas
/// for data-parallel training (`cuda:0,cuda:1`; `cuda:0,1` is accepted as a short form).
/// All entries must use the same backend; a CUDA ordinal may appear once. `cpu,cpu` runs two
/// replicas on the host (it proves the data-parallel path without a GPU; it is not faster).
pub fn parse_devices(s: &str) -> crate::Result<Vec<DeviceChoice>> {
    let mut out: Vec<DeviceChoice> = Vec::new();
    for part in s.split(',').map(str::trim) {
        let d = match (part.parse::<usize>(), out.last()) {
            (Ok(n), Some(DeviceChoice::Cuda(_))) => DeviceChoice::Cuda(n),
            _ => part.parse::<DeviceChoice>()?,
        };
        if let Some(first) = out.first() {
            if std::mem::discriminant(first) != std::mem::discriminant(&d) {
                return Err(crate::Error::Device {
                    device: s.into(),
                    reason:
                        "mixes CPU and CUDA devices: data-parallel replicas must share one backend"
                            .into(),
                });
            }
            if matches!(d, DeviceChoice::Cuda(_)) && out.contains(&d) {
                return Err(crate::Error::Device {
                    device: s.into(),
                    reason: format!("names {part} twice"),
                });
            }
        }
        out.push(d);
    }
    Ok(out)
}

/// Work generic over the training backend, run by [`run_on`] on the backend of a device list.
/// This is how commands reach a concrete backend without naming one (or a `cfg`) themselves.
pub trait BackendTask {
    /// What the work returns.
    type Output;
    /// Runs on backend `B` with these devices (the first is rank 0).
    fn run<B: AutodiffBackend>(self, devices: Vec<B::Device>) -> Self::Output;
}

/// Runs `task` on the backend of `devices` (all of one kind, see [`parse_devices`]); an error
/// names the device when its backend is not compiled into this build, so nothing reports
/// success having done nothing.
pub fn run_on<T: BackendTask>(devices: &[DeviceChoice], task: T) -> crate::Result<T::Output> {
    let Some(&first) = devices.first() else {
        return Err(crate::Error::Device {
            device: String::new(),
            reason: "no device given".into(),
        });
    };
    match first {
        DeviceChoice::Cpu => {
            #[cfg(any(feature = "ndarray", feature = "flex"))]
            {
                Ok(task.run::<CpuTrain>(devices.iter().map(|_| cpu_device()).collect()))
            }
            #[cfg(not(any(feature = "ndarray", feature = "flex")))]
            {
                let _ = task;
                Err(crate::Error::Device {
                    device: "cpu".into(),
                    reason: "the CPU backend is not compiled in: rebuild with `--features flex`"
                        .into(),
                })
            }
        }
        DeviceChoice::Cuda(n) => {
            #[cfg(feature = "cuda")]
            {
                let _ = n;
                Ok(task.run::<GpuTrain>(
                    devices
                        .iter()
                        .map(|d| cuda_device(if let DeviceChoice::Cuda(i) = d { *i } else { 0 }))
                        .collect(),
                ))
            }
            #[cfg(not(feature = "cuda"))]
            {
                let _ = task;
                Err(crate::Error::Device {
                    device: format!("cuda:{n}"),
                    reason: "the CUDA backend is not compiled in: rebuild with `--features cuda`"
                        .into(),
                })
            }
        }
    }
}
