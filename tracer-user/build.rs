//! Builds the eBPF programs (tracer-ebpf) with the nightly toolchain and embeds the object.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .join("tracer-ebpf");
    let root = root.to_str().context("utf-8 path")?;
    let pkg = aya_build::Package {
        name: "tracer-ebpf",
        root_dir: root,
        ..Default::default()
    };
    aya_build::build_ebpf([pkg], aya_build::Toolchain::default())
}
