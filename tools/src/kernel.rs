//! Kernel subcommands.

use clap::Subcommand;

#[derive(Subcommand)]
pub enum KernelCommand {}

pub fn run(cmd: KernelCommand) -> anyhow::Result<()> {
    match cmd {}
}
