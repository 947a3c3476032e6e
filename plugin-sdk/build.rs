fn main() { vlmhost_build::link_libtorch(); }
