// Link libtorch_cuda for real (rustc's --as-needed would drop it, and CUDA
// would silently be missing) and add run paths to $LIBTORCH/lib.
fn main() {
    vlmhost_build::link_libtorch();
}
