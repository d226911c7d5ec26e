//! The plumbing every kernel shares: recognising burn's Flex backend (inference) and burn's
//! autodiff over it (training), moving between their tensors and Flex storage, and recording a
//! hand-written autodiff node with its backward pass.

use burn::backend::autodiff::{
    checkpoint::strategy::NoCheckpointing,
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
};
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::{Backend, BackendTypes};
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use burn_flex::FlexTensor;
use std::any::{Any, TypeId};

type Ad = Autodiff<Flex>;
/// burn's autodiff tensor over Flex (the type itself is not exported by name).
pub(super) type AdTensor = <Ad as BackendTypes>::FloatTensorPrimitive;

/// Whether tensors of backend `B` and this dtype run through the inference kernels.
pub(super) fn inference<B: Backend>(dtype: DType) -> bool {
    super::enabled() && TypeId::of::<B>() == TypeId::of::<Flex>() && dtype == DType::F32
}

/// Whether tensors of backend `B` and this dtype run through the training kernels.
pub(super) fn training<B: Backend>(dtype: DType) -> bool {
    super::enabled() && TypeId::of::<B>() == TypeId::of::<Ad>() && dtype == DType::F32
}

/// Wraps a row-major buffer as a Flex tensor of backend `B` (which must be Flex).
pub(super) fn from_vec<B: Backend, const D: usize>(
    data: Vec<f32>,
    dims: [usize; D],
) -> Tensor<B, D> {
    let t = FlexTensor::from_data(TensorData::new(data, dims));
    let prim = (Box::new(t) as Box<dyn Any>)
        .downcast::<B::FloatTensorPrimitive>()
        .expect("from_vec is only called after `inference`");
    Tensor::from_primitive(TensorPrimitive::Float(*prim))
}

/// The dense storage of a tensor of backend `B`, which must be Flex.
pub(super) fn flex_data<B: Backend, const D: usize>(t: &Tensor<B, D>) -> FlexTensor {
    dense(View::of(t.clone()).expect("a Flex tensor").into_flex())
}

/// The autodiff tensor inside `t`; `B` must be `Autodiff<Flex>` (see [`training`]).
pub(super) fn to_ad<B: Backend, const D: usize>(t: Tensor<B, D>) -> AdTensor {
    let prim = t.into_primitive().tensor();
    *(Box::new(prim) as Box<dyn Any>)
        .downcast::<AdTensor>()
        .expect("to_ad is only called after `training`")
}

/// The inverse of [`to_ad`].
pub(super) fn from_ad<B: Backend, const D: usize>(t: AdTensor) -> Tensor<B, D> {
    let prim = *(Box::new(t) as Box<dyn Any>)
        .downcast::<B::FloatTensorPrimitive>()
        .expect("from_ad is only called after `training`");
    Tensor::from_primitive(TensorPrimitive::Float(prim))
}

/// `t` with its elements row-major from its first (copied only when `t` is a strided view).
pub(super) fn dense(t: FlexTensor) -> FlexTensor {
    if t.layout().contiguous_offsets().is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

/// The f32 elements of a [`dense`] tensor.
pub(super) fn elems(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("a dense f32 tensor")
}

pub(super) fn flex_tensor(data: Vec<f32>, dims: &[usize]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(data, dims.to_vec()))
}

/// Records `out`, computed from `inputs`, as one node of the autodiff graph whose backward pass
/// is `op`'s; `state` (what the backward pass keeps) is built only when a gradient is wanted.
pub(super) fn record<T, const N: usize>(
    op: T,
    inputs: [&AdTensor; N],
    out: FlexTensor,
    state: impl FnOnce() -> T::State,
) -> AdTensor
where
    T: Backward<Flex, N>,
    T::State: Clone + Send + std::fmt::Debug + 'static,
{
    match op
        .prepare::<NoCheckpointing>(inputs.map(|t| t.node.clone()))
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(state(), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

/// The gradient flowing into a node's output, dense.
pub(super) fn upstream<S, const N: usize>(ops: &Ops<S, N>, grads: &mut Gradients) -> FlexTensor {
    dense(grads.consume::<Flex>(&ops.node))
}

/// Whether the node's input `i` wants a gradient.
pub(super) fn wants<S, const N: usize>(ops: &Ops<S, N>, i: usize) -> bool {
    ops.parents[i].is_some()
}

/// Hands `grad` (of shape `dims`) to the node's input `i`, when that input wants a gradient.
pub(super) fn give<S, const N: usize>(
    ops: &Ops<S, N>,
    i: usize,
    grads: &mut Gradients,
    grad: Vec<f32>,
    dims: &[usize],
) {
    if let Some(node) = &ops.parents[i] {
        grads.register::<Flex>(node.id, flex_tensor(grad, dims));
    }
}

/// A Flex tensor's storage with its dimensions and element strides (all positive).
#[derive(Debug, Clone)]
pub(super) struct View {
    tensor: FlexTensor,
    pub dims: Vec<usize>,
    pub strides: Vec<isize>,
}

impl View {
    pub fn of<B: Backend, const D: usize>(t: Tensor<B, D>) -> Option<Self> {
        let prim = t.into_primitive().tensor();
        let tensor = *(Box::new(prim) as Box<dyn Any>)
            .downcast::<FlexTensor>()
            .ok()?;
        Some(Self::from_flex(tensor))
    }

    pub fn into_flex(self) -> FlexTensor {
        self.tensor
    }

    pub fn from_flex(tensor: FlexTensor) -> Self {
        let tensor = if tensor.layout().has_positive_strides() {
            tensor
        } else {
            tensor.to_contiguous()
        };
        let strides = tensor.layout().strides().to_vec();
        let dims = tensor.layout().shape().to_vec();
        Self {
            tensor,
            dims,
            strides,
        }
    }

    /// Pointer to the element at `idx`.
    pub fn at(&self, idx: &[usize]) -> *const f32 {
        let offset = self.tensor.layout().start_offset() as isize
            + idx
                .iter()
                .zip(&self.strides)
                .map(|(&i, s)| i as isize * s)
                .sum::<isize>();
        self.tensor.storage::<f32>()[offset as usize..].as_ptr()
    }

    /// The elements in row-major order, when they are stored that way.
    pub fn contiguous(&self) -> Option<&[f32]> {
        self.tensor.as_slice::<f32>()
    }
}
