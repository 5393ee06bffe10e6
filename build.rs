//! Compiles `proto/` once for the whole workspace: prost messages, tonic
//! clients and servers, pbjson serde impls (canonical proto3 JSON for the
//! REST shim) and the descriptor set that server reflection serves.

use std::{env, path::PathBuf};

const PROTOS: &[&str] = &[
    "proto/shop/common/v1/money.proto",
    "proto/shop/order/v1/order.proto",
    "proto/shop/payment/v1/payment.proto",
    "proto/shop/inventory/v1/inventory.proto",
    "proto/shop/events/v1/events.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc keeps `cargo build` free of system packages; an
    // explicit PROTOC still wins.
    if env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded.
        unsafe { env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("shop_descriptor.bin");

    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptor_path)
        // Timestamps map to pbjson_types so that they serialize as RFC 3339.
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_protos(PROTOS, &["proto"])?;

    let descriptor_set = std::fs::read(&descriptor_path)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptor_set)?
        .build(&[".shop"])?;

    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
