//! `shardmall`: parse the command line, set up logging, hand over to the library.

use clap::Parser;

/// jemalloc instead of the system allocator: under a flash sale the node's requests
/// allocate and free on every worker thread, and glibc's allocator spent a fifth of the
/// node's CPU in its slow paths (docs/benchmarks.md, "Flash-sale buy: where the time
/// goes"); jemalloc's thread caches make those calls cheap.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    let cli = shardmall::cli::Cli::parse();
    shardmall::run(cli)
}
