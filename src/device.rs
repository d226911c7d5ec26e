//! Picking the backend at run time: `--device cpu|cuda[:N]` and `--dtype`.
//!
//! The CPU backend is burn's Flex: measured against NdArray and Candle on the forward pass of
//! SmolLM2-135M (see README, "Choosing the CPU backend"), it was the fastest, and it supports bf16.

use anyhow::{anyhow, bail, Result};
use burn::tensor::{backend::Backend, set_default_dtypes, DType};
use std::str::FromStr;

/// The default CPU backend.
pub type Cpu = burn::backend::Flex;
#[cfg(feature = "cuda")]
pub type Gpu = burn::backend::Cuda;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Self::Cpu),
            // Under a launcher, each rank its own device: cuda:{local rank}.
            "cuda" => Ok(Self::Cuda(crate::dist::default_cuda_ordinal())),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => bail!("--device: \"{s}\" is not cpu, cuda or cuda:N"),
            },
        }
    }
}

/// Compute dtype: `auto` is f32 on CPU and bf16 on CUDA.
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
            (Self::Auto, DeviceChoice::Cpu) | (Self::F32, _) => DType::F32,
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

/// Runs `job` on the chosen device with `precision` as every new float tensor's dtype.
pub fn dispatch<J: Job>(device: DeviceChoice, precision: Precision, job: J) -> Result<J::Output> {
    let dtype = precision.resolve(device);
    match device {
        DeviceChoice::Cpu => run_on::<Cpu, J>(Default::default(), dtype, job),
        #[cfg(feature = "cuda")]
        DeviceChoice::Cuda(n) => {
            crate::dist::use_cuda_device(n);
            run_on::<Gpu, J>(burn::backend::cuda::CudaDevice::new(n), dtype, job)
        }
        #[cfg(not(feature = "cuda"))]
        DeviceChoice::Cuda(_) => bail!(
            "--device cuda: this binary was built without CUDA; rebuild with `cargo build --release --features cuda`"
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
