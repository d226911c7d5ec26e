//! Picking the backend at run time: `--device auto|cpu|cuda[:N]|wgpu` and `--dtype`.
//!
//! The CPU backend is burn's Flex: measured against NdArray and Candle on the forward pass of
//! SmolLM2-135M (see docs/results.md, "Choosing the CPU backend"), it was the fastest, and it
//! supports bf16.
//! The GPU backends (`--features cuda`, `--features wgpu`) are burn's fused cubecl backends;
//! [`gpu`] checks their requirements before the first tensor, points cubecl's autotune cache at
//! a stable place, samples their memory and turns their failures into one-line errors.

mod gpu;

pub use gpu::{gpu_memory, step_done, GpuMemory};

use anyhow::{anyhow, bail, Result};
use burn::tensor::{backend::Backend, set_default_dtypes, DType};
use std::str::FromStr;

/// The default CPU backend.
pub type Cpu = burn::backend::Flex;
/// burn's CUDA backend with fusion (see Cargo.toml's `cuda` feature).
#[cfg(feature = "cuda")]
pub type Gpu = burn::backend::Cuda;
/// burn's wgpu backend (Vulkan, Metal) with fusion.
#[cfg(feature = "wgpu")]
pub type Wgpu = burn::backend::Wgpu;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The first CUDA device when built with `cuda` and one is present, else a hardware wgpu
    /// adapter when built with `wgpu`, else the CPU ([`DeviceChoice::resolve`]).
    Auto,
    Cpu,
    Cuda(usize),
    /// wgpu's default adapter (`CUBECL_WGPU_DEFAULT_DEVICE` picks another).
    Wgpu,
}

impl FromStr for DeviceChoice {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            // Under a launcher, each rank its own device: cuda:{local rank}.
            "cuda" => Ok(Self::Cuda(crate::dist::default_cuda_ordinal())),
            "wgpu" => Ok(Self::Wgpu),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => bail!("--device: \"{s}\" is not auto, cpu, cuda, cuda:N or wgpu"),
            },
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Wgpu => write!(f, "wgpu"),
        }
    }
}

impl DeviceChoice {
    /// `auto` made concrete (any other choice is itself): a GPU user who forgets `--device`
    /// trains on the GPU. A software wgpu adapter (Mesa's llvmpipe) is not chosen: it runs on
    /// the CPU, slower than the CPU backend.
    pub fn resolve(self) -> Self {
        if self != Self::Auto {
            return self;
        }
        #[cfg(feature = "cuda")]
        if gpu::cuda_devices() > 0 {
            return Self::Cuda(crate::dist::default_cuda_ordinal());
        }
        #[cfg(feature = "wgpu")]
        if gpu::hardware_wgpu_adapter() {
            return Self::Wgpu;
        }
        Self::Cpu
    }
}

static CHOSEN: std::sync::OnceLock<DeviceChoice> = std::sync::OnceLock::new();

/// The device this process's job runs on, once [`dispatch`] has chosen it.
pub fn chosen() -> Option<DeviceChoice> {
    CHOSEN.get().copied()
}

/// Compute dtype: `auto` is f32 on CPU and wgpu (which has no bf16) and bf16 on CUDA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    Auto,
    F32,
    Bf16,
    F16,
}

impl Precision {
    fn resolve(self, device: DeviceChoice) -> DType {
        match (self, device) {
            (Self::Auto, DeviceChoice::Auto | DeviceChoice::Cpu | DeviceChoice::Wgpu)
            | (Self::F32, _) => DType::F32,
            (Self::Auto, DeviceChoice::Cuda(_)) | (Self::Bf16, _) => DType::BF16,
            (Self::F16, _) => DType::F16,
        }
    }
}

/// Work that runs on any backend; [`dispatch`] picks the backend and device.
pub trait Job {
    type Output;
    fn run<B: Backend>(self, device: B::Device) -> Result<Self::Output>;
}

/// Runs `job` on the chosen device with `precision` as every new float tensor's dtype. GPU jobs
/// run on this thread (cubecl gives each thread its own stream and memory pool), after the
/// device's pre-flight checks, with its failures turned into errors.
pub fn dispatch<J: Job>(device: DeviceChoice, precision: Precision, job: J) -> Result<J::Output> {
    let asked = device;
    let device = device.resolve();
    // A binary built for a GPU says where `auto` put the job (a CPU-only build has one choice).
    let gpu_build = cfg!(any(feature = "cuda", feature = "wgpu"));
    if asked == DeviceChoice::Auto && gpu_build && crate::dist::world().is_root() {
        let why = match device {
            DeviceChoice::Cpu => ": no CUDA device or hardware wgpu adapter found",
            _ => "",
        };
        eprintln!("device: {device} (--device auto{why})");
    }
    let _ = CHOSEN.set(device);
    let dtype = precision.resolve(device);
    match device {
        DeviceChoice::Auto | DeviceChoice::Cpu => run_on::<Cpu, J>(Default::default(), dtype, job),
        #[cfg(feature = "cuda")]
        DeviceChoice::Cuda(n) => {
            let info = gpu::cuda_preflight(n)?;
            crate::dist::use_cuda_device(n);
            let dev = burn::backend::cuda::CudaDevice::new(n);
            gpu::guarded(info, gpu::memory_probe::<burn::cubecl::cuda::CudaRuntime>(dev.clone()), || {
                run_on::<Gpu, J>(dev, dtype, job)
            })
        }
        #[cfg(not(feature = "cuda"))]
        DeviceChoice::Cuda(_) => bail!(
            "--device cuda: this binary was built without CUDA; rebuild with `cargo build --release --features cuda`"
        ),
        #[cfg(feature = "wgpu")]
        DeviceChoice::Wgpu => {
            let dev = burn::backend::wgpu::WgpuDevice::DefaultDevice;
            let info = gpu::wgpu_preflight(&dev)?;
            gpu::guarded(info, gpu::memory_probe::<burn::cubecl::wgpu::WgpuRuntime>(dev.clone()), || {
                run_on::<Wgpu, J>(dev, dtype, job)
            })
        }
        #[cfg(not(feature = "wgpu"))]
        DeviceChoice::Wgpu => bail!(
            "--device wgpu: this binary was built without wgpu; rebuild with `cargo build --release --features wgpu`"
        ),
    }
}

fn run_on<B: Backend, J: Job>(device: B::Device, dtype: DType, job: J) -> Result<J::Output> {
    let float = match dtype {
        DType::BF16 => burn::tensor::FloatDType::BF16,
        DType::F16 => burn::tensor::FloatDType::F16,
        _ => burn::tensor::FloatDType::F32,
    };
    set_default_dtypes::<B>(&device, float, burn::tensor::IntDType::I32)
        .map_err(|e| anyhow!("--dtype {dtype:?} on {device:?}: {e:?}"))?;
    job.run::<B>(device)
}

/// The device a job runs on, as the pre-flight check found it (GPU jobs only).
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    /// e.g. `cuda:0 (NVIDIA H200)`.
    pub name: String,
    /// Device memory in bytes, where the backend tells.
    pub total_bytes: Option<u64>,
}

/// The GPU the current thread's job runs on; `None` on the CPU.
pub fn current_gpu() -> Option<DeviceInfo> {
    gpu::current()
}
