//! `mmkd`: the command line of the engine.
//!
//! Subcommands are grouped by the crate they drive; each group lives in its own
//! module and is flattened into one top-level command list.

mod bench;
mod data;
mod kernel;
mod kstep;
mod train;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "mmkd",
    version,
    about = "Multi-teacher distillation of biomedical CLIP students"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    #[command(flatten)]
    Bench(bench::BenchCommand),
    #[command(flatten)]
    Data(data::DataCommand),
    #[command(flatten)]
    Kernel(kernel::KernelCommand),
    #[command(flatten)]
    Train(train::TrainCommand),
}

fn main() {
    let cli = Cli::parse();
    // The CPU tape frees and reallocates a step's activations every step; keep that memory.
    mmkd_engine::host_memory::keep_freed_memory();
    let run = move || match cli.command {
        Command::Bench(c) => bench::run(c),
        Command::Data(c) => data::run(c),
        Command::Kernel(c) => kernel::run(c),
        Command::Train(c) => train::run(c),
    };
    // The CPU ops' parallel regions are cheaper started from a worker of their own pool.
    let result = mmkd_engine::cpu_pool::run_on_pool(run);
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
