//! `shardmall-loadgen`: see the library ([`shardmall_loadgen`]) and `loadgen/README.md`.

fn main() {
    std::process::exit(shardmall_loadgen::run_cli(std::env::args_os()));
}
