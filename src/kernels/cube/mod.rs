//! cubecl kernels for burn's GPU backends (CUDA, wgpu): the only code in laco-train that knows
//! cubecl, burn's fusion and its autodiff over them. Training on `Autodiff<Cuda>` and
//! `Autodiff<Wgpu>` (both with burn's fusion) runs the student's attention through
//! [`attention`]; every other backend gets `None` and the caller runs what it runs today.
//!
//! An op here is three layers: the `#[cube]` kernels and their launch on cubecl tensors
//! ([`flash`]); a custom operation in burn's fusion stream, so the kernels run in order with
//! the fused ops around them ([`custom`]); and one autodiff node whose backward pass is the
//! backward kernels ([`Attention`]).

mod flash;

use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::NoCheckpointing},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
};
use burn::backend::Autodiff;
use burn::tensor::backend::{Backend, BackendTypes};
use burn::tensor::{DType, Shape};
use burn::tensor::{Int, Tensor, TensorPrimitive};
use burn_cubecl::fusion::FusionCubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use burn_fusion::{
    stream::{Operation, OperationStreams},
    Fusion, FusionRuntime, FusionTensor,
};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};
use std::any::{Any, TypeId};
use std::fmt;
use std::marker::PhantomData;

/// burn's fused GPU backends these kernels run on.
enum Gpu {
    #[cfg(feature = "wgpu")]
    Wgpu,
    #[cfg(feature = "cuda")]
    Cuda,
}

/// Which of the [`Gpu`] backends `B` is the autodiff of, if any.
fn gpu<B: Backend>() -> Option<Gpu> {
    #[cfg(feature = "wgpu")]
    if TypeId::of::<B>() == TypeId::of::<Autodiff<burn::backend::Wgpu>>() {
        return Some(Gpu::Wgpu);
    }
    #[cfg(feature = "cuda")]
    if TypeId::of::<B>() == TypeId::of::<Autodiff<burn::backend::Cuda>>() {
        return Some(Gpu::Cuda);
    }
    None
}

/// Whether training tensors of backend `B` run through these kernels (`Autodiff` over burn's
/// fused CUDA or wgpu backend, kernels on).
pub fn training<B: Backend>() -> bool {
    super::enabled() && gpu::<B>().is_some()
}

/// Causal attention of queries at the last `seq` of `keys` positions, as one autodiff node.
///
/// # Shapes
/// - `q`: `[batch, seq, heads, head_dim]`, rotated and already scaled by `1/sqrt(head_dim)`
/// - `k`, `v`: `[batch, kv_heads, keys, head_dim]` (any strides)
/// - `keys`: `[batch, keys]`, which keys each query sees (see [`flash`]); `None`: every key up
///   to the query
/// - returns `[batch, seq, heads * head_dim]`, or `None` where the kernels do not run
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    keys: Option<&Tensor<B, 2, Int>>,
) -> Option<Tensor<B, 3>> {
    if !super::enabled() {
        return None;
    }
    let gpu = gpu::<B>()?;
    let [batch, seq, heads, d] = q.dims();
    let keys = match keys {
        Some(keys) => keys.clone(),
        None => Tensor::zeros([batch, k.dims()[2]], &q.device()),
    };
    let out: Tensor<B, 4> = match gpu {
        #[cfg(feature = "wgpu")]
        Gpu::Wgpu => train::<B, burn::cubecl::wgpu::WgpuRuntime, f32, i32, u32>(q, k, v, keys),
        #[cfg(feature = "cuda")]
        Gpu::Cuda => train::<B, burn::cubecl::cuda::CudaRuntime, f32, i32, u8>(q, k, v, keys),
    };
    Some(out.reshape([batch, seq, heads * d]))
}

type Inner<R, F, I, BT> = CubeBackend<R, F, I, BT>;
type Fused<R, F, I, BT> = Fusion<Inner<R, F, I, BT>>;
type AdTensor<R, F, I, BT> = <Autodiff<Fused<R, F, I, BT>> as BackendTypes>::FloatTensorPrimitive;
/// A tensor of burn's fusion over CubeBackend<R, ..>.
type Lazy<R> = FusionTensor<FusionCubeRuntime<R>>;

/// `value` as type `T`, which it is (checked by [`training`] through `TypeId`).
fn cast<T: 'static>(value: impl Any) -> T {
    *(Box::new(value) as Box<dyn Any>)
        .downcast::<T>()
        .expect("the backend was checked by `training`")
}

/// [`attention`] on `Autodiff<Fusion<CubeBackend<R, F, I, BT>>>`, which `B` is.
fn train<B, R, F, I, BT>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    keys: Tensor<B, 2, Int>,
) -> Tensor<B, 4>
where
    B: Backend,
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let ad = |t: Tensor<B, 4>| cast::<AdTensor<R, F, I, BT>>(t.into_primitive().tensor());
    let (q, k, v) = (ad(q), ad(k), ad(v));
    let keys = cast::<Lazy<R>>(keys.into_primitive());
    let [out, lse] = custom::<R, F, I, BT, 4, 2>(
        "laco_flash_attention_forward",
        [&q.primitive, &k.primitive, &v.primitive, &keys],
        |t| {
            let [q, _, _, _] = t;
            let [batch, seq, heads, _] = q.shape.dims();
            [
                (q.shape.clone(), q.dtype),
                ([batch, heads, seq].into(), DType::F32),
            ]
        },
        |[q, k, v, keys]| {
            let (out, lse) = flash::forward(q, k, v, keys);
            [out, lse]
        },
    );
    let node = match Attention::<R, F, I, BT>(PhantomData)
        .prepare::<NoCheckpointing>([q.node.clone(), k.node.clone(), v.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            State {
                q: q.primitive,
                k: k.primitive,
                v: v.primitive,
                keys,
                out: out.clone(),
                lse,
            },
            out,
        ),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Tensor::from_primitive(TensorPrimitive::Float(cast::<B::FloatTensorPrimitive>(
        node,
    )))
}

/// What the backward pass keeps: the inputs, the output and the log-sum-exps.
#[derive(Debug, Clone)]
struct State<R: CubeRuntime> {
    q: Lazy<R>,
    k: Lazy<R>,
    v: Lazy<R>,
    keys: Lazy<R>,
    out: Lazy<R>,
    lse: Lazy<R>,
}

struct Attention<R, F, I, BT>(PhantomData<(R, F, I, BT)>);

impl<R, F, I, BT> fmt::Debug for Attention<R, F, I, BT> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FlashAttentionBackward")
    }
}

impl<R, F, I, BT> Backward<Fused<R, F, I, BT>, 3> for Attention<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    type State = State<R>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dout = grads.consume::<Fused<R, F, I, BT>>(&ops.node);
        let s = ops.state;
        let [dq, dk, dv] = custom::<R, F, I, BT, 7, 3>(
            "laco_flash_attention_backward",
            [&s.q, &s.k, &s.v, &s.keys, &s.out, &s.lse, &dout],
            |[q, k, v, ..]| [q, k, v].map(|t| (t.shape.clone(), t.dtype)),
            |[q, k, v, keys, out, lse, dout]| flash::backward(q, k, v, keys, out, lse, dout),
        );
        for (parent, grad) in ops.parents.iter().zip([dq, dk, dv]) {
            if let Some(node) = parent {
                grads.register::<Fused<R, F, I, BT>>(node.id, grad);
            }
        }
    }
}

/// Registers `run` (from `N` inputs to `M` outputs on cubecl tensors) as one custom operation
/// of burn's fusion stream; `shapes` gives the outputs' shapes and dtypes from the inputs.
fn custom<R, F, I, BT, const N: usize, const M: usize>(
    name: &'static str,
    inputs: [&Lazy<R>; N],
    shapes: impl FnOnce([&Lazy<R>; N]) -> [(Shape, DType); M],
    run: fn([CubeTensor<R>; N]) -> [CubeTensor<R>; M],
) -> [Lazy<R>; M]
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    struct Op<R: CubeRuntime, F, I, BT, const N: usize, const M: usize> {
        desc: CustomOpIr,
        run: fn([CubeTensor<R>; N]) -> [CubeTensor<R>; M],
        _b: PhantomData<(F, I, BT)>,
    }

    impl<R: CubeRuntime, F, I, BT, const N: usize, const M: usize> fmt::Debug
        for Op<R, F, I, BT, N, M>
    {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(&self.desc.id)
        }
    }

    impl<R, F, I, BT, const N: usize, const M: usize> Operation<FusionCubeRuntime<R>>
        for Op<R, F, I, BT, N, M>
    where
        R: CubeRuntime,
        F: FloatElement,
        I: IntElement,
        BT: BoolElement,
    {
        fn execute(
            &self,
            handles: &mut HandleContainer<<FusionCubeRuntime<R> as FusionRuntime>::FusionHandle>,
        ) {
            let (inputs, outputs) = self.desc.as_fixed::<N, M>();
            let tensors = inputs.each_ref().map(|t| {
                if t.dtype.is_float() {
                    handles.get_float_tensor::<Inner<R, F, I, BT>>(t)
                } else {
                    handles.get_int_tensor::<Inner<R, F, I, BT>>(t)
                }
            });
            for (out, tensor) in outputs.iter().zip((self.run)(tensors)) {
                handles.register_float_tensor::<Inner<R, F, I, BT>>(&out.id, tensor);
            }
        }
    }

    let client = inputs[0].client.clone();
    let streams = OperationStreams::with_inputs(inputs);
    let outputs = shapes(inputs)
        .map(|(shape, dtype)| TensorIr::uninit(client.create_empty_handle(), shape, dtype));
    let desc = CustomOpIr::new(name, &inputs.map(|t| t.clone().into_ir()), &outputs);
    let op = Op::<R, F, I, BT, N, M> {
        desc: desc.clone(),
        run,
        _b: PhantomData,
    };
    client
        .register(streams, OperationIr::Custom(desc), op)
        .try_into()
        .expect("one tensor per declared output")
}
