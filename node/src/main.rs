//! `shardmall`: parse the command line, set up logging, hand over to the library.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = shardmall::cli::Cli::parse();
    shardmall::run(cli)
}
