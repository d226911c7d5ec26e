//! What a GPU job needs around it, kept out of the generic code:
//!
//! - pre-flight checks before the first tensor (cubecl panics on its device thread otherwise):
//!   the NVIDIA driver, the device index, libnvrtc and the CUDA headers; a wgpu adapter
//! - cubecl's autotune results and compiled kernels cached under the user's cache directory
//!   (`$XDG_CACHE_HOME/laco-train/cubecl`, else `~/.cache/laco-train/cubecl`), unless a
//!   `cubecl.toml` or `burn.toml` above the working directory says otherwise
//! - GPU memory in use and reserved, sampled through cubecl's client, with its peak: cubecl
//!   keeps no high-water mark, so a sampler thread reads the job's stream every millisecond
//!   (between the device thread's tasks), which sees transients inside a layer, such as the
//!   scores of burn's fallback attention, that samples taken between the job's steps miss
//! - failures on cubecl's device thread (out of memory, a kernel that does not compile) turned
//!   into one-line errors instead of panics, hangs or garbage
//!
//! Everything here is per thread: cubecl gives each thread its own stream and memory pool, so a
//! job runs all its GPU work on the thread that [`super::dispatch`] was called on.

use super::DeviceInfo;
use anyhow::{anyhow, Result};
use std::cell::RefCell;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
use std::panic::{catch_unwind, AssertUnwindSafe};
#[cfg(any(feature = "cuda", feature = "wgpu"))]
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
use std::sync::Once;

/// Reads `(bytes in use, bytes reserved)` of the job's stream on the device (from any thread).
pub(super) type Probe = std::sync::Arc<dyn Fn() -> Option<(u64, u64)> + Send + Sync>;

/// GPU memory of this thread's stream, in bytes: in use by tensors, reserved by cubecl's pools
/// (what the driver sees), and the largest of each over the samples taken so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct GpuMemory {
    pub in_use: u64,
    pub reserved: u64,
    pub peak_in_use: u64,
    pub peak_reserved: u64,
}

/// The GPU job of this thread (built only by the GPU features' dispatch).
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
struct Active {
    info: DeviceInfo,
    probe: Probe,
    memory: GpuMemory,
    sampler: Sampler,
}

/// The sampler thread: the largest `(in use, reserved)` it has read, until dropped.
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
struct Sampler {
    peaks: std::sync::Arc<[std::sync::atomic::AtomicU64; 2]>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
impl Sampler {
    fn start(probe: Probe) -> Self {
        use std::sync::atomic::AtomicU64;
        let peaks = std::sync::Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (p, s) = (peaks.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some((in_use, reserved)) = probe() {
                    p[0].fetch_max(in_use, Ordering::Relaxed);
                    p[1].fetch_max(reserved, Ordering::Relaxed);
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        });
        Self {
            peaks,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

thread_local! {
    static ACTIVE: RefCell<Option<Active>> = const { RefCell::new(None) };
}

/// Panics seen on any thread while a GPU job runs (cubecl's device thread catches them and
/// carries on; the messages are what is left of the failure).
static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());
#[cfg(any(feature = "cuda", feature = "wgpu"))]
static RECORDING: AtomicBool = AtomicBool::new(false);

pub(super) fn current() -> Option<DeviceInfo> {
    ACTIVE.with(|a| a.borrow().as_ref().map(|a| a.info.clone()))
}

/// Samples the GPU memory now (`None` on the CPU), updating the peaks.
pub fn gpu_memory() -> Option<GpuMemory> {
    ACTIVE.with(|a| {
        let mut a = a.borrow_mut();
        let a = a.as_mut()?;
        if let Some((in_use, reserved)) = (a.probe)() {
            let m = &mut a.memory;
            let sampled = |i: usize| a.sampler.peaks[i].load(std::sync::atomic::Ordering::Relaxed);
            m.in_use = in_use;
            m.reserved = reserved;
            m.peak_in_use = m.peak_in_use.max(in_use).max(sampled(0));
            m.peak_reserved = m.peak_reserved.max(reserved).max(sampled(1));
        }
        Some(a.memory)
    })
}

/// At the end of a training step on a GPU: turns a failure reported on the device's thread into
/// an error, and samples the memory. It does not wait for the device: the step's one read of its
/// loss and gradient norm has (see `train::recipe`). Nothing on the CPU.
pub fn step_done() -> Result<()> {
    let Some(info) = current() else {
        return Ok(());
    };
    if let Some(failure) = fatal_panic() {
        return Err(explain(&info, &failure));
    }
    gpu_memory();
    Ok(())
}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
/// Runs a GPU job on this thread with `info` and `probe` as the current device, and with panics
/// (of this thread and of cubecl's device thread) turned into one-line errors.
pub(super) fn guarded<T>(
    info: DeviceInfo,
    probe: Probe,
    job: impl FnOnce() -> Result<T>,
) -> Result<T> {
    install_panic_hook();
    PANICS.lock().map(|mut p| p.clear()).ok();
    RECORDING.store(true, Ordering::SeqCst);
    ACTIVE.with(|a| {
        *a.borrow_mut() = Some(Active {
            info: info.clone(),
            probe: probe.clone(),
            memory: GpuMemory::default(),
            sampler: Sampler::start(probe),
        })
    });
    let outcome = catch_unwind(AssertUnwindSafe(job));
    RECORDING.store(false, Ordering::SeqCst);
    ACTIVE.with(|a| a.borrow_mut().take());
    let fatal = fatal_panic();
    match outcome {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(e)) => match fatal {
            Some(failure) => Err(explain(&info, &failure)),
            None => Err(e),
        },
        Err(payload) => {
            let own = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic".into());
            Err(explain(&info, &fatal.unwrap_or(own)))
        }
    }
}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
/// While a GPU job runs, panic messages are recorded and not printed (set RUST_BACKTRACE to see
/// them as usual); otherwise the previous hook runs.
fn install_panic_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !RECORDING.load(Ordering::SeqCst) {
                return previous(info);
            }
            let msg = info
                .payload()
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            if let Ok(mut p) = PANICS.lock() {
                p.push(msg);
            }
            if std::env::var_os("RUST_BACKTRACE").is_some() {
                previous(info);
            }
        }));
    });
}

/// The first recorded panic that means the device's work is lost.
fn fatal_panic() -> Option<String> {
    let panics = PANICS.lock().ok()?;
    panics.iter().find(|m| classify(m).is_some()).cloned()
}

/// What a failure message means, for the ones that have a known cause.
fn classify(msg: &str) -> Option<&'static str> {
    let m = msg.to_ascii_lowercase();
    if m.contains("can't allocate buffer")
        || m.contains("out of memory")
        || m.contains("out_of_memory")
        || m.contains("buffertoobig")
    {
        Some("out of GPU memory; lower optim.batch_size (raise optim.grad_accum to keep the effective batch) or data.max_seq_len (see the memory plan printed at start-up)")
    } else if m.contains("cuda installation not found") {
        Some("the CUDA headers were not found: set CUDA_PATH to the CUDA toolkit")
    } else if m.contains("nvrtc") && m.contains("unable to dynamically load") {
        Some("libnvrtc (CUDA's runtime compiler) could not be loaded: install the toolkit's nvrtc or add its lib64 to LD_LIBRARY_PATH")
    } else if m.contains("unable to dynamically load") {
        Some("the NVIDIA driver (libcuda.so) could not be loaded")
    } else if m.contains("compilation error") {
        Some("a GPU kernel failed to compile (are CUDA_PATH's headers those of the toolkit the binary was built for? see CUDARC_CUDA_VERSION)")
    } else if m.contains("resource to exist") {
        Some("a GPU buffer was lost after an earlier failure (most often out of memory)")
    } else {
        None
    }
}

/// One line: the device, what the failure means when known, and the first line of the message.
fn explain(info: &DeviceInfo, msg: &str) -> anyhow::Error {
    let first = msg
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with("Caused by"))
        .unwrap_or("unknown failure");
    // The detail worth keeping is the last line that names something (e.g. the buffer size).
    let detail = msg
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Caused by"))
        .find(|l| classify(l).is_some())
        .unwrap_or(first);
    match classify(msg) {
        Some(cause) => anyhow!("{}: {cause} ({detail})", info.name),
        None => anyhow!("{}: {first}", info.name),
    }
}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
/// Where cubecl keeps autotune results and compiled kernels between runs: set before the first
/// GPU tensor, unless a cubecl config file (which cubecl reads itself) is above the working
/// directory or the config was already read.
fn configure_cubecl() {
    use burn::cubecl::config::{cache::CacheConfig, CubeClRuntimeConfig, RuntimeConfig};
    static CONFIGURED: Once = Once::new();
    CONFIGURED.call_once(|| {
        if config_file_above_cwd() || CubeClRuntimeConfig::storage().lock().is_some() {
            return;
        }
        let Some(dir) = cache_dir() else {
            return;
        };
        let mut cfg = CubeClRuntimeConfig::default().override_from_env();
        cfg.autotune.cache = CacheConfig::File(dir.clone());
        cfg.compilation.cache = Some(CacheConfig::File(dir));
        CubeClRuntimeConfig::set(cfg);
    });
}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn cache_dir() -> Option<std::path::PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache")))?;
    Some(base.join("laco-train").join("cubecl"))
}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn config_file_above_cwd() -> bool {
    let Ok(mut dir) = std::env::current_dir() else {
        return false;
    };
    loop {
        if ["cubecl.toml", "CubeCL.toml", "burn.toml", "Burn.toml"]
            .iter()
            .any(|f| dir.join(f).is_file())
        {
            return true;
        }
        if !dir.pop() {
            return false;
        }
    }
}

#[cfg(feature = "cuda")]
/// How many CUDA devices the driver sees (0 without a driver).
pub(super) fn cuda_devices() -> usize {
    use cudarc::driver::{result, sys};
    // SAFETY: only tries to load the library.
    if !unsafe { sys::is_culib_present() } || result::init().is_err() {
        return 0;
    }
    result::device::get_count().map_or(0, |n| n.max(0) as usize)
}

/// The CUDA pre-flight check, on this thread before any CUDA tensor: each missing piece is one
/// line naming it (cubecl would panic on its device thread, or hang on the first read).
#[cfg(feature = "cuda")]
pub(super) fn cuda_preflight(n: usize) -> Result<DeviceInfo> {
    use anyhow::bail;
    use cudarc::driver::{result, sys};
    let dev = format!("--device cuda:{n}");
    // SAFETY: only tries to load the library.
    if !unsafe { sys::is_culib_present() } {
        bail!("{dev}: the NVIDIA driver (libcuda.so) was not found: install the driver, or add the directory holding libcuda.so to LD_LIBRARY_PATH");
    }
    result::init().map_err(|e| anyhow!("{dev}: the NVIDIA driver found no usable GPU ({e:?})"))?;
    let count = result::device::get_count()
        .map_err(|e| anyhow!("{dev}: cannot count the CUDA devices ({e:?})"))?
        .max(0) as usize;
    if n >= count {
        bail!(
            "{dev}: this machine has {count} CUDA device(s) (cuda:0 to cuda:{})",
            count.max(1) - 1
        );
    }
    // SAFETY: only tries to load the library.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        bail!("{dev}: libnvrtc (CUDA's runtime compiler, which builds every kernel) was not found: install the CUDA toolkit's nvrtc, or add its lib64 to LD_LIBRARY_PATH");
    }
    let root = burn::cubecl::cuda::install::cuda_path().ok_or_else(|| {
        anyhow!("{dev}: the CUDA headers were not found (no CUDA_PATH, /usr/local/cuda or /opt/cuda): set CUDA_PATH to the CUDA toolkit")
    })?;
    let header = root.join("include").join("cuda_runtime.h");
    if !header.is_file() {
        bail!(
            "{dev}: {} not found: set CUDA_PATH to a CUDA toolkit with its headers",
            header.display()
        );
    }
    let handle = result::device::get(n as i32)
        .map_err(|e| anyhow!("{dev}: cannot open the device ({e:?})"))?;
    let name = result::device::get_name(handle).unwrap_or_else(|_| "unknown GPU".into());
    // SAFETY: `handle` comes from `device::get`.
    let total = unsafe { result::device::total_mem(handle) }.ok();
    configure_cubecl();
    Ok(DeviceInfo {
        name: format!("cuda:{n} ({name})"),
        total_bytes: total.map(|b| b as u64),
    })
}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
/// The memory probe of `device` on cubecl runtime `R`, reading the stream of the thread that
/// builds it (the job's) from whichever thread calls it.
pub(super) fn memory_probe<R: burn::cubecl::Runtime>(device: R::Device) -> Probe {
    let stream = burn::tensor::StreamId::current();
    std::sync::Arc::new(move || {
        let u = stream.executes(|| R::client(&device).memory_usage()).ok()?;
        Some((u.bytes_in_use, u.bytes_reserved))
    })
}

#[cfg(feature = "wgpu")]
/// Whether wgpu sees a hardware adapter (a discrete, integrated or virtual GPU; not a software
/// renderer such as Mesa's llvmpipe).
pub(super) fn hardware_wgpu_adapter() -> bool {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: wgpu::Backends::all(),
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    let adapters =
        burn::cubecl::future::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
    adapters.iter().any(|a| {
        !matches!(
            a.get_info().device_type,
            wgpu::DeviceType::Cpu | wgpu::DeviceType::Other
        )
    })
}

/// The wgpu pre-flight check: an adapter must exist (wgpu panics on the first tensor otherwise).
#[cfg(feature = "wgpu")]
pub(super) fn wgpu_preflight(device: &burn::backend::wgpu::WgpuDevice) -> Result<DeviceInfo> {
    use burn::cubecl::{wgpu::WgpuRuntime, Runtime};
    configure_cubecl();
    install_panic_hook();
    RECORDING.store(true, Ordering::SeqCst);
    let client = catch_unwind(|| WgpuRuntime::client(device));
    if client.is_err() {
        // This thread sees only the closed channel (RecvError); the cause is the device
        // thread's panic, which may be recorded a moment later.
        let cause = || {
            PANICS
                .lock()
                .ok()
                .and_then(|p| p.iter().find(|m| !m.contains("RecvError")).cloned())
        };
        for _ in 0..20 {
            if cause().is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        RECORDING.store(false, Ordering::SeqCst);
        let msg = cause().unwrap_or_default();
        let first = msg.lines().next().unwrap_or("no adapter");
        anyhow::bail!("--device wgpu: no GPU adapter could be opened ({first}); on Linux install a Vulkan driver (Debian: mesa-vulkan-drivers libvulkan1)");
    }
    RECORDING.store(false, Ordering::SeqCst);
    Ok(DeviceInfo {
        name: "wgpu".into(),
        total_bytes: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_thread_failures_read_as_one_line_naming_the_cause() {
        let info = DeviceInfo {
            name: "cuda:0 (test)".into(),
            total_bytes: None,
        };
        let oom = "called `Result::unwrap()` on an `Err` value: can't allocate buffer of size: 4294967296\n   0: backtrace line";
        let e = explain(&info, oom).to_string();
        assert!(e.starts_with("cuda:0 (test): out of GPU memory"), "{e}");
        assert!(e.contains("4294967296") && !e.contains('\n'), "{e}");
        let e = explain(
            &info,
            "\n        CUDA installation not found.\n        Please ensure",
        )
        .to_string();
        assert!(e.contains("CUDA_PATH") && !e.contains('\n'), "{e}");
        let e = explain(&info, "something else\nsecond line").to_string();
        assert_eq!(e, "cuda:0 (test): something else");
    }

    #[test]
    fn no_gpu_means_no_memory_figures_and_nothing_to_check() {
        assert_eq!(gpu_memory(), None);
        assert!(step_done().is_ok());
    }
}
