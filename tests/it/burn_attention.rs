//! burn's `module::attention`, the path every backend without the CPU kernels takes for
//! inference (the teacher, evaluation, generation; a flash kernel on CUDA), checked on the CPU:
//! Flex with the kernels off runs it through Flex's own attention, against the goldens. The
//! training step there runs burn's tensor ops (the additive-mask path the GPUs train with).

use crate::common::*;
use crate::parity::distances;
use laco_train::kernels;

#[test]
fn burn_attention_and_generic_training_ops_match_the_goldens_on_the_cpu() {
    let d = kernels::with_generic_ops(|| distances::<B>(&device()));
    assert!(d.logits <= 1e-4, "{d:?}");
    assert!(d.padded <= 1e-4, "{d:?}");
    assert!(d.cached <= 1e-4, "{d:?}");
    assert_eq!(d.greedy, Some(true), "{d:?}");
    assert!(d.ppl <= 1e-4, "{d:?}");
    assert!(d.mmlu <= 1e-4, "{d:?}");
    assert!(d.kd <= 1e-5, "{d:?}");
}
