//! Nothing to build: this script exists so that Cargo.toml's `[build-dependencies]` (feature
//! unification with the `mpi` feature's bindgen, see there) take effect.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
}
